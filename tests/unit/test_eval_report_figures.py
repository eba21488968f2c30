"""What report.html shows a reader: viewer slice indices and LPS mm, windows, colours, lesion-centred
overlays, the short axis and the fitted Dice axis; on small synthetic volumes."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import to_rgb
from matplotlib.image import imread

from medseg.evaluation.figures import CaseView, case_overlay, dice_axis_limits, lesion_overlay
from medseg.evaluation.lesions import find_lesions, measure_diameters, short_axis_length
from medseg.evaluation.results import CaseResult
from medseg.io.display import (
    PREDICTION_COLOR,
    REFERENCE_COLOR,
    DisplayGrid,
    choose_window,
    looks_like_ct,
    lps_mm,
)

# An LPS-stored CT (like most DICOM conversions): i runs to the patient's left, j to the back, k up.
LPS_AFFINE = np.array([[-0.5, 0, 0, 100.0], [0, -0.8, 0, 50.0], [0, 0, 2.0, -300.0], [0, 0, 0, 1]])


def test_viewer_voxel_and_lps_mm_on_an_lps_stored_volume_are_exact() -> None:
    grid = DisplayGrid(LPS_AFFINE, (40, 30, 10))
    assert grid.shape == (40, 30, 10) and grid.spacing == (0.5, 0.8, 2.0)
    # File voxel (3, 7, 4): the drawing array is flipped along i and j (RAS), the file index is not.
    display = grid.display_index((3, 7, 4))
    assert display == (36, 22, 4)
    assert grid.file_index(display) == (3, 7, 4)
    # RAS = (-0.5*3 + 100, -0.8*7 + 50, 2*4 - 300) = (98.5, 44.4, -292); LPS negates x and y.
    assert grid.lps(display) == pytest.approx((-98.5, -44.4, -292.0))
    assert lps_mm(LPS_AFFINE, (3, 7, 4)) == pytest.approx((-98.5, -44.4, -292.0))
    assert grid.slice_label(2, 4) == "k = 4 of 10"
    assert grid.slice_label(1, display[1]) == "j = 7 of 30"
    assert grid.slice_label(0, display[0]) == "i = 3 of 40"


def test_viewer_axis_names_follow_the_file_for_a_sagittal_acquisition() -> None:
    # Array axis 0 along S, axis 2 along R: an axial picture cuts the file's i axis.
    affine = np.array([[0, 0, 1.0, 0], [0, 1.0, 0, 0], [3.0, 0, 0, 0], [0, 0, 0, 1]])
    grid = DisplayGrid(affine, (8, 20, 30))
    assert grid.shape == (30, 20, 8) and grid.spacing == (1.0, 1.0, 3.0)
    assert grid.slice_label(2, 5) == "i = 5 of 8"
    assert grid.file_index(grid.display_index((5, 6, 7))) == (5, 6, 7)


def test_lesion_centroid_is_given_as_file_voxel_and_lps() -> None:
    mask = np.zeros((40, 30, 10), bool)
    mask[2:5, 6:9, 3:6] = True  # centre voxel (3, 7, 4)
    lesion = find_lesions(mask, LPS_AFFINE).lesions[0]
    assert lesion.viewer_voxel == (3, 7, 4)
    assert lesion.centroid_lps_mm == pytest.approx((-98.5, -44.4, -292.0))
    record = lesion.as_record()
    assert record["centroid_voxel"] == [3, 7, 4] and record["centroid_lps_mm"] == pytest.approx([-98.5, -44.4, -292.0])


def test_short_axis_of_an_ellipse() -> None:
    # An exact ellipse contour (semi-axes 15 and 6 mm): long axis 30, short axis 12.
    t = np.linspace(0, 2 * np.pi, 721)[:-1]
    points = np.c_[15 * np.cos(t), 6 * np.sin(t)]
    segments = np.stack([points, np.roll(points, -1, axis=0)], axis=1)
    assert short_axis_length(segments, np.array([-15.0, 0]), np.array([15.0, 0])) == pytest.approx(12.0, abs=1e-6)
    # The same ellipse voxelised at 0.5 mm and turned 30 degrees in the axial plane: within one voxel edge.
    spacing = 0.5
    x, y = np.meshgrid((np.arange(100) - 50) * spacing, (np.arange(100) - 50) * spacing, indexing="ij")
    theta = np.deg2rad(30)
    u, v = x * np.cos(theta) + y * np.sin(theta), -x * np.sin(theta) + y * np.cos(theta)
    mask = np.repeat(((u / 15) ** 2 + (v / 6) ** 2 <= 1)[:, :, None], 3, axis=2)
    diameters = measure_diameters(mask, np.diag([spacing, spacing, 2.0, 1.0]))
    assert diameters.axial_mm == pytest.approx(30.0, abs=spacing)
    assert diameters.short_axis_mm == pytest.approx(12.0, abs=spacing)


def test_dice_axis_is_fitted_to_the_values() -> None:
    lo, hi = dice_axis_limits([0.86, 0.9, 0.93, None])
    assert 0.75 < lo < 0.86 and 0.93 < hi <= 1.0
    lo, hi = dice_axis_limits([0.999, 1.0])
    assert 1.0 < hi <= 1.01 and lo <= 0.9  # a perfect case is drawn inside the frame, the axis stops there
    assert -0.01 <= dice_axis_limits([0.0, 0.5])[0] < 0.0
    assert dice_axis_limits([]) == (0.0, 1.0)


def test_ct_gets_a_named_hu_window_and_mr_a_named_percentile_window() -> None:
    rng = np.random.default_rng(0)
    ct = np.full((20, 20, 5), -1000.0)
    ct[5:15, 5:15] = 40 + rng.normal(0, 10, (10, 10, 5))
    assert looks_like_ct(ct)
    assert choose_window(ct, True).name == "CT lung window W 1500 / L -600 HU"
    soft = choose_window(ct[6:14, 6:14], True)
    assert (soft.low, soft.high) == (-160.0, 240.0) and "soft tissue" in soft.name
    mr = rng.uniform(0, 800, (20, 20, 5))
    assert not looks_like_ct(mr)
    assert "percentile" in choose_window(mr, False).name


def _pixels_of(png_b64: str, color: str, tolerance: float = 0.12) -> np.ndarray:
    image = imread(io.BytesIO(base64.b64decode(png_b64)), format="png")[..., :3]
    return np.all(np.abs(image - np.asarray(to_rgb(color))) < tolerance, axis=-1)


def test_lesion_overlay_is_centred_on_a_small_lesion_far_from_the_big_structure(tmp_path: Path) -> None:
    shape = (64, 64, 20)
    reference = np.zeros(shape, np.uint8)
    reference[4:30, 4:30, 2:18] = 1  # the big structure every case overlay is centred on
    reference[55:57, 50:52, 15] = 2  # a small lesion far away, on one slice only
    prediction = np.where(reference == 1, 1, 0).astype(np.uint8)  # the lesion is missed
    image = np.full(shape, -1000.0, np.float32)
    image[2:62, 2:62, :] = 40.0
    grid = DisplayGrid(LPS_AFFINE, shape)
    view = CaseView("c", grid, grid.reorient(reference), grid.reorient(prediction), grid.reorient(image), True)
    lesion = find_lesions(reference == 2, LPS_AFFINE).lesions[0]

    overlay = lesion_overlay(view, lesion, 2, "reference", "missed", {1: "organ", 2: "nodule"})
    i, j, k = overlay.centre_voxel
    lesion_voxels = np.argwhere(reference == 2)
    assert k == 15 and 55 <= i <= 56 and 50 <= j <= 51
    assert any((v == (i, j, k)).all() for v in lesion_voxels)  # every picture plane passes through the lesion
    assert overlay.slices["axial"] == "k = 15 of 20"
    assert overlay.centre_lps_mm == pytest.approx(lps_mm(LPS_AFFINE, (i, j, k)))
    assert "soft tissue" in overlay.window
    assert _pixels_of(overlay.png, REFERENCE_COLOR).sum() > 20  # the lesion outline and the legend swatch

    case = CaseResult("c", tmp_path / "r.nii.gz", tmp_path / "p.nii.gz", None, (0.5, 0.8, 2.0), {})
    whole = case_overlay(case, {1: "organ", 2: "nodule"}, view=view)
    assert whole.centre_voxel[2] != 15  # the case picture shows the big structure's planes, not the lesion's
    assert _pixels_of(whole.png, PREDICTION_COLOR).sum() > 20


def test_report_footer_carries_definitions_and_links_only_to_the_web(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata
    from email.message import Message

    from medseg.evaluation import reports

    def fake_metadata(urls: list[str]):
        message = Message()
        for url in urls:
            message["Project-URL"] = url
        return lambda name: message

    result = type("R", (), {"lesion_summary": {}})()
    monkeypatch.setattr(importlib.metadata, "metadata", fake_metadata([]))
    footer = reports._footer(result)  # type: ignore[arg-type]
    assert "<dt>Dice</dt>" in footer and "LPS" in footer and "href" not in footer  # no link a pip user cannot follow
    monkeypatch.setattr(importlib.metadata, "metadata", fake_metadata(["Documentation, https://example.org/medseg"]))
    assert "<a href='https://example.org/medseg'>" in reports._footer(result)  # type: ignore[arg-type]
