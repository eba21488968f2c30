"""Exact values of medseg.evaluation.metrics' building blocks (added from mutation testing: each test kills
mutants the older tests let live; docs/testing.md "Mutation testing").

Distances are checked against MONAI's own functions on the *uncropped* masks, so the box medseg crops to
before calling them must lose nothing.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance, compute_surface_dice

from medseg.evaluation.metrics import PairStatus, binary_metrics, bounding_box, label_metrics, summarize


def test_bounding_box_is_the_exact_extent_of_the_true_voxels():
    mask = np.zeros((6, 7, 5), bool)
    mask[2:5, 5, 1:4] = True
    assert bounding_box(mask) == (slice(2, 5), slice(5, 6), slice(1, 4))
    single = np.zeros((6, 7, 5), bool)
    single[0, 6, 4] = True  # one voxel, at the corner: a box of one along every axis
    assert bounding_box(single) == (slice(0, 1), slice(6, 7), slice(4, 5))
    assert bounding_box(np.zeros((3, 3, 3), bool)) is None


def _blobs() -> tuple[np.ndarray, np.ndarray]:
    """Two overlapping irregular blobs reaching the last voxel of the grid (distances vary along the surface)."""
    z, y, x = np.ogrid[:20, :18, :16]
    ref = ((z - 9) ** 2 / 36 + (y - 8) ** 2 / 25 + (x - 7) ** 2 / 16) <= 1
    pred = ((z - 11) ** 2 / 49 + (y - 10) ** 2 / 16 + (x - 9) ** 2 / 25) <= 1
    pred[19, 17, 15] = True  # a stray voxel in the far corner
    return pred, ref


def _monai(pred: np.ndarray, ref: np.ndarray, spacing: list[float], tolerance: float) -> tuple[float, float, float]:
    p = torch.from_numpy(pred.astype(np.float32))[None, None]
    r = torch.from_numpy(ref.astype(np.float32))[None, None]
    hd95 = compute_hausdorff_distance(p, r, include_background=True, percentile=95, spacing=spacing).item()
    assd = compute_average_surface_distance(p, r, include_background=True, symmetric=True, spacing=spacing).item()
    nsd = compute_surface_dice(p, r, [tolerance], include_background=True, spacing=spacing, use_subvoxels=True).item()
    return hd95, assd, nsd


def test_binary_metrics_equal_monai_on_the_whole_grid_and_count_voxels_exactly():
    pred, ref = _blobs()
    spacing = [1.5, 0.8, 2.0]
    m = binary_metrics(pred, ref, spacing, nsd_tolerance_mm=1.7, voxel_ml=0.0024)
    n_pred, n_ref, both = int(pred.sum()), int(ref.sum()), int((pred & ref).sum())
    assert m.status is PairStatus.BOTH
    assert m.dice == pytest.approx(2 * both / (n_pred + n_ref), abs=0, rel=1e-12)
    hd95, assd, nsd = _monai(pred, ref, spacing, 1.7)
    assert (m.hd95_mm, m.assd_mm, m.nsd) == pytest.approx((hd95, assd, nsd), rel=1e-6)
    assert m.nsd_tolerance_mm == 1.7
    assert (m.prediction_ml, m.reference_ml) == pytest.approx((n_pred * 0.0024, n_ref * 0.0024), rel=1e-12)
    assert m.volume_difference_ml == pytest.approx((n_pred - n_ref) * 0.0024, rel=1e-12)
    record = m.as_record()
    assert record["status"] == "both_present" and record["volume_difference_ml"] == m.volume_difference_ml


def test_binary_metrics_of_a_one_voxel_shift_in_a_box():
    ref = np.zeros((10, 10, 10), bool)
    ref[2:6, 2:6, 2:6] = True
    pred = np.roll(ref, 1, axis=0)
    m = binary_metrics(pred, ref, [2.0, 1.0, 1.0], nsd_tolerance_mm=1.0, voxel_ml=0.002)
    assert m.dice == 0.75  # 48 of 64 voxels overlap: 2 * 48 / 128
    assert m.hd95_mm == pytest.approx(2.0)  # one voxel along the 2 mm axis
    assert (m.reference_ml, m.prediction_ml) == pytest.approx((0.128, 0.128))


@pytest.mark.parametrize(("pred_voxels", "ref_voxels", "status"), [
    (3, 0, PairStatus.REFERENCE_EMPTY), (0, 5, PairStatus.PREDICTION_EMPTY), (0, 0, PairStatus.BOTH_EMPTY)])
def test_the_empty_case_policy_exactly(pred_voxels, ref_voxels, status):
    pred, ref = np.zeros(20, bool), np.zeros(20, bool)
    pred[:pred_voxels], ref[10:10 + ref_voxels] = True, True
    m = binary_metrics(pred.reshape(4, 5, 1), ref.reshape(4, 5, 1), [1.0, 1.0, 1.0], 2.0, 0.5)
    assert m.status is status
    assert (m.hd95_mm, m.assd_mm) == (None, None)
    assert (m.prediction_ml, m.reference_ml) == (pred_voxels * 0.5, ref_voxels * 0.5)
    if status is PairStatus.BOTH_EMPTY:
        assert (m.dice, m.nsd) == (None, None)
    else:
        assert (m.dice, m.nsd) == (0.0, 0.0)


def test_binary_metrics_refuses_masks_of_different_shapes():
    with pytest.raises(ValueError, match="differs"):
        binary_metrics(np.zeros((2, 2, 2), bool), np.zeros((2, 2, 3), bool), [1, 1, 1], 1.0, 1.0)


def test_label_metrics_uses_the_affine_spacing_and_per_class_tolerances():
    ref = np.zeros((8, 8, 8), np.uint8)
    ref[1:4, 1:4, 1:4], ref[5:7, 5:7, 5:7] = 1, 2
    pred = np.roll(ref, 1, axis=2)
    affine = np.diag([0.5, 0.5, 3.0, 1.0])
    out = label_metrics(pred, ref, affine, [1, 2], {2: 4.5})
    assert sorted(out) == [1, 2]
    assert out[1].nsd_tolerance_mm == 2.0 and out[2].nsd_tolerance_mm == 4.5
    assert out[1].hd95_mm == pytest.approx(3.0)  # one voxel along the 3 mm axis
    assert out[1].reference_ml == pytest.approx(27 * 0.75 / 1000)


def test_summarize_counts_undefined_apart_and_gives_exact_statistics():
    s = summarize([4.0, None, 1.0, float("nan"), 3.0, 2.0])
    assert (s.n, s.n_undefined) == (4, 2)
    assert (s.mean, s.median, s.q1, s.q3, s.min, s.max) == (2.5, 2.5, 1.75, 3.25, 1.0, 4.0)
    assert s.std == pytest.approx(math.sqrt(1.25))  # population sd
    assert s.iqr == 1.5 and s.as_record()["iqr"] == 1.5
    empty = summarize([None, None])
    assert (empty.n, empty.n_undefined, empty.mean, empty.iqr) == (0, 2, None, None)
