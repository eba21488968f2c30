"""Fine-tuning: ``train.init_from`` takes the matching weights, re-initialises the output layer when the
classes differ, refuses another architecture, and ``freeze_encoder_epochs`` keeps the encoder fixed."""

from __future__ import annotations

import logging

import pytest
import torch

from medseg.config import ModelConfig
from medseg.errors import CheckpointError, ConfigError
from medseg.models.bundle import ModelBundle, load_bundle
from medseg.models.registry import build_model, encoder_parameters
from medseg.training.init_from import load_matching_weights
from medseg.training.trainer import train
from tests.conftest import tiny_config

LABELS = {0: "background", 1: "lung", 2: "nodule"}


def _source_bundle(tmp_path, phantom_manifest, labels: dict[int, str], channels=(8, 16, 32)):
    """A saved bundle of a freshly initialised tiny UNet (no training needed to test the transfer)."""
    config = tiny_config(phantom_manifest, tmp_path / "src")
    config.model.channels = list(channels)
    torch.manual_seed(7)
    net = build_model(config.model, 1, len(labels))
    bundle = ModelBundle.from_config(config, labels, 1).with_weights(net.state_dict())
    return bundle.save(tmp_path / "source.pt"), net.state_dict()


def _fresh(phantom_manifest, tmp_path, num_classes: int = 3) -> tuple[torch.nn.Module, ModelConfig]:
    arch = tiny_config(phantom_manifest, tmp_path / "dst").model
    torch.manual_seed(11)
    return build_model(arch, 1, num_classes), arch


def test_matching_weights_are_loaded_exactly(phantom_manifest, tmp_path):
    path, source = _source_bundle(tmp_path, phantom_manifest, LABELS)
    net, arch = _fresh(phantom_manifest, tmp_path)
    report = load_matching_weights(net, arch, 1, LABELS, path)
    assert report.loaded == sorted(source) and not report.reinitialised and not report.unused
    for key, tensor in net.state_dict().items():
        assert torch.equal(tensor, source[key]), key
    assert "loaded 26 tensors, skipped 0" in report.describe()


def test_the_output_layer_is_reinitialised_when_the_classes_differ(phantom_manifest, tmp_path):
    path, source = _source_bundle(tmp_path, phantom_manifest, {0: "background", 1: "lung"})
    net, arch = _fresh(phantom_manifest, tmp_path)
    fresh = {k: v.clone() for k, v in net.state_dict().items()}
    report = load_matching_weights(net, arch, 1, LABELS, path)
    assert report.classes_differ and report.reinitialised
    assert all(k.startswith("model.2.") for k in report.reinitialised)  # MONAI UNet's last up layer
    after = net.state_dict()
    for key in after:
        expected = fresh[key] if key in report.reinitialised else source[key]
        assert torch.equal(after[key], expected), key
    assert f"skipped {len(report.reinitialised)}" in report.describe()


def test_same_count_but_other_classes_also_reinitialise_the_head(phantom_manifest, tmp_path):
    path, _ = _source_bundle(tmp_path, phantom_manifest, {0: "background", 1: "liver", 2: "tumour"})
    net, arch = _fresh(phantom_manifest, tmp_path)
    report = load_matching_weights(net, arch, 1, LABELS, path)
    assert report.classes_differ and report.reinitialised


def test_another_architecture_is_refused_naming_both(phantom_manifest, tmp_path):
    path, _ = _source_bundle(tmp_path, phantom_manifest, LABELS, channels=(8, 16, 64))
    net, arch = _fresh(phantom_manifest, tmp_path)
    with pytest.raises(CheckpointError) as err:
        load_matching_weights(net, arch, 1, LABELS, path)
    message = str(err.value)
    assert "source: unet channels [8, 16, 64]" in message and "this run: unet channels [8, 16, 32]" in message


def test_freezing_needs_init_from(phantom_manifest, tmp_path):
    with pytest.raises(ConfigError, match="train.freeze_encoder_epochs"):
        tiny_config(phantom_manifest, tmp_path / "run", freeze_encoder_epochs=1)


def test_fine_tuning_run_keeps_the_frozen_encoder_and_records_its_origin(phantom_manifest, tmp_path, caplog):
    path, source = _source_bundle(tmp_path, phantom_manifest, LABELS)
    config = tiny_config(phantom_manifest, tmp_path / "ft", epochs=1, iterations_per_epoch=2,
                         init_from=str(path), freeze_encoder_epochs=1)
    with caplog.at_level(logging.INFO):
        result = train(config, device="cpu")
    assert "init_from" in caplog.text and "loaded 26 tensors, skipped 0" in caplog.text
    tuned = load_bundle(result.run_dir / "last.pt")
    encoder = {k for k, _ in encoder_parameters(build_model(config.model, 1, 3), "unet")}
    assert encoder and all(torch.equal(tuned.weights[k], source[k]) for k in encoder)
    decoder = [k for k in source if k not in encoder and k.endswith("weight") and source[k].ndim > 1]
    assert any(not torch.equal(tuned.weights[k], source[k]) for k in decoder)
    record = tuned.spec.provenance.init_from
    assert record is not None and record.source == "source.pt" and record.loaded == 26
    assert record.source_weights_sha256 == load_bundle(path).spec.provenance.weights_sha256
