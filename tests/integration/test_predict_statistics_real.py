"""Predict-time statistics and QC flags on real scans: the lung CT and hippocampus MR cases.

Statistics are checked against SimpleITK (its own reader, label statistics, connected components and
index-to-LPS transform); the QC flags against a CT model given the hippocampus MR. Uses ../shared/data,
skipped when it is absent.
"""

from __future__ import annotations

import csv

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medseg.data.manifest import load_manifest
from medseg.inference.predictor import Predictor
from medseg.inference.runner import predict_paths
from medseg.inference.statistics import assess_scan, class_statistics
from medseg.models.bundle import ModelBundle
from medseg.models.registry import build_model
from medseg.training.qc_calibration import input_limits
from tests.conftest import REPO_ROOT, tiny_config

INPUT_FLAGS = {"modality_mismatch", "spacing_outside_training", "intensity_unlike_training"}


def _sitk_reference(image_path, label_path, value):
    """Count, volume, mean, sd, median, LPS box of voxel centres and 26-connected components, by SimpleITK."""
    image = sitk.Cast(sitk.ReadImage(str(image_path)), sitk.sitkFloat64)
    label = sitk.Cast(sitk.ReadImage(str(label_path)), sitk.sitkUInt8)
    binary = sitk.Equal(label, value)
    shape = sitk.LabelShapeStatisticsImageFilter()
    shape.Execute(binary)
    stats = sitk.LabelStatisticsImageFilter()
    stats.Execute(image, binary)
    x0, y0, z0, nx, ny, nz = shape.GetBoundingBox(1)
    corners = [image.TransformIndexToPhysicalPoint((x, y, z)) for x in (x0, x0 + nx - 1)
               for y in (y0, y0 + ny - 1) for z in (z0, z0 + nz - 1)]
    n = shape.GetNumberOfPixels(1)
    values = sitk.GetArrayFromImage(image)[sitk.GetArrayFromImage(binary) > 0]
    components = sitk.ConnectedComponentImageFilter()
    components.FullyConnectedOn()
    components.Execute(binary)
    return {"voxels": n, "volume_ml": shape.GetPhysicalSize(1) / 1000, "mean": stats.GetMean(1),
            "sd": stats.GetSigma(1) * np.sqrt((n - 1) / n),  # SimpleITK's sigma divides by n - 1
            "median": float(np.median(values)), "lo": np.min(corners, axis=0), "hi": np.max(corners, axis=0),
            "components": components.GetObjectCount()}


def _check(image_path, label_path, names):
    image, label = nib.load(image_path), nib.load(label_path)
    stats = class_statistics(np.asanyarray(label.dataobj), np.asanyarray(image.dataobj), label.affine, names)
    for s in stats:
        ref = _sitk_reference(image_path, label_path, s.value)
        assert s.voxels == ref["voxels"]
        assert s.volume_ml == pytest.approx(ref["volume_ml"], rel=1e-5)
        assert s.intensity_mean == pytest.approx(ref["mean"], rel=1e-6)
        assert s.intensity_sd == pytest.approx(ref["sd"], rel=1e-6)
        assert s.intensity_median == pytest.approx(ref["median"])
        np.testing.assert_allclose(s.bbox_lps_min_mm, ref["lo"], atol=1e-3)
        np.testing.assert_allclose(s.bbox_lps_max_mm, ref["hi"], atol=1e-3)
        assert s.components == ref["components"]
    return stats


def test_lung_ct_lesion_statistics_match_simpleitk(shared_data):
    folder = shared_data / "lung_ct"
    (lesion,) = _check(folder / "lung1_ct.nii.gz", folder / "lung1_lesion.nii.gz", {0: "background", 1: "lesion"})
    assert lesion.volume_ml == pytest.approx(1.36, abs=0.01)  # as the data README says
    assert -300 < lesion.intensity_mean < 200  # a soft-tissue lesion, in HU


@pytest.mark.parametrize("case", ["hippocampus_001", "hippocampus_003"])
def test_hippocampus_statistics_match_simpleitk(shared_data, case):
    folder = shared_data / "hippocampus"
    stats = _check(folder / "images" / f"{case}.nii.gz", folder / "labels" / f"{case}.nii.gz",
                   {0: "background", 1: "anterior", 2: "posterior"})
    assert all(s.voxels > 0 for s in stats)


@pytest.fixture(scope="module")
def ct_model(shared_data, tmp_path_factory):
    """A CT model with the QC limits of the lung CT manifest. Its weights are untrained: the input flags
    (modality, spacing, intensities) do not depend on what the network learnt."""
    manifest_path = REPO_ROOT / "data_manifests" / "lung_ct.json"
    manifest = load_manifest(manifest_path)
    config = tiny_config(manifest_path, tmp_path_factory.mktemp("ct_model"))
    weights = build_model(config.model, 1, manifest.num_classes).state_dict()
    bundle = ModelBundle.from_config(config, dict(manifest.labels), 1, weights=weights)
    qc = input_limits(manifest, manifest.split("train"), progress=False)
    bundle = ModelBundle(bundle.spec.model_copy(update={"qc": qc}), weights)
    path = bundle.with_weights(weights).save(tmp_path_factory.mktemp("ct_bundle") / "best.pt")
    return path


def test_hippocampus_mr_given_to_a_ct_model_is_flagged(shared_data, ct_model, tmp_path):
    mr = shared_data / "hippocampus" / "images" / "hippocampus_001.nii.gz"
    ct = shared_data / "lung_ct" / "lung1_ct.nii.gz"
    predictor = Predictor.from_checkpoint(ct_model, "cpu")
    summary = predict_paths(None, [mr, ct], tmp_path, predictor=predictor)
    assert not summary.failed, summary.describe()
    with (tmp_path / "statistics.csv").open() as f:
        flags = {r["case_id"]: set(r["qc_flags"].split(";")) for r in csv.DictReader(f)}
    assert INPUT_FLAGS <= flags["hippocampus_001"]
    assert not INPUT_FLAGS & flags["lung1_ct"]


def test_every_hippocampus_case_looks_unlike_ct(shared_data, ct_model):
    """Not one of the 208 MR cases passes as the CT model's kind of input."""
    from medseg.models.bundle import load_bundle

    bundle = load_bundle(ct_model)
    images = sorted((shared_data / "hippocampus" / "images").glob("*.nii.gz"))
    missed = []
    for path in images:
        image = nib.load(path)
        mask = nib.Nifti1Image(np.zeros(image.shape, np.uint8), image.affine)
        if "modality_mismatch" not in assess_scan(path.name, image, mask, bundle).qc_flags:
            missed.append(path.name)
    assert not missed
