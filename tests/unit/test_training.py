"""Training: the loss goes down, checkpoints are complete, resume continues exactly, 2D models train."""

import json

import pytest
import torch

from medseg.errors import CheckpointError, ConfigError
from medseg.models.bundle import load_bundle
from medseg.training.trainer import train
from tests.conftest import tiny_config


def test_training_lowers_the_loss_and_writes_a_complete_run(trained_run):
    history = json.loads((trained_run / "history.json").read_text())
    assert len(history) == 6
    assert history[-1]["loss"] < 0.8 * history[0]["loss"]
    for name in ("best.pt", "last.pt", "config.yaml", "history.json"):
        assert (trained_run / name).is_file()
    assert any((trained_run / "tensorboard").iterdir())
    ckpt = load_bundle(trained_run)
    assert ckpt.path.name == "best.pt"
    assert ckpt.label_names == {0: "background", 1: "lung", 2: "nodule"}
    assert "val_dice_lung" in history[-1] and history[-1]["val_dice_lung"] > 0.5


def test_resume_continues_exactly_where_an_uninterrupted_run_would_be(phantom_manifest, tmp_path):
    straight = train(tiny_config(phantom_manifest, tmp_path / "straight", epochs=2, iterations_per_epoch=2), device="cpu")
    interrupted = tiny_config(phantom_manifest, tmp_path / "resumed", epochs=1, iterations_per_epoch=2)
    train(interrupted, device="cpu")
    assert load_bundle(tmp_path / "resumed" / "last.pt").training_state["epoch"] == 0
    interrupted.train.epochs = 2
    resumed = train(interrupted, resume=True, device="cpu")

    assert resumed.epochs_run == 2
    last_a, last_b = load_bundle(tmp_path / "straight" / "last.pt"), load_bundle(tmp_path / "resumed" / "last.pt")
    a, b = last_a.training_state, last_b.training_state
    assert a["epoch"] == b["epoch"] == 1
    for key, tensor in last_a.weights.items():
        assert torch.allclose(tensor, last_b.weights[key], atol=1e-6), key
    assert [h["loss"] for h in straight.history] == pytest.approx([h["loss"] for h in resumed.history], rel=1e-5)
    assert a["optimizer_state"]["state"].keys() == b["optimizer_state"]["state"].keys()


def test_an_existing_run_is_not_overwritten_and_resume_needs_one(phantom_manifest, trained_run, tmp_path):
    with pytest.raises(ConfigError, match="already exists"):
        train(tiny_config(phantom_manifest, trained_run), device="cpu")
    with pytest.raises(CheckpointError, match="nothing to resume"):
        train(tiny_config(phantom_manifest, tmp_path / "fresh"), resume=True, device="cpu")


def test_2d_model_trains_on_slices(phantom_manifest, tmp_path):
    result = train(tiny_config(phantom_manifest, tmp_path / "run2d", spatial_dims=2, epochs=2), device="cpu")
    ckpt = load_bundle(result.run_dir)
    assert ckpt.config.model.spatial_dims == 2
    # Seeded: 1.84 -> 1.16 over the two epochs here; a 20 % drop is asked, as of the 3D model above.
    assert result.history[-1]["loss"] < 0.8 * result.history[0]["loss"]


def test_a_label_off_its_image_grid_stops_training_naming_the_file(phantom_manifest, tmp_path):
    import shutil

    import nibabel as nib
    import numpy as np

    from medseg.data.manifest import load_manifest, save_manifest
    from medseg.errors import GeometryError

    src = load_manifest(phantom_manifest)
    root = tmp_path / "data"
    shutil.copytree(src.root, root)
    case = src.split("train")[0]
    label_path = root / case.label
    label = nib.load(label_path)
    shifted = label.affine.copy()
    shifted[0, 3] += 3.0  # 3 mm off: a label exported from another grid
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj), shifted), label_path)
    save_manifest(src, root / "manifest.json")
    with pytest.raises(GeometryError) as err:
        train(tiny_config(root / "manifest.json", tmp_path / "run"), device="cpu")
    assert label_path.name in str(err.value) and "origin" in str(err.value)
    assert not (tmp_path / "run" / "last.pt").exists()
