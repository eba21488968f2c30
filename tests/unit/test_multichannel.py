"""Multi-channel inputs: nnU-Net-layout two-channel phantoms imported, trained and predicted; a label that
needs both channels is out of a one-channel model's reach; channels off one grid are refused."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.cli import main
from medseg.config import config_from_dict
from medseg.data.manifest import Manifest, load_manifest, save_manifest
from medseg.data.phantom import write_two_channel_nnunet
from medseg.errors import GeometryError, ManifestError, ScanError
from medseg.inference.runner import predict_paths
from medseg.io.scans import find_scans, load_channels


def _config(manifest: Path, run_dir: Path, epochs: int):
    raw = {
        "name": "two-channel",
        "seed": 3,
        "data": {"manifest": str(manifest)},
        "model": {"name": "unet", "spatial_dims": 3, "channels": [8, 16, 32], "num_res_units": 1},
        "preprocessing": {"spacing": [2.0, 2.0, 2.0], "intensity": {"kind": "zscore"}},
        "augmentation": {"flip_prob": 0.0, "noise_prob": 0.0, "intensity_shift_prob": 0.0},
        "optim": {"lr": 0.01, "schedule": "constant"},
        "train": {"epochs": epochs, "iterations_per_epoch": 6, "patch_size": [32, 32, 16], "batch_size": 2,
                  "samples_per_volume": 1, "val_interval": epochs, "output_dir": str(run_dir),
                  "choose_postprocessing": False},
        "infer": {"sw_batch_size": 1, "overlap": 0.0},
    }
    return config_from_dict(raw, source="two-channel test config")


def _dice(pred: Path, ref: Path) -> float:
    a = np.asarray(nib.load(str(pred)).dataobj) == 1
    b = np.asarray(nib.load(str(ref)).dataobj) == 1
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


@pytest.fixture(scope="module")
def nnunet_folder(tmp_path_factory) -> Path:
    return write_two_channel_nnunet(tmp_path_factory.mktemp("two_channel") / "Dataset900_TwoChannel", num_cases=6,
                                    seed=5, num_test=2)


def test_two_channel_model_imports_trains_predicts_and_beats_one_channel(nnunet_folder, tmp_path, capsys):
    from medseg.training.trainer import train

    manifest_path = tmp_path / "two.json"
    assert main(["import", "nnunet", str(nnunet_folder), "--output", str(manifest_path), "--folds", "3"]) == 0
    manifest = load_manifest(manifest_path)
    assert manifest.channels == ["T1", "T2"] and manifest.num_channels == 2

    # The same cases with channel 0 only: what a one-channel model could be trained on.
    one = Manifest.model_validate({**manifest.model_dump(mode="json"), "channels": [],
                                   "cases": [{**c.model_dump(), "image": c.images[0]} for c in manifest.cases]})
    one_path = save_manifest(one, tmp_path / "one.json")

    two_run, one_run = tmp_path / "run2", tmp_path / "run1"
    train(_config(manifest_path, two_run, epochs=3), device="cpu")
    train(_config(one_path, one_run, epochs=3), device="cpu")

    # Prediction from the nnU-Net test folder: channel files grouped into one case, named without suffix.
    summary = predict_paths(two_run, [nnunet_folder / "imagesTs"], tmp_path / "pred2", device="cpu")
    assert not summary.failed
    assert sorted(p.name for p in summary.written) == ["case_006.nii.gz", "case_007.nii.gz"]
    # The one-channel model reads the first channel's files; a lone _0000 file also loses its suffix.
    only_first = tmp_path / "first_channel"
    only_first.mkdir()
    for f in sorted((nnunet_folder / "imagesTs").glob("*_0000.nii.gz")):
        (only_first / f.name).symlink_to(f)
    summary1 = predict_paths(one_run, [only_first], tmp_path / "pred1", device="cpu")
    assert sorted(p.name for p in summary1.written) == ["case_006.nii.gz", "case_007.nii.gz"]

    refs = nnunet_folder / "labelsTs"
    two = np.mean([_dice(tmp_path / "pred2" / r.name, r) for r in sorted(refs.iterdir())])
    one_dice = np.mean([_dice(tmp_path / "pred1" / r.name, r) for r in sorted(refs.iterdir())])
    # Lesions are 1 in 4 bright blobs of either channel: one channel alone cannot reach half the Dice.
    assert two > 0.7, f"two-channel Dice {two:.3f}"
    assert two > one_dice + 0.25, f"two-channel Dice {two:.3f} vs one-channel {one_dice:.3f}"

    # The mask lies on the first channel's grid.
    mask = nib.load(str(tmp_path / "pred2" / "case_006.nii.gz"))
    first = nib.load(str(nnunet_folder / "imagesTs" / "case_006_0000.nii.gz"))
    assert mask.shape == first.shape and np.allclose(mask.affine, first.affine)

    # A two-channel model given one channel's file refuses it, naming what it needs.
    with pytest.raises(ScanError, match=r"case_006_0001\.nii\.gz: channel 1 of case 'case_006' not found"):
        predict_paths(two_run, [only_first], tmp_path / "pred_bad", device="cpu")


def test_channels_off_one_grid_are_refused_naming_both_files(tmp_path):
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    a, b, c = tmp_path / "a_0000.nii.gz", tmp_path / "a_0001.nii.gz", tmp_path / "a_0002.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.float32), affine), str(a))
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 5), np.float32), affine), str(b))
    shifted = affine.copy()
    shifted[0, 3] = 1.0
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.float32), shifted), str(c))
    with pytest.raises(ScanError, match=r"a_0001\.nii\.gz.*shape \(8, 8, 5\) differs from .*a_0000\.nii\.gz's \(8, 8, 4\)"):
        load_channels([a, b])
    with pytest.raises(ScanError, match=r"a_0002\.nii\.gz.*affine .* differs from .*a_0000\.nii\.gz's"):
        load_channels([a, c])
    stacked = load_channels([a, a])
    assert stacked.shape == (8, 8, 4, 2) and np.allclose(stacked.affine, affine)


def test_training_refuses_a_case_whose_channels_do_not_share_a_grid(tmp_path):
    from medseg.training.trainer import Trainer

    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    for name, shape in (("t1.nii.gz", (8, 8, 4)), ("t2.nii.gz", (8, 8, 6)), ("seg.nii.gz", (8, 8, 4))):
        nib.save(nib.Nifti1Image(np.zeros(shape, np.uint8 if name == "seg.nii.gz" else np.float32), affine),
                 str(tmp_path / name))
    raw = {"name": "bad", "labels": {"0": "background", "1": "x"}, "channels": ["T1", "T2"],
           "cases": [{"id": "c1", "image": ["t1.nii.gz", "t2.nii.gz"], "label": "seg.nii.gz"}],
           "splits": {"train": ["c1"]}}
    (tmp_path / "m.json").write_text(json.dumps(raw))
    trainer = Trainer(_config(tmp_path / "m.json", tmp_path / "run", epochs=1), device="cpu", callbacks=[])
    assert trainer.in_channels == 2
    with pytest.raises((ScanError, GeometryError), match=r"t2\.nii\.gz.*differs from .*t1\.nii\.gz"):
        trainer.setup(resume=False)


def test_manifest_channel_counts_must_agree(tmp_path):
    for name in ("a.nii.gz", "b.nii.gz"):
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), str(tmp_path / name))
    base = {"name": "m", "labels": {"0": "background"}}
    (tmp_path / "m.json").write_text(json.dumps({**base, "cases": [
        {"id": "c1", "image": ["a.nii.gz", "b.nii.gz"]}, {"id": "c2", "image": "a.nii.gz"}]}))
    with pytest.raises(ManifestError, match="same number of channel images: case 'c1' has 2, case 'c2' has 1"):
        load_manifest(tmp_path / "m.json")
    (tmp_path / "m.json").write_text(json.dumps({**base, "channels": ["T1", "T2", "FLAIR"], "cases": [
        {"id": "c1", "image": ["a.nii.gz", "b.nii.gz"]}]}))
    with pytest.raises(ManifestError, match=r"'channels' names 3 channel\(s\) \(T1, T2, FLAIR\) but cases list 2"):
        load_manifest(tmp_path / "m.json")
    (tmp_path / "m.json").write_text(json.dumps({**base, "cases": [{"id": "c1", "image": ["a.nii.gz", "gone.nii.gz"]}]}))
    with pytest.raises(ManifestError, match="gone.nii.gz"):
        load_manifest(tmp_path / "m.json")


def test_find_scans_groups_channel_files_and_names_a_missing_channel(tmp_path):
    for name in ("p1_0000.nii.gz", "p1_0001.nii.gz", "p2_0000.nii.gz", "p2_0001.nii.gz", "q_0000.nii.gz"):
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), str(tmp_path / name))
    with pytest.raises(ScanError, match=r"q_0001\.nii\.gz: .*channel 1 of case 'q' not found"):
        find_scans([tmp_path], channels=2)
    (tmp_path / "q_0000.nii.gz").unlink()
    scans = find_scans([tmp_path], channels=2)
    assert [(s.case_id, [p.name for p in s.channels]) for s in scans] == [
        ("p1", ["p1_0000.nii.gz", "p1_0001.nii.gz"]), ("p2", ["p2_0000.nii.gz", "p2_0001.nii.gz"])]
    # Files given one by one group the same way.
    assert [s.case_id for s in find_scans([tmp_path / "p1_0001.nii.gz", tmp_path / "p1_0000.nii.gz"], channels=2)] == ["p1"]
    # One-channel model: _0000 and _0001 next to each other are not channels, so names stay.
    assert sorted(s.case_id for s in find_scans([tmp_path])) == ["p1_0000", "p1_0001", "p2_0000", "p2_0001"]
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), str(tmp_path / "plain.nii.gz"))
    with pytest.raises(ScanError, match=r"plain\.nii\.gz: the model takes 2 input channels: name each case's channel files"):
        find_scans([tmp_path], channels=2)


def test_per_channel_intensity_configs_normalise_each_channel_its_own_way():
    import torch
    from monai.data import MetaTensor

    from medseg.config import PreprocessingConfig
    from medseg.data.transforms import IMAGE, preprocessing

    pre = PreprocessingConfig.model_validate({"intensity": [{"kind": "ct_window", "a_min": -1000.0, "a_max": 1000.0},
                                                            {"kind": "zscore"}]})
    rng = np.random.default_rng(0)
    data = np.stack([rng.uniform(-1000, 1000, (6, 6, 4)), rng.normal(500, 50, (6, 6, 4))], axis=-1).astype(np.float32)
    meta = {"affine": torch.eye(4, dtype=torch.float64), "original_channel_dim": -1, "spatial_shape": (6, 6, 4)}
    out = preprocessing(pre, keys=(IMAGE,), load=False)({IMAGE: MetaTensor(data, meta=meta)})[IMAGE]
    assert out.shape == (2, 6, 6, 4)
    assert 0.0 <= float(out[0].min()) and float(out[0].max()) <= 1.0  # windowed to [0, 1]
    assert abs(float(out[1].mean())) < 1e-4 and abs(float(out[1].std()) - 1.0) < 0.05  # z-scored


def test_fingerprint_and_plan_work_per_channel(tmp_path):
    from medseg.data.phantom import make_two_channel_phantom
    from medseg.planning.planner import PlanOptions, write_plan

    rng = np.random.default_rng(0)
    cases = []
    for i in range(3):
        image, label, affine = make_two_channel_phantom(rng)
        image[..., 0] = image[..., 0] * 2 - 1000  # channel 0 in HU-like units, channel 1 as is
        for c, name in enumerate(("ct", "pet")):
            nib.save(nib.Nifti1Image(image[..., c], affine), str(tmp_path / f"c{i}_{name}.nii.gz"))
        nib.save(nib.Nifti1Image(label, affine), str(tmp_path / f"c{i}_seg.nii.gz"))
        cases.append({"id": f"c{i}", "image": [f"c{i}_ct.nii.gz", f"c{i}_pet.nii.gz"], "label": f"c{i}_seg.nii.gz"})
    raw = {"name": "ctpet", "modality": "other", "labels": {"0": "background", "1": "lesion"},
           "channels": ["CT", "PET"], "cases": cases, "splits": {"train": ["c0", "c1"], "val": ["c2"]}}
    (tmp_path / "m.json").write_text(json.dumps(raw))
    config_path, fp_path, config = write_plan(tmp_path / "m.json", tmp_path / "plan.yaml",
                                              options=PlanOptions(name="ctpet", cuda=False), progress=False)
    fp = json.loads(fp_path.read_text())
    assert fp["channels"] == ["CT", "PET"] and list(fp["intensity_all"]) == ["CT", "PET"]
    # Lesions are bright (300 -> -400 HU-like in CT) in both channels: foreground statistics per channel.
    assert fp["intensity_foreground"]["CT"]["median"] == pytest.approx(-400, abs=30)
    assert fp["intensity_foreground"]["PET"]["median"] == pytest.approx(300, abs=15)
    kinds = [i.kind for i in config.preprocessing.intensity]
    assert kinds == ["ct_zscore", "zscore"]
    assert config.preprocessing.intensity[0].mean == pytest.approx(-400, abs=30)


@pytest.mark.parametrize("name, modality, is_ct", [
    ("CT", "other", True), ("ct_venous", "MR", True), ("PET", "CT", False), ("T2", "CT", False),
    ("arterial", "CT", True), ("channel_1", "other", False), ("FLAIR", "other", False),
])
def test_planner_tells_ct_channels_by_name_then_by_modality(name, modality, is_ct):
    from medseg.planning.planner import _is_ct_channel

    assert _is_ct_channel(name, modality) is is_ct
