"""DICOM series reading on small synthetic series: sorting, exclusions, refusals and their messages."""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_synth import COLS, ROWS, slice_pixels, write_multiframe, write_series, write_slice
from pydicom.tag import Tag
from pydicom.uid import RLELossless, generate_uid

import medseg.io.dicom as dicom_io
from medseg.errors import DicomSeriesError, GeometryError, ScanError
from medseg.io.dicom import find_dicom_series, read_dicom_series, read_dicom_series_report
from medseg.io.scans import find_scans, load_scan

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def value_at(img, lps_point) -> float:
    """Voxel value of ``img`` at a world point given in DICOM LPS mm (must fall on a voxel centre)."""
    ras = LPS_TO_RAS @ np.append(np.asarray(lps_point, float), 1.0)
    index = np.linalg.solve(img.affine, ras)[:3]
    assert np.allclose(index, np.round(index), atol=1e-4), index
    return float(np.asanyarray(img.dataobj)[tuple(int(v) for v in np.round(index))])


def assert_slices_in_place(img, origin, step, count, row=(1, 0, 0), col=(0, 1, 0), spacing=(0.8, 0.7)) -> None:
    """Every synthetic slice k sits at origin + k * step in world space, pixel (r, c) where DICOM puts it."""
    for k in range(count):
        for r, c in [(0, 0), (ROWS - 1, 0), (2, COLS - 1)]:
            lps = np.asarray(origin, float) + k * np.asarray(step, float) + c * spacing[1] * np.asarray(row) + r * spacing[0] * np.asarray(col)
            assert value_at(img, lps) == slice_pixels(k)[r, c] - 1024.0


def test_volume_is_float32_in_hu_with_scanner_geometry(tmp_path: Path) -> None:
    write_series(tmp_path, 5)
    img = read_dicom_series(tmp_path)
    assert img.shape == (COLS, ROWS, 5)
    assert np.asanyarray(img.dataobj).dtype == np.float32
    assert np.allclose(img.header.get_zooms(), (0.7, 0.8, 2.5))
    assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
    assert_slices_in_place(img, (10, -20, 30), (0, 0, 2.5), 5)


def test_shuffled_file_names_give_identical_volume(tmp_path: Path) -> None:
    write_series(tmp_path / "a", 6)
    reference = read_dicom_series(tmp_path / "a")
    files = sorted((tmp_path / "a").iterdir())
    names = [f"x{n}.dcm" for n in random.Random(3).sample(range(100), len(files))]
    (tmp_path / "b").mkdir()
    for src, name in zip(files, names, strict=True):
        shutil.copy(src, tmp_path / "b" / name)
    shuffled = read_dicom_series(tmp_path / "b")
    assert np.array_equal(np.asanyarray(shuffled.dataobj), np.asanyarray(reference.dataobj))
    assert np.array_equal(shuffled.affine, reference.affine)


@pytest.mark.parametrize("step", [(0, 0, -2.5), (0, 0, 2.5), (1.5, 0, 0)], ids=["descending", "ascending", "sagittal"])
def test_slice_order_follows_position_not_file_order(tmp_path: Path, step) -> None:
    orientation = (1, 0, 0, 0, 1, 0) if step[0] == 0 else (0, 1, 0, 0, 0, -1)
    row, col = np.array(orientation[:3]), np.array(orientation[3:])
    write_series(tmp_path, 5, step=step, orientation=orientation)
    img = read_dicom_series(tmp_path)
    assert_slices_in_place(img, (10, -20, 30), step, 5, row=row, col=col)
    # the third voxel axis points along the slice normal, with the direction sign of the data
    normal_ras = (LPS_TO_RAS[:3, :3] @ np.cross(row, col))
    assert np.allclose(img.affine[:3, 2] / np.linalg.norm(img.affine[:3, 2]), normal_ras)


def test_several_series_in_one_folder_are_separate_scans_but_one_read_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "exam"
    write_series(folder, 4, names=[f"a{k}.dcm" for k in range(4)])
    write_series(folder, 3, names=[f"b{k}.dcm" for k in range(3)], origin=(0, 0, 0))
    assert len(find_dicom_series(folder)) == 2
    scans = find_scans([folder])
    assert [s.case_id for s in scans] == ["exam_s1", "exam_s2"]
    assert sorted(load_scan(s).shape[2] for s in scans) == [3, 4]
    with pytest.raises(DicomSeriesError, match=r"holds 2 DICOM series.*expected exactly one"):
        read_dicom_series(folder)


