"""Planning: the fingerprint summarises the cases, and the plan's choices follow the stated rules for
isotropic, anisotropic and few-slice data; the YAML it writes is a valid, commented config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medseg.cli import main
from medseg.config import config_from_dict, load_config, parse_yaml
from medseg.data.manifest import load_manifest
from medseg.data.phantom import PhantomSpec, write_phantom_dataset
from medseg.errors import ConfigError
from medseg.planning import (
    PlanOptions,
    compute_fingerprint,
    cross_validation_folds,
    load_fingerprint,
    plan_experiment,
)
from medseg.planning.fingerprint import CaseFingerprint, Fingerprint, IntensityStats
from medseg.planning.planner import estimate_memory_bytes, relative_ref


def _phantoms(root: Path, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> Path:
    return write_phantom_dataset(root, num_cases=4, seed=2, spec=PhantomSpec(shape=shape, spacing=spacing, noise_hu=10))


def _plan(manifest_path: Path, **options):
    manifest = load_manifest(manifest_path)
    fp = compute_fingerprint(manifest, manifest_path, progress=False)
    return fp, plan_experiment(fp, "manifest.json", PlanOptions(name="t", cuda=False, **options))


def test_fingerprint_summarises_geometry_intensities_and_classes(phantom_manifest, tmp_path):
    manifest = load_manifest(phantom_manifest)
    fp = compute_fingerprint(manifest, phantom_manifest, progress=False)
    assert fp.num_cases == len(manifest.cases)
    assert fp.median_spacing == pytest.approx([4.0, 4.0, 5.0])
    assert fp.median_shape == pytest.approx([32, 32, 16])
    assert sum(fp.class_frequency.values()) == pytest.approx(1.0)
    fg = fp.intensity_foreground["CT"]
    # Phantom foreground is lung (~-850 HU) and nodules (~30 HU) with noise: ordered percentiles around them.
    assert -1000 < fg.percentile_00_5 < fg.mean < fg.percentile_99_5 < 200
    assert fp.object_sizes[1].per_case_mean >= 1 and fp.object_sizes[2].volume_ml_min > 0
    fp.save(tmp_path / "fp.json")
    assert load_fingerprint(tmp_path / "fp.json") == fp
    assert json.loads((tmp_path / "fp.json").read_text())["labels"] == {"0": "background", "1": "lung", "2": "nodule"}


def test_isotropic_ct_plan(phantom_manifest):
    fp, plan = _plan(phantom_manifest)
    config = plan.config()
    fg = fp.intensity_foreground["CT"]
    assert config.model.spatial_dims == 3 and config.model.name == "dynunet" and config.model.deep_supervision
    assert list(config.preprocessing.spacing) == pytest.approx(fp.median_spacing)
    assert config.train.patch_size == [32, 32, 16]
    # 32x32x16: all axes pool to 16x16x8, then z (8 voxels) stops while x, y go on to 8x8.
    assert config.model.strides == [2, [2, 2, 1]]
    assert config.model.kernel_sizes == [3, 3, 3]
    assert config.model.channels == [16, 32, 64]  # CPU plan: 16 base features
    intensity = config.preprocessing.intensity
    assert intensity.kind == "ct_zscore"
    assert (intensity.a_min, intensity.a_max) == pytest.approx((fg.percentile_00_5, fg.percentile_99_5), abs=0.01)
    assert intensity.mean == pytest.approx(fg.mean, abs=1e-3)
    assert config.optim.name == "sgd" and config.optim.schedule == "poly" and config.optim.momentum == 0.99


def test_anisotropic_plan_waits_to_pool_the_coarse_axis(tmp_path):
    fp, plan = _plan(_phantoms(tmp_path, (48, 48, 20), (1.5, 1.5, 5.0)))
    config = plan.config()
    assert config.model.spatial_dims == 3
    assert list(config.preprocessing.spacing) == pytest.approx([1.5, 1.5, 5.0])
    assert config.train.patch_size == [48, 48, 20]
    # z (5 mm) is more than twice as coarse as x/y (1.5 mm): not pooled and 1-wide kernels until they catch up.
    assert config.model.strides == [[2, 2, 1], 2, 2]
    assert config.model.kernel_sizes == [[3, 3, 1], 3, 3, 3]
    assert "anisotropic" in plan.yaml_text()


def test_few_thick_slices_plan_a_2d_network(tmp_path):
    _, plan = _plan(_phantoms(tmp_path, (48, 48, 8), (1.0, 1.0, 5.0)))
    config = plan.config()
    assert config.model.spatial_dims == 2
    assert config.train.patch_size == [48, 48]
    assert config.model.strides == [2, 2, 2]


def _synthetic_fingerprint(z_spacings: list[float], modality: str = "MR") -> Fingerprint:
    cases = [CaseFingerprint(f"c{i}", [200, 200, 40], [0.8, 0.8, z], {0: 90, 1: 10}) for i, z in enumerate(z_spacings)]
    stats = IntensityStats(100.0, 20.0, 0.0, 300.0, 50.0, 180.0, 100.0)
    spacings = [c.spacing for c in cases]
    import numpy as np

    return Fingerprint(
        manifest="synthetic.json", modality=modality, labels={0: "bg", 1: "fg"}, num_cases=len(cases), cases=cases,
        median_spacing=np.median(spacings, axis=0).tolist(),
        spacing_percentile_10=np.percentile(spacings, 10, axis=0).tolist(),
        median_shape=[200.0, 200.0, 40.0], intensity_all={modality: stats}, intensity_foreground={modality: stats},
        class_frequency={0: 0.9, 1: 0.1}, object_sizes={},
    )


def test_anisotropic_target_spacing_takes_the_10th_percentile_of_the_coarse_axis():
    fp = _synthetic_fingerprint([3.0] * 2 + [5.0] * 8)
    plan = plan_experiment(fp, "m.json", PlanOptions(name="t", cuda=False))
    config = plan.config()
    assert fp.median_spacing[2] == 5.0
    assert list(config.preprocessing.spacing) == pytest.approx([0.8, 0.8, fp.spacing_percentile_10[2]])
    assert config.preprocessing.spacing[2] < 5.0
    assert config.preprocessing.intensity.kind == "zscore"


def test_patch_and_batch_fit_the_memory_budget():
    fp = _synthetic_fingerprint([1.0] * 10)
    fp.median_shape = [300.0, 300.0, 300.0]
    fp.median_spacing = [0.8, 0.8, 1.0]
    small = plan_experiment(fp, "m.json", PlanOptions(name="t", cuda=True, memory_gib=1.0)).config()
    large = plan_experiment(fp, "m.json", PlanOptions(name="t", cuda=True, memory_gib=8.0)).config()
    for cfg, gib in ((small, 1.0), (large, 8.0)):
        strides = [s if isinstance(s, list) else [s] * 3 for s in cfg.model.strides]
        kernels = [k if isinstance(k, list) else [k] * 3 for k in cfg.model.kernel_sizes]
        used = estimate_memory_bytes(cfg.train.patch_size, strides, cfg.model.channels, cfg.train.batch_size, kernels)
        assert used <= gib * 2**30 or cfg.train.batch_size == 2
        assert cfg.model.channels[0] == 32  # CUDA plan: nnU-Net's width
    assert sum(small.train.patch_size) < sum(large.train.patch_size)


def test_a_cpu_plan_trains_for_a_wall_clock_budget_and_a_cuda_plan_for_nnunet_epochs():
    fp = _synthetic_fingerprint([1.0] * 10)
    cpu = plan_experiment(fp, "m.json", PlanOptions(name="t", cuda=False)).config()
    gpu = plan_experiment(fp, "m.json", PlanOptions(name="t", cuda=True, memory_gib=8.0)).config()
    # CPU: the lr decay spans 2 h of wall time, however fast the machine; CUDA: nnU-Net's 1000 x 250 steps.
    assert (cpu.train.max_minutes, cpu.train.schedule_over) == (120.0, "time")
    assert cpu.train.iterations_per_epoch < gpu.train.iterations_per_epoch == 250
    assert (gpu.train.max_minutes, gpu.train.schedule_over, gpu.train.epochs) == (None, "epochs", 1000)
    assert cpu.train.compile and gpu.train.compile


def test_plan_cli_writes_a_commented_config_that_loads(phantom_manifest, tmp_path, capsys):
    out = tmp_path / "configs" / "phantom_plan.yaml"
    assert main(["plan", str(phantom_manifest), "--output", str(out), "--target", "cpu"]) == 0
    text = out.read_text()
    assert "# median image shape" in text and "# mm; median spacing" in text
    config = load_config(out)
    assert config.data.manifest == phantom_manifest.resolve()
    assert config.name == "phantom_plan"
    assert (tmp_path / "configs" / "phantom_plan.fingerprint.json").is_file()
    # The comments carry no values: the file reads back as exactly what the planner decided from its fingerprint.
    planned = plan_experiment(load_fingerprint(tmp_path / "configs" / "phantom_plan.fingerprint.json"),
                              relative_ref(phantom_manifest, out.parent), PlanOptions(name="phantom_plan", cuda=False))
    assert parse_yaml(text) == json.loads(json.dumps(planned.values))
    assert main(["plan", str(phantom_manifest), "--output", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_plan_refuses_a_missing_manifest_naming_it(tmp_path, capsys):
    assert main(["plan", str(tmp_path / "nope.json"), "--output", str(tmp_path / "x.yaml")]) == 2
    assert "nope.json" in capsys.readouterr().err


def test_per_axis_strides_are_validated():
    raw = {"name": "x", "data": {"manifest": "m.json"}, "model": {"channels": [8, 16], "strides": [[2, 2]]}}
    with pytest.raises(ConfigError, match="one value per spatial axis"):
        config_from_dict(raw)


def test_folds_are_seeded_disjoint_and_exclude_the_test_cases():
    ids = [f"case_{i:03d}" for i in range(50)]
    folds, test = cross_validation_folds(ids, num_folds=5, seed=7, num_test=10)
    again, test_again = cross_validation_folds(list(reversed(ids)), num_folds=5, seed=7, num_test=10)
    assert (folds, test) == (again, test_again)
    vals = [v for f in folds for v in f["val"]]
    assert sorted(vals) == sorted(set(ids) - set(test)) and len(vals) == 40
    for f in folds:
        assert not set(f["train"]) & set(f["val"]) and not set(f["train"]) & set(test)
    assert cross_validation_folds(ids, num_folds=5, seed=8, num_test=10)[1] != test


def test_shipped_hippocampus_manifest_and_config_agree():
    repo = Path(__file__).resolve().parents[2]
    raw = json.loads((repo / "data_manifests" / "hippocampus.json").read_text())
    assert raw["allow_paths_outside_root"] is True and len(raw["folds"]) == 5
    assert raw["splits"]["train"] == raw["folds"][0]["train"] and raw["splits"]["val"] == raw["folds"][0]["val"]
    fold_ids = {i for f in raw["folds"] for i in f["val"]}
    assert not fold_ids & set(raw["splits"]["test"])
    config = config_from_dict(parse_yaml((repo / "configs" / "mr_hippocampus.yaml").read_text()))
    assert config.preprocessing.intensity.kind == "zscore" and config.model.deep_supervision
