"""The model bundle: what training writes is what prediction, evaluation and export read."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medseg import __version__
from medseg.data.manifest import load_manifest
from medseg.errors import CheckpointError
from medseg.inference.predictor import Predictor
from medseg.models.bundle import (
    LEGACY_CHECKPOINT_FORMAT,
    ModelBundle,
    load_bundle,
    read_bundle_spec,
    weights_sha256,
)


def test_a_trained_run_holds_a_complete_bundle(trained_run, phantom_manifest):
    bundle = load_bundle(trained_run)
    spec = bundle.spec
    assert bundle.path == trained_run / "best.pt"
    assert spec.network.in_channels == 1 and spec.network.num_classes == 3
    assert spec.network.architecture.name == "unet" and not spec.network.deep_supervision
    assert [(label.value, label.name) for label in spec.labels] == [(0, "background"), (1, "lung"), (2, "nodule")]
    assert len({label.color for label in spec.labels}) == 3  # every class its own colour
    assert spec.preprocessing.spacing == (4.0, 4.0, 5.0)
    assert spec.inference.roi_size == [32, 32, 16] and spec.inference.overlap == 0.25
    assert spec.inference.precision == "float16"  # the tiny config keeps train.amp's default: AMP on CUDA
    prov = spec.provenance
    assert prov.versions["medseg"] == __version__ and prov.versions["torch"] == torch.__version__
    assert prov.weights_sha256 == weights_sha256(bundle.weights) and len(prov.weights_sha256) == 64
    manifest = load_manifest(phantom_manifest)
    assert prov.data.manifest_name == manifest.name
    assert (prov.data.train_cases, prov.data.val_cases) == (len(manifest.split("train")), len(manifest.split("val")))
    assert len(prov.data.manifest_sha256 or "") == 64
    best_epoch = bundle.training_state["best_epoch"]
    assert prov.validation.epoch == best_epoch and 0 < prov.validation.mean_dice <= 1
    assert set(prov.validation.per_class_dice) == {"lung", "nodule"}
    assert bundle.config.name == "tiny3d"
    # last.pt is a bundle too, with what resuming needs
    last = load_bundle(trained_run / "last.pt")
    assert {"optimizer_state", "scheduler_state", "history"} <= set(last.training_state)
    assert "optimizer_state" not in bundle.training_state


def test_edited_weights_are_refused_by_their_checksum(trained_run, tmp_path):
    bundle = load_bundle(trained_run)
    tampered = {k: v.clone() for k, v in bundle.weights.items()}
    key = next(k for k, v in tampered.items() if v.is_floating_point())
    tampered[key].view(-1)[0] += 1.0
    ModelBundle(bundle.spec, tampered).save(tmp_path / "tampered.pt")
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_bundle(tmp_path / "tampered.pt")
    assert load_bundle(tmp_path / "tampered.pt", verify=False).weights[key].view(-1)[0] == tampered[key].view(-1)[0]


def test_checksum_ignores_memory_layout_but_not_values():
    w = {"conv": torch.randn(2, 3, 4, 4, 4)}
    channels_last = {"conv": w["conv"].contiguous(memory_format=torch.channels_last_3d)}
    assert weights_sha256(w) == weights_sha256(channels_last)
    assert weights_sha256(w) != weights_sha256({"conv": w["conv"] * 2})


def test_a_run_folder_from_before_the_bundle_still_predicts_the_same(trained_run, tmp_path):
    """A ``medseg-checkpoint-1`` file (the format before bundles) loads, with its bundle derived from its config."""
    bundle = load_bundle(trained_run)
    legacy = {"format": LEGACY_CHECKPOINT_FORMAT, "config": bundle.spec.provenance.config,
              "label_names": bundle.label_names, "in_channels": 1, "model_state": bundle.weights,
              "epoch": 3, "best_dice": 0.5, "best_epoch": 4}
    old_run = tmp_path / "old_run"
    old_run.mkdir()
    torch.save(legacy, old_run / "best.pt")
    old = load_bundle(old_run)
    assert read_bundle_spec(old_run) == old.spec
    assert old.label_names == bundle.label_names and old.spec.network == bundle.spec.network
    assert old.spec.preprocessing == bundle.spec.preprocessing
    assert old.spec.provenance.validation.mean_dice == 0.5 and old.training_state["epoch"] == 3
    torch.manual_seed(0)
    x = torch.randn(1, 1, 32, 32, 16)
    new_probs = Predictor.from_checkpoint(trained_run, "cpu").probabilities(x)
    old_probs = Predictor.from_checkpoint(old_run, "cpu").probabilities(x)
    assert torch.equal(new_probs, old_probs)


@pytest.mark.parametrize("content, message", [
    (b"not a torch file", "not a readable medseg model"),
    ({"format": "something-else"}, "not a medseg model"),
    ({"format": "medseg-bundle-1", "model_state": {}, "bundle": {"name": "x"}}, "invalid model bundle"),
])
def test_foreign_files_are_refused_with_a_message(tmp_path, content, message):
    path = tmp_path / "model.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(CheckpointError, match=message):
        load_bundle(path)
    with pytest.raises(CheckpointError, match=message):
        read_bundle_spec(path)


def test_the_spec_alone_is_read_without_the_weights(trained_run, tmp_path):
    """Planning (input channels, labels) reads the spec; the weights stay on disk (memory-mapped), so even a
    bundle whose weights no longer match their checksum gives its spec, and loading it still refuses it."""
    bundle = load_bundle(trained_run)
    assert read_bundle_spec(trained_run) == bundle.spec
    tampered = {k: v + 1 if v.is_floating_point() else v for k, v in bundle.weights.items()}
    ModelBundle(bundle.spec, tampered).save(tmp_path / "tampered.pt")
    assert read_bundle_spec(tmp_path / "tampered.pt").network.in_channels == bundle.spec.network.in_channels
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_bundle(tmp_path / "tampered.pt")


def test_inference_never_reads_the_training_section(trained_run):
    """Precision comes from the bundle's inference settings, not the embedded config's train.amp."""
    bundle = load_bundle(trained_run)
    changed = bundle.spec.provenance.config | {"train": {**bundle.spec.provenance.config["train"], "amp": False}}
    spec = bundle.spec.model_copy(update={"provenance": bundle.spec.provenance.model_copy(update={"config": changed})})
    predictor = Predictor(ModelBundle(spec, bundle.weights).build_network(), ModelBundle(spec, bundle.weights),
                          torch.device("cpu"))
    assert predictor.settings.precision == "float16"
    assert np.array_equal(predictor.settings.roi_size, bundle.inference.roi_size)
