"""``--precision auto``: bf16 only on a bf16 CPU and only for a model whose recorded parity check passed."""

import numpy as np
import pytest
import torch

import medseg.inference.precision as precision
from medseg.cli import main
from medseg.data.manifest import load_manifest
from medseg.deploy.parity import bf16_parity, dice_changes
from medseg.inference.backends import AutocastNetwork
from medseg.inference.precision import choose_precision, parity_passes
from medseg.inference.predictor import Predictor
from medseg.models.bundle import ModelBundle, PrecisionParity, load_bundle
from medseg.training.qc_calibration import validation_cases

CPU = torch.device("cpu")


def _record(mean: float, largest: float, passed: bool | None = None) -> PrecisionParity:
    return PrecisionParity(mean_dice_change=mean, max_class_dice_change=largest, cases=3,
                           passed=parity_passes(mean, largest) if passed is None else passed)


def _spec(trained_run, record: PrecisionParity | None):
    spec = load_bundle(trained_run).spec
    return spec.model_copy(update={"precision_check": {} if record is None else {"bfloat16": record}})


@pytest.fixture
def bf16_cpu(monkeypatch):
    """This CPU as one with native bfloat16 (the rule reads the capability through cpu_bf16_native)."""
    monkeypatch.setattr(precision, "cpu_bf16_native", lambda: True)


@pytest.mark.parametrize(("mean", "largest", "passes"), [
    (0.005, 0.01, True),      # both exactly at their limits
    (-0.005, 0.01, True),     # a loss counts like a gain
    (0.0051, 0.0, False),
    (-0.0051, 0.0, False),
    (0.0, 0.0101, False),
    (0.0, 0.0, True),
])
def test_the_rule_includes_its_limits(mean, largest, passes):
    assert parity_passes(mean, largest) is passes


def test_a_failed_record_runs_float32_under_auto(trained_run, bf16_cpu):
    choice = choose_precision("auto", [_spec(trained_run, _record(0.0, 0.02))], CPU)
    assert choice.runtime == "float32" and "failed" in choice.reason


def test_a_passed_record_runs_bf16_on_a_bf16_cpu(trained_run, bf16_cpu):
    choice = choose_precision("auto", [_spec(trained_run, _record(-0.001, 0.004))], CPU)
    assert choice.runtime == "bfloat16" and "passed" in choice.reason


def test_a_record_marked_failed_is_not_revived_by_its_figures(trained_run, bf16_cpu):
    assert choose_precision("auto", [_spec(trained_run, _record(0.0, 0.0, passed=False))], CPU).runtime == "float32"


def test_no_record_runs_float32(trained_run, bf16_cpu):
    choice = choose_precision("auto", [_spec(trained_run, None)], CPU)
    assert choice.runtime == "float32" and "no bf16 parity check" in choice.reason


def test_a_cpu_without_bf16_runs_float32_whatever_the_record(trained_run, monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_native", lambda: False)
    assert choose_precision("auto", [_spec(trained_run, _record(0.0, 0.0))], CPU).runtime == "float32"


def test_an_ensemble_needs_every_member_passed(trained_run, bf16_cpu):
    good, bad = _spec(trained_run, _record(0.0, 0.0)), _spec(trained_run, _record(0.0, 0.5))
    assert choose_precision("auto", [good, bad], CPU).runtime == "float32"
    assert choose_precision("auto", [good, good], CPU).runtime == "bfloat16"


def test_explicit_choices_and_cuda(trained_run, bf16_cpu):
    spec = _spec(trained_run, None)
    assert choose_precision("bfloat16", [spec], CPU).runtime == "bfloat16"
    fp32 = choose_precision("float32", [spec], torch.device("cuda"))
    assert fp32.runtime == "float32" and not fp32.cuda_autocast
    auto = choose_precision("auto", [spec], torch.device("cuda"))  # autocast as trained (float16 here)
    assert auto.runtime == "float32" and auto.cuda_autocast and "float16" in auto.reason
    other = choose_precision("auto", [_spec(trained_run, _record(0.0, 0.0))], CPU, backend="onnxruntime")
    assert other.runtime == "float32"


@pytest.mark.parametrize(("record", "bf16"), [(_record(0.0, 0.02), False), (_record(0.001, 0.002), True), (None, False)])
def test_the_predictor_runs_what_the_rule_chose(trained_run, tmp_path, bf16_cpu, record, bf16):
    bundle = load_bundle(trained_run)
    path = tmp_path / "model.pt"
    ModelBundle(_spec(trained_run, record), bundle.weights).save(path)
    predictor = Predictor.from_checkpoint(path, "cpu", precision="auto")
    assert isinstance(predictor.model, AutocastNetwork) is bf16
    assert predictor.precision.runtime == ("bfloat16" if bf16 else "float32")


def test_dice_changes_are_means_over_cases_reduced_minus_float32():
    fp32 = [{"a": 0.8, "b": 0.6}, {"a": 0.9, "b": 0.7}]
    bf16 = [{"a": 0.8, "b": 0.58}, {"a": 0.92, "b": 0.7}]
    mean, largest, per_class, mean32 = dice_changes(fp32, bf16)
    assert per_class == pytest.approx({"a": 0.01, "b": -0.01})
    assert mean == pytest.approx(0.0) and largest == pytest.approx(0.01) and mean32 == pytest.approx(0.75)


def test_the_parity_check_on_the_validation_cases(trained_run, phantom_manifest):
    """Both precisions predict the labelled validation case; the figures are consistent with the rule."""
    bundle = load_bundle(trained_run)
    manifest = load_manifest(phantom_manifest)
    cases = validation_cases(manifest, bundle.config.data.fold)
    parity = bf16_parity(bundle, manifest, cases, "cpu", progress=False)
    assert parity is not None and parity.cases == len(cases) == 1
    assert set(parity.per_class_dice_change) == {n for v, n in bundle.label_names.items() if v}
    assert parity.max_class_dice_change == pytest.approx(max(abs(v) for v in parity.per_class_dice_change.values()))
    assert 0.99 < parity.voxel_agreement <= 1.0
    assert parity.passed is parity_passes(parity.mean_dice_change, parity.max_class_dice_change)
    assert bf16_parity(bundle, manifest, [], "cpu") is None


def test_training_records_the_check_on_a_bf16_cpu(trained_run):
    if not precision.cpu_bf16_native():
        pytest.skip("this CPU has no native bfloat16: training skips the check (logged)")
    record = load_bundle(trained_run).spec.precision_check["bfloat16"]
    assert record.cases == 1 and record.device == "cpu" and record.date


def test_export_records_a_check_for_an_older_run(trained_run, tmp_path, bf16_cpu, capsys, monkeypatch):
    import medseg.deploy.parity as parity

    monkeypatch.setattr(parity, "bf16_available", lambda device: True)
    bundle = load_bundle(trained_run)
    old = tmp_path / "old"
    old.mkdir()
    ModelBundle(_spec(trained_run, None), bundle.weights).save(old / "best.pt")
    assert main(["export", str(old), "--format", "torchscript"]) == 0
    assert "bf16 parity check" in capsys.readouterr().out
    assert "bfloat16" in load_bundle(old).spec.precision_check
    stamp = load_bundle(old).spec.precision_check["bfloat16"].date
    assert main(["export", str(old), "--format", "torchscript", "--overwrite"]) == 0  # a record is kept, not redone
    assert load_bundle(old).spec.precision_check["bfloat16"].date == stamp
    assert np.isfinite(load_bundle(old).spec.precision_check["bfloat16"].mean_dice_change)
