"""Predict-time statistics, QC flags and previews: values against straightforward loops, flags that fire
for inputs unlike the training data and stay quiet for the model's own kind of scan."""

from __future__ import annotations

import csv
import json
from itertools import product

import cc3d
import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from medseg.data.manifest import load_manifest
from medseg.data.phantom import make_phantom
from medseg.inference.predictor import Predictor
from medseg.inference.qc import guess_modality, prediction_uncertainty, ras_spacing, uncertainty_limit
from medseg.inference.runner import predict_paths
from medseg.inference.statistics import (
    assess_scan,
    class_histograms,
    class_statistics,
    count_components,
    histogram_summary,
    intensity_summary,
    merge_statistics,
    scan_statistics,
)
from medseg.models.bundle import ValidationSummary, load_bundle
from medseg.training.qc_calibration import input_limits
from tests.conftest import TINY_SPEC


def _loop_statistics(labels, image, affine, value):
    """The same numbers the slow, obvious way: a Python loop over the voxels."""
    coords, values = [], []
    for idx in product(*(range(n) for n in labels.shape)):
        if labels[idx] == value:
            coords.append(idx)
            values.append(float(image[idx]))
    world = [affine[:3, :3] @ np.array(c, dtype=float) + affine[:3, 3] for c in coords]
    lps = np.array([[-w[0], -w[1], w[2]] for w in world])
    struct = np.ones((3, 3, 3))
    _, n = ndimage.label(labels == value, structure=struct)
    volume = len(coords) * abs(np.linalg.det(affine[:3, :3])) / 1000
    return {"voxels": len(coords), "volume_ml": volume, "mean": np.mean(values), "median": np.median(values),
            "sd": np.std(values), "lo": lps.min(axis=0), "hi": lps.max(axis=0), "components": n}


@pytest.fixture
def synthetic():
    rng = np.random.default_rng(4)
    labels = np.zeros((14, 11, 9), dtype=np.uint8)
    labels[2:6, 3:7, 1:4] = 1
    labels[9:12, 1:3, 5:8] = 1  # a second component of class 1
    labels[7, 8, 2] = 1  # a third: touches nothing, not even diagonally
    labels[4:8, 7:10, 5:8] = 2
    image = rng.normal(40, 30, labels.shape).astype(np.int16)
    # An oblique, flipped, anisotropic grid, so LPS and the box corners are really tested.
    c, s = np.cos(0.3), np.sin(0.3)
    rotation = np.array([[-c, -s, 0], [s, -c, 0], [0, 0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.7, 0.9, 2.5])
    affine[:3, 3] = [12.0, -30.0, 5.0]
    return labels, image, affine


def test_class_statistics_match_a_voxel_loop(synthetic):
    labels, image, affine = synthetic
    stats = class_statistics(labels, image, affine, {0: "background", 1: "lesion", 2: "organ", 3: "absent"})
    assert [s.value for s in stats] == [1, 2, 3]
    for s in stats[:2]:
        ref = _loop_statistics(labels, image, affine, s.value)
        assert s.voxels == ref["voxels"]
        assert s.volume_ml == pytest.approx(ref["volume_ml"])
        assert s.intensity_mean == pytest.approx(ref["mean"])
        assert s.intensity_median == pytest.approx(ref["median"])
        assert s.intensity_sd == pytest.approx(ref["sd"])
        np.testing.assert_allclose(s.bbox_lps_min_mm, ref["lo"], atol=1e-9)
        np.testing.assert_allclose(s.bbox_lps_max_mm, ref["hi"], atol=1e-9)
        assert s.components == ref["components"]
    assert stats[0].components == 3
    absent = stats[2]
    assert (absent.voxels, absent.volume_ml, absent.components, absent.intensity_mean) == (0, 0.0, 0, None)


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32])
@pytest.mark.parametrize("n", [1, 2, 7, 10])
def test_intensity_summary_equals_numpy(dtype, n):
    values = (np.random.default_rng(n).normal(50, 40, n) * (1 if dtype != np.uint8 else 0) + 60).astype(dtype)
    mean, median, sd = intensity_summary(values)
    ref = values.astype(np.float64)
    assert (mean, median, sd) == pytest.approx((ref.mean(), np.median(ref), ref.std()), rel=1e-6)  # float32 median: float32 rounding


def test_fortran_ordered_scans_give_the_same_statistics(synthetic):
    labels, image, affine = synthetic
    names = {0: "background", 1: "lesion", 2: "organ"}
    c_order = class_statistics(labels, image, affine, names)
    f_order = class_statistics(np.asfortranarray(labels), np.asfortranarray(image), affine, names)
    assert c_order == f_order