def test_localizer_and_other_orientation_slices_are_excluded_and_recorded(tmp_path: Path, caplog) -> None:
    write_series(tmp_path, 5)
    uid = str(find_dicom_series(tmp_path)[0].series_uid)
    write_slice(tmp_path / "loc.dcm", position=(0, 0, 0), pixels=slice_pixels(9), series_uid=uid,
                ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    write_slice(tmp_path / "sag.dcm", position=(0, 0, 0), pixels=slice_pixels(9), series_uid=uid,
                orientation=(0, 1, 0, 0, 0, -1))
    with caplog.at_level(logging.WARNING, logger="medseg"):
        img, report = read_dicom_series_report(tmp_path)
        read_dicom_series(tmp_path)
    assert img.shape[2] == 5 and report.slices_used == 5
    reasons = {s.path.name: s.reason for s in report.excluded}
    assert "localizer" in reasons["loc.dcm"]
    assert "orientation differs" in reasons["sag.dcm"]
    assert "sag.dcm" in caplog.text and "loc.dcm" in caplog.text


def test_orientations_without_a_majority_are_refused(tmp_path: Path) -> None:
    uid = generate_uid()
    write_series(tmp_path, 3, series_uid=uid, names=["a0.dcm", "a1.dcm", "a2.dcm"])
    write_series(tmp_path, 3, series_uid=uid, names=["b0.dcm", "b1.dcm", "b2.dcm"], orientation=(0, 1, 0, 0, 0, -1),
                 step=(1, 0, 0))
    with pytest.raises(DicomSeriesError, match="2 different orientations and none holds a majority"):
        read_dicom_series(tmp_path)


def test_missing_slice_is_refused_naming_where(tmp_path: Path) -> None:
    files = write_series(tmp_path, 6)
    files[3].unlink()
    with pytest.raises(DicomSeriesError, match=r"missing slice.*gap of 5\.000 mm between slice_002\.dcm at \[10\.0, -20\.0, 35\.0\] and slice_004\.dcm"):
        read_dicom_series(tmp_path)


def test_duplicate_slices_with_identical_pixels_are_dropped_and_recorded(tmp_path: Path) -> None:
    files = write_series(tmp_path, 4)
    shutil.copy(files[2], tmp_path / "copy_of_2.dcm")
    img, report = read_dicom_series_report(tmp_path)
    assert img.shape[2] == 4
    # of two copies, the first by file name is kept
    assert [(s.path.name, s.reason) for s in report.excluded] == [
        ("slice_002.dcm", "duplicate of copy_of_2.dcm (same position, same pixels)")
    ]


def test_duplicate_positions_with_different_pixels_are_refused(tmp_path: Path) -> None:
    files = write_series(tmp_path, 4)
    uid = str(find_dicom_series(tmp_path)[0].series_uid)
    write_slice(tmp_path / "other.dcm", position=(10, -20, 32.5), pixels=slice_pixels(7), series_uid=uid)
    assert files[1].name == "slice_001.dcm"  # the slice other.dcm sits on (z = 30 + 2.5 mm)
    with pytest.raises(DicomSeriesError) as err:
        read_dicom_series(tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message
    assert "other.dcm and slice_001.dcm are at the same position (32.500 mm along the slice normal" in message
    assert "hold different pixels" in message


def test_irregular_spacing_is_refused_but_float_noise_is_not(tmp_path: Path) -> None:
    uid = generate_uid()
    for k, z in enumerate([0.0, 2.5, 5.0, 8.0, 10.5]):
        write_slice(tmp_path / "bad" / f"{k}.dcm", position=(0, 0, z), pixels=slice_pixels(k), series_uid=uid)
    with pytest.raises(DicomSeriesError, match="slice spacing is not uniform"):
        read_dicom_series(tmp_path / "bad")
    uid = generate_uid()
    noise = [0.0, 0.0004, -0.0003, 0.0002, -0.0001]  # positions written with rounding noise
    for k in range(5):
        write_slice(tmp_path / "ok" / f"{k}.dcm", position=(0, 0, 2.5 * k + noise[k]), pixels=slice_pixels(k), series_uid=uid)
    assert read_dicom_series(tmp_path / "ok").header.get_zooms()[2] == pytest.approx(2.5, abs=1e-3)


def test_gantry_tilt_is_refused_unless_allowed_then_resampled(tmp_path: Path) -> None:
    # slices step 2.5 mm along the normal and 0.35 mm (half a pixel) along the rows: about 8 degrees
    write_series(tmp_path, 5, step=(0.35, 0, 2.5))
    with pytest.raises(DicomSeriesError, match=r"gantry tilt of 7\.97 degrees"):
        read_dicom_series(tmp_path)
    img, report = read_dicom_series_report(tmp_path, allow_gantry_tilt=True)
    assert "gantry tilt" in report.notes[0]
    assert np.allclose(img.affine[:3, 2], [0, 0, 2.5])  # orthogonal grid, no shear
    volume = np.asanyarray(img.dataobj)
    # slice k was shifted k * 0.5 pixels along i: voxel i holds the mean of original pixels i - k/2
    original = np.stack([slice_pixels(k).astype(float) - 1024 for k in range(5)], axis=-1).transpose(1, 0, 2)
    assert np.allclose(volume[2:, :, 2], original[1:-1, :, 2])
    assert np.allclose(volume[2:, :, 1], 0.5 * (original[2:, :, 1] + original[1:-1, :, 1]))


def test_rescale_slope_and_intercept_apply_per_slice(tmp_path: Path) -> None:
    uid = generate_uid()
    for k, (slope, intercept) in enumerate([(1.0, -1024.0), (2.0, -1000.0), (0.5, 0.0)]):
        write_slice(tmp_path / f"{k}.dcm", position=(0, 0, k), pixels=slice_pixels(k), series_uid=uid,
                    slope=slope, intercept=intercept)
    volume = np.asanyarray(read_dicom_series(tmp_path).dataobj)
    for k, (slope, intercept) in enumerate([(1.0, -1024.0), (2.0, -1000.0), (0.5, 0.0)]):
        assert np.array_equal(volume[:, :, k], (slice_pixels(k).T * slope + intercept).astype(np.float32))


def test_compressed_series_decodes_like_the_uncompressed_one(tmp_path: Path) -> None:
    write_series(tmp_path / "raw", 3)
    write_series(tmp_path / "rle", 3, transfer_syntax=RLELossless)
    raw, rle = read_dicom_series(tmp_path / "raw"), read_dicom_series(tmp_path / "rle")
    assert np.array_equal(np.asanyarray(rle.dataobj), np.asanyarray(raw.dataobj))


def test_missing_decoder_is_refused_naming_syntax_and_package(tmp_path: Path, monkeypatch) -> None:
    from pydicom.pixels import get_decoder

    write_series(tmp_path, 3, transfer_syntax=RLELossless)
    monkeypatch.setattr(get_decoder(RLELossless), "_available", {})
    monkeypatch.setattr(get_decoder(RLELossless), "_decoder", None)
    with pytest.raises(DicomSeriesError, match=r"RLE Lossless \(1\.2\.840\.10008\.1\.2\.5\).*pip install pylibjpeg pylibjpeg-rle"):
        read_dicom_series(tmp_path)


def test_empty_non_dicom_and_truncated_files_are_skipped_and_recorded(tmp_path: Path, caplog) -> None:
    files = write_series(tmp_path, 5)
    (tmp_path / "empty.dcm").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not an image")
    data = files[0].read_bytes()
    (tmp_path / "cut_header.dcm").write_bytes(data[:200])
    # a sixth slice whose pixel data are cut short: its header reads, its pixels do not
    uid = str(find_dicom_series(tmp_path)[0].series_uid)
    sixth = write_slice(tmp_path / "cut_pixels.dcm", position=(10, -20, 42.5), pixels=slice_pixels(5), series_uid=uid)
    sixth.write_bytes(sixth.read_bytes()[:-20])
    with caplog.at_level(logging.WARNING, logger="medseg"):
        img, report = read_dicom_series_report(tmp_path)
        read_dicom_series(tmp_path)
    assert img.shape[2] == 5
    reasons = {s.path.name: s.reason for s in report.skipped}
    assert set(reasons) == {"empty.dcm", "notes.txt", "cut_header.dcm", "cut_pixels.dcm"}
    assert "empty" in reasons["empty.dcm"] and "not a DICOM" in reasons["notes.txt"]
    assert "cut_pixels.dcm" in caplog.text


def test_size_cap_refuses_before_decoding(tmp_path: Path, monkeypatch) -> None:
    write_series(tmp_path, 4)

    def no_decoding(*args, **kwargs):
        raise AssertionError("pixels decoded despite the size cap")

    monkeypatch.setattr(dicom_io, "_decode", no_decoding)
    with pytest.raises(ScanError, match=r"shape \(5, 6, 4\).*above the limit"):
        read_dicom_series(tmp_path, max_bytes=5 * 6 * 4 * 4 - 1)
    monkeypatch.setenv("MEDSEG_MAX_SCAN_BYTES", "100")
    with pytest.raises(ScanError, match="above the limit"):
        load_scan(tmp_path)


def test_too_few_slices_is_not_a_volume(tmp_path: Path) -> None:
    write_series(tmp_path, 2)
    with pytest.raises(DicomSeriesError, match="not a volume: 2 distinct slice position"):
        read_dicom_series(tmp_path)


def test_colour_and_multiframe_files_without_functional_groups_are_refused(tmp_path: Path) -> None:
    write_series(tmp_path / "mf", 3, NumberOfFrames=2)
    with pytest.raises(DicomSeriesError, match=r"slice_000\.dcm: multi-frame DICOM \(2 frames in one file\) without functional groups"):
        read_dicom_series(tmp_path / "mf")
    write_series(tmp_path / "rgb", 3, SamplesPerPixel=3)
    with pytest.raises(DicomSeriesError, match="expected a 3D scan"):
        read_dicom_series(tmp_path / "rgb")


def test_non_orthogonal_orientation_is_refused(tmp_path: Path) -> None:
    write_series(tmp_path, 3, orientation=(1, 0, 0, 0.1, 0.995, 0))
    with pytest.raises(GeometryError, match="not two orthogonal unit vectors"):
        read_dicom_series(tmp_path)


def test_folder_without_dicom_is_refused(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("hello")
    with pytest.raises(DicomSeriesError, match="no DICOM image files found"):
        read_dicom_series(tmp_path)


# ----------------------------------------------------------------------------------------------
# Multi-frame (enhanced) objects: one file, one slice per frame, the same rules as a classic series


def _volume(img) -> np.ndarray:
    return np.asanyarray(img.dataobj)


def test_multiframe_file_gives_the_volume_of_the_same_slices_as_single_files(tmp_path: Path) -> None:
    write_series(tmp_path / "single", 5)
    write_multiframe(tmp_path / "multi" / "mf.dcm", 5)
    single, multi = read_dicom_series(tmp_path / "single"), read_dicom_series(tmp_path / "multi")
    assert multi.shape == (COLS, ROWS, 5)
    assert np.array_equal(_volume(multi), _volume(single))
    assert np.array_equal(multi.affine, single.affine)
    assert_slices_in_place(multi, (10, -20, 30), (0, 0, 2.5), 5)
    scans = find_scans([tmp_path / "multi"])
    assert [s.case_id for s in scans] == ["multi"] and load_scan(scans[0]).shape == (COLS, ROWS, 5)


@pytest.mark.parametrize("order", ["descending", "shuffled"])
def test_multiframe_frame_order_in_the_file_does_not_change_the_volume(tmp_path: Path, order: str) -> None:
    write_multiframe(tmp_path / "asc" / "mf.dcm", 6)
    indices = [5, 4, 3, 2, 1, 0] if order == "descending" else [3, 0, 5, 1, 4, 2]
    write_multiframe(tmp_path / "other" / "mf.dcm", 6, indices=indices)
    ascending, other = read_dicom_series(tmp_path / "asc"), read_dicom_series(tmp_path / "other")
    assert np.array_equal(_volume(other), _volume(ascending))
    assert np.array_equal(other.affine, ascending.affine)
    assert_slices_in_place(other, (10, -20, 30), (0, 0, 2.5), 6)


def test_multiframe_sagittal_frames_descending_along_the_normal_are_placed_in_world_space(tmp_path: Path) -> None:
    orientation, step = (0, 1, 0, 0, 0, -1), (-1.5, 0, 0)
    write_multiframe(tmp_path / "mf.dcm", 5, orientation=orientation, step=step)
    img = read_dicom_series(tmp_path)
    assert_slices_in_place(img, (10, -20, 30), step, 5, row=(0, 1, 0), col=(0, 0, -1))


def test_multiframe_rescale_applies_per_frame_and_from_the_shared_group(tmp_path: Path) -> None:
    write_multiframe(tmp_path / "per_frame" / "mf.dcm", 3, slopes=[1.0, 2.0, 0.5], intercept=-1000.0)
    volume = _volume(read_dicom_series(tmp_path / "per_frame"))
    for k, slope in enumerate([1.0, 2.0, 0.5]):
        assert np.array_equal(volume[:, :, k], (slice_pixels(k).T * slope - 1000.0).astype(np.float32))
    write_multiframe(tmp_path / "shared" / "mf.dcm", 3, slope=3.0, intercept=5.0)
    volume = _volume(read_dicom_series(tmp_path / "shared"))
    assert np.array_equal(volume[:, :, 2], (slice_pixels(2).T * 3.0 + 5.0).astype(np.float32))


@pytest.mark.parametrize(
    ("missing", "message"),
    [
        ([(2, "PlanePositionSequence")], r"frame 3 of 5 has no PlanePositionSequence \(ImagePositionPatient\)"),
        ([(None, "PixelMeasuresSequence")], r"frame 1 of 5 has no PixelMeasuresSequence \(PixelSpacing\)"),
        ([(None, "PlaneOrientationSequence")], r"frame 1 of 5 has no PlaneOrientationSequence \(ImageOrientationPatient\)"),
    ],
    ids=["position-of-one-frame", "pixel-measures", "orientation"],
)
def test_multiframe_missing_functional_group_is_refused_naming_file_frame_and_group(
    tmp_path: Path, missing, message: str
) -> None:
    path = write_multiframe(tmp_path / "mf.dcm", 5, missing=missing)
    with pytest.raises(DicomSeriesError, match=message) as caught:
        read_dicom_series(tmp_path)
    assert caught.value.path == path


def test_multiframe_frame_count_mismatch_is_refused(tmp_path: Path) -> None:
    write_multiframe(tmp_path / "items" / "mf.dcm", 5, number_of_frames=6, pixel_frames=6)
    with pytest.raises(DicomSeriesError, match=r"mf\.dcm: NumberOfFrames is 6 but PerFrameFunctionalGroupsSequence has 5 item"):
        read_dicom_series(tmp_path / "items")
    for stored in (4, 6):
        write_multiframe(tmp_path / f"pixels{stored}" / "mf.dcm", 5, pixel_frames=stored)
        with pytest.raises(DicomSeriesError, match=rf"mf\.dcm: NumberOfFrames is 5 but the pixel data hold {stored} frame\(s\)"):
            read_dicom_series(tmp_path / f"pixels{stored}")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"stack_ids": ["1", "1", "1", "2", "2", "2"]}, r"2 stacks \(StackID 1, 2\)"),
        ({"echo_times": [10, 10, 10, 20, 20, 20]}, r"2 echo times \(10, 20 ms\)"),
        ({"components": ["MAGNITUDE"] * 3 + ["PHASE"] * 3}, r"2 complex image components \(MAGNITUDE, PHASE\)"),
        ({"temporal_positions": [1, 1, 1, 2, 2, 2]}, r"2 time points \(TemporalPositionIndex 1, 2\)"),
    ],
    ids=["stacks", "echoes", "magnitude-phase", "time-points"],
)
def test_multiframe_holding_several_volumes_is_refused_naming_them(tmp_path: Path, kwargs, message: str) -> None:
    # frames 3-5 repeat the positions of frames 0-2, as a second stack / echo / component would
    write_multiframe(tmp_path / "mf.dcm", 6, indices=[0, 1, 2, 0, 1, 2], **kwargs)
    with pytest.raises(DicomSeriesError, match=r"mf\.dcm: multi-frame DICOM holds several volumes: " + message):
        read_dicom_series(tmp_path)


