"""The planned recipe end to end on phantoms: a generated plan trains (pipeline check, not accuracy), the
postprocessing choice is recorded and shipped in the checkpoint, and prediction ensembles folds and mirrors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medseg.cli import build_parser, main
from medseg.config import load_config
from medseg.data.manifest import load_manifest, save_manifest
from medseg.inference.predictor import Predictor
from medseg.models.bundle import load_bundle
from medseg.planning import PlanOptions, cross_validation_folds, write_plan
from medseg.training.trainer import train


@pytest.fixture(scope="module")
def planned_run(phantom_manifest, tmp_path_factory):
    """One tiny epoch of the plan generated for the phantoms, on cross-validation fold 1 of a copy of
    their manifest with folds (as ``medseg train --fold 1`` would)."""
    manifest = load_manifest(phantom_manifest)
    manifest.folds, _ = cross_validation_folds([c.id for c in manifest.cases], num_folds=3, seed=0, num_test=0)
    with_folds = save_manifest(manifest, phantom_manifest.with_name("manifest_folds.json"))
    root = tmp_path_factory.mktemp("planned")
    # 8 base features instead of the CPU plan's 16: this checks the pipeline, not accuracy.
    options = PlanOptions(name="phantoms", cuda=False, base_features=8)
    config_path, _, _ = write_plan(with_folds, root / "phantoms.yaml", options=options, progress=False)
    config = load_config(config_path)
    config.data.fold = 1
    config.train.epochs = 1
    config.train.compile = False  # compiling costs a minute; the step is the same network
    config.train.iterations_per_epoch = 2
    config.train.output_dir = root / "run"
    return train(config, device="cpu")


def test_a_generated_plan_trains_and_records_its_postprocessing_choice(planned_run):
    run = planned_run.run_dir
    assert planned_run.epochs_run == 1 and np.isfinite(planned_run.history[0]["loss"])
    assert load_bundle(run).config.data.fold == 1
    record = json.loads((run / "postprocessing.json").read_text())
    assert set(record["classes"]) == {"1", "2"}
    chosen = [int(k) for k, v in record["classes"].items() if v["enabled"]]
    for v in record["classes"].values():
        assert v["enabled"] == (v["dice_largest_component"] > v["dice"])
    assert planned_run.keep_largest_component == chosen == record["keep_largest_component"]
    ckpt = load_bundle(run)
    assert ckpt.inference.keep_largest_component == chosen == ckpt.config.infer.keep_largest_component
    assert ckpt.config.model.name == "dynunet" and ckpt.config.model.deep_supervision
    assert load_config(run / "config.yaml").infer.keep_largest_component == chosen


def test_ensemble_and_mirroring_average_probabilities(planned_run):
    run = planned_run.run_dir
    single = Predictor.from_checkpoint(run, "cpu")
    mirrored = Predictor.from_checkpoint(run, "cpu", mirror=True)
    assert mirrored.mirror_axes == [0, 1, 2]
    assert Predictor.from_checkpoint(run, "cpu", mirror=False).mirror_axes == []
    torch.manual_seed(0)
    x = torch.randn(1, 1, 32, 32, 16)
    p1, p2 = single.probabilities(x), mirrored.probabilities(x)
    assert p2.shape == p1.shape and not torch.allclose(p1, p2, atol=1e-4)  # mirroring changes an untrained net's output
    assert torch.allclose(p2.sum(dim=1), torch.ones(1, 32, 32, 16), atol=1e-4)
    # Two copies of one model without mirroring are that model.
    same = Predictor.from_checkpoint([run, run], "cpu", mirror=False)
    assert len(same.models) == 2
    assert torch.allclose(same.probabilities(x), p1, atol=1e-5)


def test_predict_cli_takes_several_models_and_a_mirror_flag(planned_run, phantom_manifest, tmp_path):
    scan = phantom_manifest.parent / "images" / "phantom_005.nii.gz"
    run = planned_run.run_dir
    assert build_parser().parse_args(["predict", "--model", "a", "--mirror", "--input", "x", "--output", "y"]).mirror
    code = main(["predict", "--model", str(run), str(run), "--input", str(scan),
                 "--output", str(tmp_path / "out"), "--device", "cpu"])
    assert code == 0 and (tmp_path / "out" / "phantom_005.nii.gz").is_file()


def test_ensemble_refuses_models_with_different_preprocessing(planned_run, phantom_manifest, capsys, tmp_path):
    ckpt = load_bundle(planned_run.run_dir)
    other = ckpt.spec.preprocessing.model_copy(update={"spacing": (2.0, 2.0, 2.0)})
    type(ckpt)(ckpt.spec.model_copy(update={"preprocessing": other}), ckpt.weights).save(tmp_path / "other.pt")
    scan = phantom_manifest.parent / "images" / "phantom_005.nii.gz"
    code = main(["predict", "--model", str(planned_run.run_dir), str(tmp_path / "other.pt"), "--input", str(scan),
                 "--output", str(tmp_path / "o"), "--device", "cpu"])
    assert code == 2
    assert "cannot form an ensemble" in capsys.readouterr().err
