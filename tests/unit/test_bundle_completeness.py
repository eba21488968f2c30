"""A bundle says what its model is for: the modality it was trained on and its lesion classes, stored when
trained and derived for bundles written before, read in one place (statistics and QC ask it)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from medseg.config import config_from_dict
from medseg.inference.statistics import assess_scan
from medseg.models.bundle import ModelBundle, QCThresholds, load_bundle, model_lesion_classes, model_modality
from medseg.models.registry import build_model
from tests.conftest import tiny_config


def _bundle(tmp_path, kind: str = "ct_window", modality: str | None = None, lesion_classes=(2,)) -> ModelBundle:
    base = tiny_config(tmp_path / "absent.json", tmp_path / "run").model_dump(mode="json")
    base["preprocessing"]["intensity"] = {"kind": kind} if kind != "ct_window" else base["preprocessing"]["intensity"]
    base["evaluate"] = {"lesion_classes": list(lesion_classes)}
    config = config_from_dict(base, source="test")
    weights = build_model(config.model, 1, 3).state_dict()
    bundle = ModelBundle.from_config(config, {0: "background", 1: "lung", 2: "nodule"}, 1, modality=modality)
    return bundle.with_weights(weights)


def _as_old_file(bundle: ModelBundle, path) -> None:
    """Save ``bundle`` as a version without the two fields would have written it."""
    bundle.save(path)
    raw = torch.load(path, weights_only=True)
    for key in ("modality", "lesion_classes"):
        del raw["bundle"][key]
    torch.save(raw, path)


def test_a_new_bundle_carries_its_modality_and_lesion_classes(tmp_path):
    _bundle(tmp_path, kind="zscore", modality="other", lesion_classes=[1, 2]).save(tmp_path / "new.pt")
    loaded = load_bundle(tmp_path / "new.pt")
    assert (loaded.spec.modality, loaded.spec.lesion_classes) == ("other", [1, 2])
    assert (loaded.modality, loaded.lesion_classes) == ("other", [1, 2])


@pytest.mark.parametrize(("kind", "qc_modality", "expected"), [
    ("ct_window", None, "CT"), ("ct_zscore", None, "CT"), ("zscore", None, "MR"), ("none", None, None),
    ("zscore", "other", "other"),  # a QC section (calibrated from the manifest) knows better than the rule
])
def test_an_old_bundle_gets_derived_values(tmp_path, kind, qc_modality, expected):
    bundle = _bundle(tmp_path, kind=kind)
    if qc_modality:
        bundle = ModelBundle(bundle.spec.model_copy(update={"qc": QCThresholds(modality=qc_modality)}), bundle.weights)
    _as_old_file(bundle, tmp_path / "old.pt")
    old = load_bundle(tmp_path / "old.pt")
    assert old.spec.modality is None and old.spec.lesion_classes is None
    assert model_modality(old) == expected and model_modality(old.spec) == expected
    assert model_lesion_classes(old) == [2]  # from the embedded config's evaluate section


def test_statistics_and_qc_ask_the_bundle_for_the_modality(tmp_path):
    """A stored modality decides the intensity units and the modality check, not the intensity rule."""
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    ct = nib.Nifti1Image(np.full((8, 8, 8), -1000.0, np.float32), affine)
    ct.dataobj[2:6, 2:6, 2:6] = 40.0
    mask = nib.Nifti1Image(np.zeros((8, 8, 8), np.uint8), affine)
    qc = QCThresholds()  # no modality of its own: the bundle's is used
    mr_model = _bundle(tmp_path, kind="zscore", modality="MR")
    mr_model = ModelBundle(mr_model.spec.model_copy(update={"qc": qc}), mr_model.weights)
    stats = assess_scan("case", ct, mask, mr_model)
    assert "modality_mismatch" in stats.qc_flags and stats.intensity_units == "HU"
    ct_model = _bundle(tmp_path, kind="zscore", modality="CT")
    ct_model = ModelBundle(ct_model.spec.model_copy(update={"qc": qc}), ct_model.weights)
    stats = assess_scan("case", ct, mask, ct_model)
    assert "modality_mismatch" not in stats.qc_flags and stats.intensity_units == "HU"