def test_multiframe_gap_is_refused_naming_the_frames_and_positions(tmp_path: Path) -> None:
    write_multiframe(tmp_path / "mf.dcm", 5, indices=[0, 1, 2, 4, 5])
    with pytest.raises(
        DicomSeriesError,
        match=r"missing slice.*gap of 5\.000 mm between mf\.dcm frame 3 at \[10\.0, -20\.0, 35\.0\] and mf\.dcm frame 4 "
        r"at \[10\.0, -20\.0, 40\.0\]",
    ):
        read_dicom_series(tmp_path)


def test_multiframe_duplicate_position_with_different_pixels_is_refused_naming_frames_and_position(tmp_path: Path) -> None:
    positions = [(10, -20, 30 + 2.5 * k) for k in (0, 1, 1, 2, 3)]
    write_multiframe(tmp_path / "mf.dcm", 5, positions=positions)
    with pytest.raises(
        DicomSeriesError,
        match=r"mf\.dcm frame 2 and mf\.dcm frame 3 are at the same position \(32\.500 mm along the slice normal, "
        r"ImagePositionPatient \[10\.0, -20\.0, 32\.5\] mm\) but hold different pixels",
    ):
        read_dicom_series(tmp_path)


def test_multiframe_duplicate_frame_with_identical_pixels_is_dropped_and_recorded(tmp_path: Path) -> None:
    write_multiframe(tmp_path / "mf.dcm", 5, indices=[0, 1, 1, 2, 3])
    img, report = read_dicom_series_report(tmp_path)
    assert img.shape[2] == 4
    assert [(s.name, s.reason) for s in report.excluded] == [
        ("mf.dcm frame 3", "duplicate of mf.dcm frame 2 (same position, same pixels)")
    ]


