"""Per-class metrics: known answers on spheres and boxes (also anisotropic), and the empty-case policy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medseg.evaluation.metrics import (
    PairStatus,
    binary_metrics,
    label_metrics,
    summarize,
    voxel_spacing,
    voxel_volume_ml,
)


def sphere(shape: tuple[int, int, int], centre_mm: tuple[float, float, float], radius_mm: float,
           spacing: tuple[float, float, float]) -> np.ndarray:
    """Voxels whose centre lies within ``radius_mm`` of ``centre_mm`` (grid origin at voxel 0)."""
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing, strict=True)], indexing="ij")
    return sum((g - c) ** 2 for g, c in zip(grids, centre_mm, strict=True)) <= radius_mm**2


def sphere_overlap_dice(r: float, d: float) -> float:
    """Dice of two spheres of radius r whose centres are d apart (lens volume formula)."""
    lens = math.pi * (4 * r + d) * (2 * r - d) ** 2 / 12
    return 2 * lens / (2 * 4 / 3 * math.pi * r**3)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.8, 0.8, 2.5)])
def test_two_offset_spheres_give_known_dice_hd95_and_volume(spacing: tuple[float, float, float]) -> None:
    r, offset = 12.0, 3.0
    shape = tuple(int(60 / s) for s in spacing)
    ref = sphere(shape, (30, 30, 30), r, spacing)
    pred = sphere(shape, (30 + offset, 30, 30), r, spacing)
    m = binary_metrics(pred, ref, spacing, nsd_tolerance_mm=2.0, voxel_ml=float(np.prod(spacing)) / 1000)
    assert m.status == PairStatus.BOTH
    assert m.reference_ml == pytest.approx(4 / 3 * math.pi * r**3 / 1000, rel=0.03)
    assert m.dice == pytest.approx(sphere_overlap_dice(r, offset), abs=0.02)
    # Points on the far sides of the spheres are `offset` apart; HD95 cannot exceed it by more than a voxel.
    assert offset - max(spacing) <= m.hd95_mm <= offset + max(spacing) / 2
    assert 0 < m.assd_mm < m.hd95_mm
    assert 0 < m.nsd < 1


def test_one_slice_shift_on_anisotropic_grid_is_measured_in_mm() -> None:
    spacing = (1.0, 1.0, 3.0)
    ref = np.zeros((20, 20, 20), bool)
    ref[5:15, 5:15, 5:15] = True
    along_z = np.roll(ref, 1, axis=2)
    along_x = np.roll(ref, 1, axis=0)
    mz = binary_metrics(along_z, ref, spacing, 2.0, 0.003)
    mx = binary_metrics(along_x, ref, spacing, 2.0, 0.003)
    assert mz.hd95_mm == pytest.approx(3.0)
    assert mx.hd95_mm == pytest.approx(1.0)
    assert mz.dice == pytest.approx(0.9) and mx.dice == pytest.approx(0.9)
    # A 3 mm shift is outside a 2 mm tolerance on the shifted faces; a 1 mm one within it everywhere.
    assert mz.nsd < 1.0
    assert mx.nsd == pytest.approx(1.0)
    assert mz.reference_ml == pytest.approx(1000 * 0.003)


def test_identical_masks_are_perfect() -> None:
    mask = np.zeros((10, 10, 10), bool)
    mask[2:6, 3:7, 4:8] = True
    m = binary_metrics(mask, mask, (1, 1, 1), 1.0, 0.001)
    assert (m.dice, m.hd95_mm, m.assd_mm, m.nsd, m.volume_difference_ml) == (1.0, 0.0, 0.0, 1.0, 0.0)


def test_both_empty_is_undefined_not_zero_or_one() -> None:
    empty = np.zeros((5, 5, 5), bool)
    m = binary_metrics(empty, empty, (1, 1, 1), 1.0, 0.001)
    assert m.status == PairStatus.BOTH_EMPTY
    assert (m.dice, m.hd95_mm, m.assd_mm, m.nsd) == (None, None, None, None)
    assert (m.reference_ml, m.prediction_ml) == (0.0, 0.0)


@pytest.mark.parametrize("which", ["reference", "prediction"])
def test_one_side_empty_gives_dice_zero_and_undefined_distances(which: str) -> None:
    mask = np.zeros((5, 5, 5), bool)
    mask[1:3, 1:3, 1:3] = True
    empty = np.zeros_like(mask)
    pred, ref = (mask, empty) if which == "reference" else (empty, mask)
    m = binary_metrics(pred, ref, (2, 2, 2), 1.0, 0.008)
    assert m.status == (PairStatus.REFERENCE_EMPTY if which == "reference" else PairStatus.PREDICTION_EMPTY)
    assert m.dice == 0.0 and m.nsd == 0.0
    assert m.hd95_mm is None and m.assd_mm is None
    assert max(m.reference_ml, m.prediction_ml) == pytest.approx(8 * 0.008)


def test_summary_counts_undefined_values_apart() -> None:
    stats = summarize([1.0, None, 0.5, float("nan"), 0.0])
    assert (stats.n, stats.n_undefined) == (3, 2)
    assert stats.mean == pytest.approx(0.5)
    assert stats.median == pytest.approx(0.5)
    assert stats.iqr == pytest.approx(0.5)
    nothing = summarize([None, None])
    assert nothing.n == 0 and nothing.n_undefined == 2 and nothing.mean is None


def test_label_maps_are_scored_per_class_with_per_class_tolerance() -> None:
    ref = np.zeros((12, 12, 12), np.int32)
    ref[2:6, 2:6, 2:6] = 1
    ref[7:10, 7:10, 7:10] = 2
    pred = ref.copy()
    pred[pred == 2] = 0
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    out = label_metrics(pred, ref, affine, [1, 2, 3], {1: 0.5}, default_tolerance_mm=4.0)
    assert out[1].dice == 1.0 and out[1].nsd_tolerance_mm == 0.5
    assert out[2].status == PairStatus.PREDICTION_EMPTY and out[2].nsd_tolerance_mm == 4.0
    assert out[3].status == PairStatus.BOTH_EMPTY
    assert out[2].reference_ml == pytest.approx(27 * 8 / 1000)


def test_spacing_and_voxel_volume_come_from_the_affine_even_when_rotated() -> None:
    theta = np.deg2rad(30)
    rotation = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.5, 0.7, 3.0])
    assert voxel_spacing(affine) == pytest.approx((0.5, 0.7, 3.0))
    assert voxel_volume_ml(affine) == pytest.approx(0.5 * 0.7 * 3.0 / 1000)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), spacing=st.tuples(*[st.sampled_from([0.5, 1.0, 2.5])] * 3))
def test_metrics_are_symmetric_and_bounded_on_random_blobs(seed: int, spacing: tuple[float, float, float]) -> None:
    rng = np.random.default_rng(seed)
    a = rng.random((10, 10, 6)) < 0.3
    b = rng.random((10, 10, 6)) < 0.3
    ab = binary_metrics(a, b, spacing, 1.0, 0.001)
    ba = binary_metrics(b, a, spacing, 1.0, 0.001)
    if ab.status != PairStatus.BOTH:
        return
    assert ab.dice == pytest.approx(ba.dice) and 0 <= ab.dice <= 1
    assert ab.hd95_mm == pytest.approx(ba.hd95_mm) and ab.assd_mm == pytest.approx(ba.assd_mm)
    assert ab.nsd == pytest.approx(ba.nsd) and 0 <= ab.nsd <= 1
    assert ab.volume_difference_ml == pytest.approx(-ba.volume_difference_ml)
