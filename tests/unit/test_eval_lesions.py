"""Lesions: components, diameters in the world frame, and one-to-one matching on constructed cases."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.evaluation.lesions import (
    MatchStatus,
    bucket_names,
    detection_counts,
    find_lesions,
    lesion_diameters,
    match_lesions,
    size_bucket,
)

EYE = np.eye(4)


def ball(shape: tuple[int, int, int], centre: tuple[int, int, int], radius: float) -> np.ndarray:
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    return sum((g - c) ** 2 for g, c in zip(grids, centre, strict=True)) <= radius**2


def test_single_voxel_and_lines_measure_whole_voxels() -> None:
    assert lesion_diameters(np.ones((1, 1, 1), bool), EYE) == pytest.approx((1.0, 1.0), abs=1e-3)
    line_x = np.ones((5, 1, 1), bool)
    assert lesion_diameters(line_x, np.diag([2.0, 1, 1, 1])) == pytest.approx((10.0, 10.0), abs=1e-3)
    # A line along S is long in 3D but one voxel across in the axial plane.
    line_s = np.ones((1, 1, 5), bool)
    d3, axial = lesion_diameters(line_s, np.diag([1, 1, 3.0, 1]))
    assert d3 == pytest.approx(15.0) and axial == pytest.approx(1.0, abs=1e-3)


def test_sphere_diameter_is_twice_the_radius_on_anisotropic_grid() -> None:
    spacing = (0.7, 0.7, 2.5)
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip((64, 64, 24), spacing, strict=True)], indexing="ij")
    mask = sum((g - c) ** 2 for g, c in zip(grids, (22.4, 22.4, 30.0), strict=True)) <= 10.0**2
    d3, axial = lesion_diameters(mask, np.diag([*spacing, 1.0]))
    assert axial == pytest.approx(20.0, abs=0.8)
    assert d3 == pytest.approx(20.0, abs=2.5)  # 2.5 mm slices: the z extent is quantised to whole slices


def test_axial_diameter_is_taken_in_the_world_axial_plane_for_a_sagittal_acquisition() -> None:
    # The same 1 (S) x 16 (A) x 4 (R) mm slab, stored axially and stored with array axis 0 along S.
    axial_grid = np.zeros((6, 20, 3), bool)
    axial_grid[1:5, 2:18, 1] = True
    sagittal_grid = np.zeros((3, 20, 6), bool)
    sagittal_grid[1, 2:18, 1:5] = True
    to_sagittal = np.array([[0, 0, 1.0, 0], [0, 1.0, 0, 0], [1.0, 0, 0, 0], [0, 0, 0, 1]])
    axial = lesion_diameters(axial_grid, EYE)
    sagittal = lesion_diameters(sagittal_grid, to_sagittal)
    assert sagittal == pytest.approx(axial, abs=1e-3)
    assert axial[1] > 15.5  # long axis of the slab lies in the axial plane


def test_oblique_acquisition_keeps_the_diameters_close() -> None:
    theta = np.deg2rad(25)
    tilt = np.eye(4)
    tilt[:3, :3] = [[1, 0, 0], [0, np.cos(theta), -np.sin(theta)], [0, np.sin(theta), np.cos(theta)]]
    mask = ball((30, 30, 30), (15, 15, 15), 8)
    straight = lesion_diameters(mask, EYE)
    oblique = lesion_diameters(mask, tilt)
    assert oblique[0] == pytest.approx(straight[0], abs=1e-6)  # rotation does not change 3D distances
    assert oblique[1] == pytest.approx(straight[1], rel=0.03)  # planes cut the grid obliquely


def test_components_are_ordered_largest_first_and_small_ones_dropped() -> None:
    mask = np.zeros((30, 30, 30), bool)
    mask[2:4, 2:4, 2:4] = True  # 8 voxels
    mask |= ball((30, 30, 30), (18, 18, 18), 5)  # ~515 voxels
    mask[27, 27, 27] = True  # 1 voxel
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-100, 50, 10]
    image = np.full(mask.shape, 40.0)
    found = find_lesions(mask, affine, min_volume_ml=0.05, image=image)  # 8 voxels = 0.064 mL kept
    assert [les.voxels for les in found.lesions] == sorted((les.voxels for les in found.lesions), reverse=True)
    assert len(found.lesions) == 2 and len(found.dropped) == 1
    assert found.dropped[0].volume_ml == pytest.approx(0.008)
    assert set(np.unique(found.labels)) == {0, 1, 2}
    assert found.lesions[0].centroid_ras_mm == pytest.approx((-100 + 36, 50 + 36, 10 + 36))
    assert found.lesions[0].mean_intensity == pytest.approx(40.0)


def test_connectivity_decides_whether_diagonal_voxels_join() -> None:
    mask = np.zeros((4, 4, 4), bool)
    mask[1, 1, 1] = mask[2, 2, 2] = True
    assert len(find_lesions(mask, EYE, connectivity=26)) == 1
    assert len(find_lesions(mask, EYE, connectivity=6)) == 2


def _sets(ref: np.ndarray, pred: np.ndarray):
    return find_lesions(ref, EYE), find_lesions(pred, EYE)


def test_matching_counts_detected_missed_and_false_positive() -> None:
    ref = np.zeros((40, 40, 40), bool)
    pred = np.zeros_like(ref)
    ref[5:10, 5:10, 5:10] = True  # detected exactly
    pred[5:10, 5:10, 5:10] = True
    ref[20:24, 20:24, 20:24] = True  # missed
    pred[30:33, 30:33, 30:33] = True  # false positive
    matches = match_lesions(*_sets(ref, pred))
    statuses = sorted(m.status for m in matches)
    assert statuses == sorted([MatchStatus.DETECTED, MatchStatus.MISSED, MatchStatus.FALSE_POSITIVE])
    detected = next(m for m in matches if m.status == MatchStatus.DETECTED)
    assert detected.dice == pytest.approx(1.0) and detected.iou == pytest.approx(1.0)
    counts = detection_counts(matches, [5, 10, 20], size_by="3d")
    assert (counts["all"].tp, counts["all"].fn, counts["all"].fp) == (1, 1, 1)
    assert counts["all"].sensitivity == pytest.approx(0.5)
    assert counts["all"].precision == pytest.approx(0.5)
    assert counts["all"].f1 == pytest.approx(0.5)
    # 5-voxel cube: 3D diameter ~8.1 mm; 4-voxel: ~6.4 mm; 3-voxel false positive: ~4.7 mm.
    assert (counts["5-10 mm"].tp, counts["5-10 mm"].fn, counts["5-10 mm"].fp) == (1, 1, 0)
    assert (counts["<5 mm"].tp, counts["<5 mm"].fn, counts["<5 mm"].fp) == (0, 0, 1)


def test_merged_prediction_detects_one_reference_lesion_and_marks_the_other() -> None:
    ref = np.zeros((30, 30, 30), bool)
    ref[5:10, 5:10, 5:10] = True  # 125 voxels
    ref[5:10, 12:15, 5:10] = True  # 75 voxels, 2 voxels apart
    pred = np.zeros_like(ref)
    pred[5:10, 5:15, 5:10] = True  # one blob covering both (250 voxels)
    matches = match_lesions(*_sets(ref, pred))
    detected = [m for m in matches if m.status == MatchStatus.DETECTED]
    missed = [m for m in matches if m.status == MatchStatus.MISSED]
    assert len(detected) == 1 and len(missed) == 1 and len(matches) == 2
    assert detected[0].reference.voxels == 125  # the larger IoU wins: 125/250 against 75/250
    assert detected[0].iou == pytest.approx(0.5)
    assert detected[0].dice == pytest.approx(2 * 125 / (125 + 250))
    assert missed[0].note == "merged" and missed[0].reference.voxels == 75


def test_split_prediction_matches_one_piece_and_counts_the_other_as_false_positive() -> None:
    ref = np.zeros((30, 30, 30), bool)
    ref[5:10, 5:15, 5:10] = True
    pred = np.zeros_like(ref)
    pred[5:10, 5:9, 5:10] = True  # 100 voxels
    pred[5:10, 11:15, 5:10] = True  # 100 voxels
    matches = match_lesions(*_sets(ref, pred))
    assert sorted(m.status for m in matches) == sorted([MatchStatus.DETECTED, MatchStatus.FALSE_POSITIVE])
    fp = next(m for m in matches if m.status == MatchStatus.FALSE_POSITIVE)
    assert fp.note == "split"
    counts = detection_counts(matches, [5, 10, 20])
    assert (counts["all"].tp, counts["all"].fn, counts["all"].fp) == (1, 0, 1)


def test_overlap_below_min_iou_is_not_a_match() -> None:
    ref = np.zeros((30, 30, 30), bool)
    ref[5:15, 5:15, 5:15] = True  # 1000 voxels
    pred = np.zeros_like(ref)
    pred[14:20, 5:15, 5:15] = True  # overlaps by one plane: IoU 100/1500
    loose = match_lesions(*_sets(ref, pred), min_iou=0.05)
    strict = match_lesions(*_sets(ref, pred), min_iou=0.1)
    assert [m.status for m in loose] == [MatchStatus.DETECTED]
    assert sorted(m.status for m in strict) == sorted([MatchStatus.MISSED, MatchStatus.FALSE_POSITIVE])


def test_no_lesions_anywhere_gives_undefined_rates() -> None:
    empty = np.zeros((5, 5, 5), bool)
    counts = detection_counts(match_lesions(*_sets(empty, empty)), [5, 10, 20])
    assert counts["all"].sensitivity is None and counts["all"].precision is None and counts["all"].f1 is None


def test_size_buckets_are_half_open_intervals() -> None:
    assert bucket_names([5, 10, 20]) == ["<5 mm", "5-10 mm", "10-20 mm", ">=20 mm"]
    assert size_bucket(4.99, [5, 10, 20]) == "<5 mm"
    assert size_bucket(5.0, [5, 10, 20]) == "5-10 mm"
    assert size_bucket(25.0, [5, 10, 20]) == ">=20 mm"