def test_multiframe_mixed_orientations_without_majority_are_refused_naming_frames(tmp_path: Path) -> None:
    axial, sagittal = (1, 0, 0, 0, 1, 0), (0, 1, 0, 0, 0, -1)
    write_multiframe(tmp_path / "mf.dcm", 4, orientations=[axial, sagittal, axial, sagittal])
    with pytest.raises(
        DicomSeriesError,
        match=r"2 different orientations and none holds a majority: 2 slice\(s\) with ImageOrientationPatient "
        r"\[1\.0, 0\.0, 0\.0, 0\.0, 1\.0, 0\.0\] \(e\.g\. mf\.dcm frame 1, mf\.dcm frame 3\); 2 slice\(s\) .*"
        r"\(e\.g\. mf\.dcm frame 2, mf\.dcm frame 4\)",
    ):
        read_dicom_series(tmp_path)


def test_multiframe_minority_orientation_frame_is_excluded_like_a_single_file(tmp_path: Path) -> None:
    axial, sagittal = (1, 0, 0, 0, 1, 0), (0, 1, 0, 0, 0, -1)
    write_multiframe(tmp_path / "mf.dcm", 5, indices=[0, 1, 2, 3, 9], orientations=[axial] * 4 + [sagittal])
    img, report = read_dicom_series_report(tmp_path)
    assert img.shape[2] == 4
    assert [s.name for s in report.excluded] == ["mf.dcm frame 5"]
    assert "orientation differs" in report.excluded[0].reason