def test_statistics_files_merge_runs_and_replace_a_redone_scan(synthetic, tmp_path):
    labels, image, affine = synthetic
    names = {0: "background", 1: "lesion", 2: "organ"}

    def scan(case_id, lab):
        return scan_statistics(case_id, nib.Nifti1Image(image, affine), nib.Nifti1Image(lab, affine), names, "CT")

    merge_statistics(tmp_path, [scan("b", labels)])
    merge_statistics(tmp_path, [scan("a", labels)])
    merge_statistics(tmp_path, [scan("b", np.zeros_like(labels))])  # b redone: its rows replaced
    doc = json.loads((tmp_path / "statistics.json").read_text())
    assert list(doc["cases"]) == ["a", "b"] and doc["coordinates"] == "LPS"
    with (tmp_path / "statistics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["case_id"], r["name"]) for r in rows] == [("a", "lesion"), ("a", "organ"), ("b", "lesion"), ("b", "organ")]
    assert rows[0]["intensity_units"] == "HU" and int(rows[0]["voxels"]) == int((labels == 1).sum())
    assert int(rows[2]["voxels"]) == 0
    assert not list(tmp_path.glob(".*")), "lock or temporary files left behind"


def test_uncertainty_is_normalised_entropy_over_the_predicted_foreground(monkeypatch):
    probs = torch.zeros(3, 4, 4, 4)
    probs[0] = 1.0
    assert prediction_uncertainty(probs).foreground_entropy is None  # nothing predicted
    probs[:, 0, 0, :2] = torch.tensor([0.2, 0.5, 0.3])[:, None]  # two doubtful foreground voxels
    probs[:, 1, 1, :2] = torch.tensor([0.0, 0.0, 1.0])[:, None]  # two certain ones
    u = prediction_uncertainty(probs)
    p = np.array([0.2, 0.5, 0.3])
    assert u.foreground_voxels == 4
    assert u.foreground_entropy == pytest.approx(-(p * np.log(p)).sum() / np.log(3) / 2, rel=1e-6)
    assert u.low_confidence_share == pytest.approx(0.5)
    monkeypatch.setattr("medseg.inference.qc.UNCERTAINTY_SLAB_VOXELS", 4)  # one x-plane per slab: the same summary
    sliced = prediction_uncertainty(probs)
    assert sliced.foreground_voxels == 4 and sliced.low_confidence_share == u.low_confidence_share
    assert sliced.foreground_entropy == pytest.approx(u.foreground_entropy, rel=1e-12)


def test_two_class_uncertainty_counts_ties_as_background_like_argmax():
    p1 = torch.tensor([0.5, 0.9, 0.6, 0.2, 0.7, 1.0]).reshape(1, 2, 3, 1)
    probs = torch.cat([1 - p1, p1])  # a tie (0.5), four foreground voxels, one background
    u = prediction_uncertainty(probs)
    fg = np.array([0.9, 0.6, 0.7, 1.0])
    terms = [q * np.log(q) + (1 - q) * np.log(max(1 - q, 1e-12)) for q in fg]
    assert u.foreground_voxels == int(torch.argmax(probs, dim=0).sum()) == 4
    assert u.foreground_entropy == pytest.approx(-np.sum(terms) / np.log(2) / 4, rel=1e-6)
    assert u.low_confidence_share == pytest.approx(2 / 4)  # 0.6 and 0.7 are below 0.75


@pytest.mark.parametrize("slab_voxels", [1, 7, 60, 1 << 22])
def test_components_counted_by_slabs_equal_cc3d_on_the_whole_mask(monkeypatch, slab_voxels):
    """Slabs sharing a plane, joined through it: the same 26-connected count as one cc3d pass, for masks
    from sparse dust to nearly full, with diagonal-only contacts across slab borders."""
    monkeypatch.setattr("medseg.inference.statistics.COMPONENT_SLAB_VOXELS", slab_voxels)
    rng = np.random.default_rng(slab_voxels)
    for fill in (0.05, 0.2, 0.45, 0.9):
        labels = (rng.random((13, 9, 11)) < fill).astype(np.uint8) * rng.integers(1, 3, (13, 9, 11), dtype=np.uint8)
        for value in (1, 2):
            expected = cc3d.connected_components(labels == value, connectivity=26, return_N=True)[1]
            assert count_components(labels, value) == expected
    diagonal = np.zeros((6, 3, 3), dtype=np.uint8)
    for z in range(6):
        diagonal[z, z % 2, z % 2] = 1  # touches the next plane only by a corner
    assert count_components(diagonal, 1) == 1


@pytest.mark.parametrize("dtype", [np.int16, np.uint16, np.int8, np.uint8])
def test_class_histograms_give_each_class_its_own_intensity_summary(dtype):
    rng = np.random.default_rng(3)
    info = np.iinfo(dtype)
    labels = rng.integers(0, 4, (9, 8, 7)).astype(np.uint8)
    image = rng.integers(info.min, info.max, (9, 8, 7), endpoint=True).astype(dtype)
    image[0, 0, :2] = [info.min, info.max]  # both ends of the type's range
    counts, lowest = class_histograms(labels, image)
    for value in range(4):
        summary = histogram_summary(counts[value], lowest)
        assert summary == intensity_summary(image[labels == value])  # the same float64 sums, bit for bit
    assert class_histograms(labels, image.astype(image.dtype.newbyteorder())) is None if image.itemsize > 1 else True
    assert class_histograms(labels, image.astype(np.int32)) is None  # wider types take the per-class path


def test_histogram_and_per_box_paths_give_the_same_statistics(synthetic, monkeypatch):
    labels, image, affine = synthetic
    names = {0: "background", 1: "lesion", 2: "organ", 3: "absent"}
    monkeypatch.setattr("medseg.inference.statistics.HISTOGRAM_MIN_BOX_SHARE", 0.0)  # always the joint histogram
    joint = class_statistics(labels, image, affine, names)
    monkeypatch.setattr("medseg.inference.statistics.HISTOGRAM_MIN_BOX_SHARE", 2.0)  # never
    per_box = class_statistics(labels, image, affine, names)
    assert joint == per_box and joint[0].intensity_mean is not None


def test_ras_spacing_follows_the_axes_not_the_array_order():
    affine = np.array([[0, 0, 3.0, 0], [0, -2.0, 0, 0], [0.5, 0, 0, 0], [0, 0, 0, 1]])  # array axes: S, A, R
    assert ras_spacing(affine) == [3.0, 2.0, 0.5]
    assert guess_modality([-1024, 30, 1200]) == "CT" and guess_modality([0, 250, 900]) == "MR"
    assert guess_modality([-3.0, 0.1, 3.0]) is None
    # An MR stored in large float units, with noise below zero: not air, its median is no CT's.
    assert guess_modality([-37250.0, 208077.0, 405831.0]) is None


@pytest.fixture(scope="module")
def ct_bundle(trained_run):
    return load_bundle(trained_run)


def _mr_like(shape=(35, 50, 36)):
    """A hippocampus-like MR crop: non-negative arbitrary units, 1 mm voxels."""
    rng = np.random.default_rng(0)
    return nib.Nifti1Image(rng.gamma(4.0, 60.0, shape).astype(np.float32), np.eye(4))


def test_training_sets_qc_limits_that_hold_its_own_cases(ct_bundle, phantom_manifest):
    qc = ct_bundle.spec.qc
    assert qc is not None and qc.modality == "CT"
    assert qc.max_foreground_entropy is not None and 0 < qc.max_foreground_entropy < 1
    # The validation cases' own values are kept, and the limits follow from them by the documented rule.
    entropies = qc.calibration["validation_foreground_entropy"]
    assert len(entropies) == qc.calibration["validation_cases"] > 0
    assert qc.max_foreground_entropy == pytest.approx(uncertainty_limit([v for v in entropies if v is not None]), abs=1e-4)
    manifest = load_manifest(phantom_manifest)
    assert input_limits(manifest, manifest.split("train"), progress=False).intensity_low == qc.intensity_low
    for case in manifest.cases:  # training, validation and test phantoms are all of the training kind
        image = nib.load(manifest.image_path(case))
        mask = nib.load(manifest.label_path(case))
        stats = assess_scan(case.id, image, mask, ct_bundle)
        assert not {"modality_mismatch", "spacing_outside_training", "intensity_unlike_training"} & set(stats.qc_flags)


def test_an_mr_given_to_a_ct_model_is_flagged(ct_bundle):
    image = _mr_like()
    mask = nib.Nifti1Image(np.zeros(image.shape, np.uint8), image.affine)
    stats = assess_scan("mr", image, mask, ct_bundle)
    assert {"modality_mismatch", "spacing_outside_training", "intensity_unlike_training",
            "empty_prediction"} <= set(stats.qc_flags)
    assert stats.intensity_units == "arbitrary"


def test_implausible_volume_missing_class_and_weak_model_are_flagged(ct_bundle):
    rng = np.random.default_rng(1)
    image, label, affine, _ = make_phantom(rng, TINY_SPEC)
    img = nib.Nifti1Image(image, affine)
    qc = ct_bundle.spec.qc
    huge = nib.Nifti1Image(np.ones(label.shape, np.uint8), affine)  # everything "organ"
    flags = assess_scan("huge", img, huge, ct_bundle).all_flags
    name = ct_bundle.label_names[1]
    assert f"volume_implausible:{name}" in flags
    assert qc.always_present == [1, 2]  # every training phantom has both organ and lesions
    assert f"empty:{ct_bundle.label_names[2]}" in flags
    weak = ct_bundle.spec.model_copy(update={"provenance": ct_bundle.spec.provenance.model_copy(
        update={"validation": ValidationSummary(mean_dice=0.0002)})})
    bundle = type(ct_bundle)(weak, ct_bundle.weights)
    assert "weak_model" in assess_scan("w", img, nib.Nifti1Image(label.astype(np.uint8), affine), bundle).qc_flags
    # A bundle from before QC: only the checks that need no limits.
    old = type(ct_bundle)(weak.model_copy(update={"qc": None}), ct_bundle.weights)
    flags = assess_scan("o", _mr_like(), nib.Nifti1Image(np.zeros((35, 50, 36), np.uint8), np.eye(4)), old).qc_flags
    assert flags == ["weak_model", "empty_prediction"]


def test_uncertainty_limit_rarely_flags_cases_like_the_validation_ones_but_flags_outliers():
    """34 validation cases (as the hippocampus split has), skewed like entropies are: new cases of the same
    kind exceed the limit well under 1 % of the time, where the plain 99th percentile (about the maximum
    of 34) flags about 1/35 of them; a case far outside the spread is flagged."""
    rng = np.random.default_rng(0)
    rates_limit, rates_p99 = [], []
    for _ in range(50):
        validation = rng.lognormal(-2.0, 0.3, 34)
        fresh = rng.lognormal(-2.0, 0.3, 2000)
        rates_limit.append(np.mean(fresh > uncertainty_limit(list(validation))))
        rates_p99.append(np.mean(fresh > np.percentile(validation, 99)))
    assert np.mean(rates_limit) < 0.01 < np.mean(rates_p99)
    validation = list(rng.lognormal(-2.0, 0.3, 34))
    q1, q3 = np.percentile(validation, [25, 75])
    assert q3 + 4 * (q3 - q1) > uncertainty_limit(validation) >= max(np.percentile(validation, 99), q3 + 3 * (q3 - q1))
    assert uncertainty_limit([]) is None


def test_uncertainty_flags_use_the_validation_limits(ct_bundle):
    rng = np.random.default_rng(2)
    image, label, affine, _ = make_phantom(rng, TINY_SPEC)
    img, mask = nib.Nifti1Image(image, affine), nib.Nifti1Image(label.astype(np.uint8), affine)
    from medseg.inference.qc import PredictionUncertainty

    qc = ct_bundle.spec.qc.model_copy(update={"max_foreground_entropy": 0.2, "max_low_confidence_share": 0.1})
    bundle = type(ct_bundle)(ct_bundle.spec.model_copy(update={"qc": qc}), ct_bundle.weights)
    calm = assess_scan("c", img, mask, bundle, PredictionUncertainty(100, 0.1, 0.05)).qc_flags
    doubtful = assess_scan("d", img, mask, bundle, PredictionUncertainty(100, 0.4, 0.3)).qc_flags
    assert not {"uncertain_foreground", "low_confidence"} & set(calm)
    assert {"uncertain_foreground", "low_confidence"} <= set(doubtful)


def test_predict_writes_statistics_flags_and_previews(trained_run, tmp_path):
    rng = np.random.default_rng(3)
    inp = tmp_path / "in"
    inp.mkdir()
    image, _, affine, _ = make_phantom(rng, TINY_SPEC)
    nib.save(nib.Nifti1Image(image, affine), inp / "ct.nii.gz")
    nib.save(_mr_like(), inp / "mr.nii.gz")
    out = tmp_path / "out"
    predictor = Predictor.from_checkpoint(trained_run, "cpu")
    summary = predict_paths(None, [inp], out, predictor=predictor, preview=True)
    with (out / "statistics.csv").open() as f:
        rows = list(csv.DictReader(f))
    flags = {r["case_id"]: set(r["qc_flags"].split(";")) for r in rows}
    assert "modality_mismatch" in flags["mr"] and "modality_mismatch" not in flags["ct"]
    assert "QC mr.nii.gz:" in summary.describe() and "modality_mismatch" in summary.describe()
    for case in ("ct", "mr"):
        png = (out / f"{case}.preview.png").read_bytes()
        assert png.startswith(b"\x89PNG")
    mask = np.asarray(nib.load(out / "ct.nii.gz").dataobj)
    ct_rows = [r for r in rows if r["case_id"] == "ct"]
    assert [int(r["voxels"]) for r in ct_rows] == [int((mask == k).sum()) for k in (1, 2)]

    plain = tmp_path / "plain"
    predict_paths(None, [inp], plain, predictor=predictor, statistics=False)
    # --no-statistics: the masks and their viewer label tables, no statistics files
    assert sorted(p.name for p in plain.iterdir()) == sorted(f"{case}{suffix}" for case in ("ct", "mr")
                                                             for suffix in (".nii.gz", ".ctbl", ".itksnap.txt"))