def test_multiframe_other_dimension_with_several_values_is_refused_naming_its_label(tmp_path: Path) -> None:
    path = write_multiframe(tmp_path / "mf.dcm", 6, indices=[0, 1, 2, 0, 1, 2])
    ds = pydicom.dcmread(str(path))
    b_value, position = pydicom.Dataset(), pydicom.Dataset()
    b_value.DimensionIndexPointer, b_value.DimensionDescriptionLabel = Tag("DiffusionBValue"), "b-value"
    position.DimensionIndexPointer, position.DimensionDescriptionLabel = Tag("InStackPositionNumber"), "position"
    ds.DimensionIndexSequence = [b_value, position]
    for f, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        frame.FrameContentSequence[0].DimensionIndexValues = [1 + f // 3, 1 + f % 3]
    ds.save_as(str(path))
    with pytest.raises(DicomSeriesError, match=r"several volumes: 2 values of dimension b-value \(index 1, 2\)"):
        read_dicom_series(tmp_path)


def test_compressed_multiframe_decodes_like_the_uncompressed_one(tmp_path: Path) -> None:
    write_multiframe(tmp_path / "raw" / "mf.dcm", 4)
    write_multiframe(tmp_path / "rle" / "mf.dcm", 4, transfer_syntax=RLELossless)
    raw, rle = read_dicom_series(tmp_path / "raw"), read_dicom_series(tmp_path / "rle")
    assert np.array_equal(_volume(rle), _volume(raw))
