"""NIfTI loading checks, mask geometry round trips and label-versus-image checks."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.transform import Rotation

from medseg.errors import GeometryError, ScanError
from medseg.io.geometry import check_label_matches_image
from medseg.io.nifti import load_nifti, mask_like, save_atomic
from medseg.io.scans import load_scan


def _save(path: Path, data: np.ndarray, affine: np.ndarray, qcode: int = 1, scode: int = 1) -> Path:
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine if qcode else None, code=qcode)
    img.set_sform(affine if scode else None, code=scode)
    nib.save(img, str(path))
    return path


def _patch_header(path: Path, **fields: object) -> None:
    """Overwrite header fields of an uncompressed .nii in place, bypassing nibabel's checks on write."""
    raw = bytearray(path.read_bytes())
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(bytes(raw[:348])), check=False)
    for key, value in fields.items():
        if key == "shape":
            header.set_data_shape(value)
        else:
            header[key] = value
    raw[:348] = header.binaryblock
    path.write_bytes(bytes(raw))


def _affine(spacing=(1.0, 1.0, 1.0), rotation: np.ndarray | None = None, origin=(0.0, 0.0, 0.0)) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = (np.eye(3) if rotation is None else rotation) @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def test_trailing_singleton_dimensions_are_dropped(tmp_path: Path) -> None:
    path = _save(tmp_path / "a.nii.gz", np.zeros((4, 5, 6, 1), np.int16), np.eye(4))
    img = load_nifti(path)
    assert img.shape == (4, 5, 6) and img.get_data_dtype() == np.int16


@pytest.mark.parametrize("shape", [(4, 5, 6, 2), (4, 5, 6, 1, 3), (4, 5)], ids=["4d", "vector", "2d"])
def test_non_3d_images_are_refused(tmp_path: Path, shape) -> None:
    path = _save(tmp_path / "a.nii.gz", np.zeros(shape, np.float32), np.eye(4))
    with pytest.raises(ScanError, match="expected a 3D scan"):
        load_scan(path)


@pytest.mark.parametrize("bad", [0.0, -1.0, np.nan], ids=["zero", "negative", "nan"])
def test_unusable_pixdim_spacing_is_refused(tmp_path: Path, bad) -> None:
    path = _save(tmp_path / "a.nii", np.zeros((4, 5, 6), np.int16), np.eye(4), qcode=0, scode=1)
    _patch_header(path, pixdim=[1.0, 1.0, bad, 1.0, 0, 0, 0, 0])
    with pytest.raises(GeometryError, match="spacing must be positive and finite"):
        load_nifti(path)


def test_zero_spacing_affine_is_refused(tmp_path: Path) -> None:
    path = _save(tmp_path / "a.nii", np.zeros((4, 5, 6), np.int16), np.eye(4), qcode=0)
    _patch_header(path, srow_y=[0.0, 0.0, 0.0, 0.0])
    with pytest.raises(GeometryError, match="spacing"):
        load_nifti(path)


def test_sheared_affine_is_refused(tmp_path: Path) -> None:
    affine = np.eye(4)
    affine[0, 2] = 0.3  # third axis leans along x: a gantry-tilt style shear
    path = _save(tmp_path / "a.nii", np.zeros((4, 5, 6), np.int16), affine, qcode=0, scode=1)
    with pytest.raises(GeometryError, match="sheared"):
        load_nifti(path)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_voxels_are_refused(tmp_path: Path, bad) -> None:
    data = np.zeros((4, 5, 6), np.float32)
    data[1, 2, 3] = bad
    with pytest.raises(ScanError, match="1 voxel\\(s\\) are NaN or infinite"):
        load_nifti(_save(tmp_path / "a.nii.gz", data, np.eye(4)))


def test_size_cap_is_checked_from_the_header_before_reading(tmp_path: Path, monkeypatch) -> None:
    path = _save(tmp_path / "a.nii", np.zeros((4, 5, 6), np.int16), np.eye(4))
    _patch_header(path, shape=(30000, 30000, 3000))  # 5 TB of int16 claimed; the file holds 240 bytes
    with pytest.raises(ScanError, match=r"needs 5029\.14 GiB in memory, above the limit of 4\.00 GiB"):
        load_scan(path)
    small = _save(tmp_path / "b.nii", np.zeros((4, 5, 6), np.int16), np.eye(4))
    with pytest.raises(ScanError, match="above the limit"):
        load_nifti(small, max_bytes=239)
    monkeypatch.setenv("MEDSEG_MAX_SCAN_BYTES", "100")
    with pytest.raises(ScanError, match="above the limit"):
        load_nifti(small)


def test_scaled_integers_load_as_float32_and_free_text_is_dropped(tmp_path: Path) -> None:
    img = nib.Nifti1Image(np.arange(120, dtype=np.int16).reshape(4, 5, 6), np.eye(4))
    img.header.set_slope_inter(0.5, -10.0)
    img.header["descrip"] = b"PATIENT NAME HERE"
    img.header["aux_file"] = b"MRN 12345"
    nib.save(img, str(tmp_path / "a.nii"))
    loaded = load_nifti(tmp_path / "a.nii")
    data = np.asanyarray(loaded.dataobj)
    assert data.dtype == np.float32 and data[0, 0, 1] == pytest.approx(-9.5)
    assert bytes(loaded.header["descrip"]).strip(b"\0") == b"" and bytes(loaded.header["aux_file"]).strip(b"\0") == b""
    save_atomic(loaded, tmp_path / "b.nii.gz")
    assert np.array_equal(nib.load(str(tmp_path / "b.nii.gz")).get_fdata(), data)


def test_corrupt_file_is_a_scan_error(tmp_path: Path) -> None:
    path = _save(tmp_path / "a.nii", np.zeros((4, 5, 6), np.int16), np.eye(4))
    path.write_bytes(path.read_bytes()[:-50])  # voxel data cut short
    with pytest.raises(ScanError, match="not a readable NIfTI file"):
        load_nifti(path)
    with pytest.raises(ScanError, match="file not found"):
        load_nifti(tmp_path / "missing.nii.gz")


ROT_OBLIQUE = Rotation.from_euler("xyz", [12, -7, 25], degrees=True).as_matrix()
GEOMETRIES = {
    "ras": (_affine((1.0, 1.0, 1.0), np.eye(3), (-90, -120, -60)), 1, 1),
    "lps": (_affine((0.7, 0.7, 2.5), np.diag([-1.0, -1.0, 1.0]), (180, 200, -300)), 1, 1),
    "oblique": (_affine((0.9, 1.1, 3.0), ROT_OBLIQUE, (12.5, -40.25, 7.0)), 1, 1),
    "anisotropic": (_affine((0.4, 0.5, 6.0), np.eye(3)[:, [1, 0, 2]] @ np.diag([1, -1, 1]), (3, 4, 5)), 2, 2),
    "qform_only": (_affine((0.9, 1.1, 3.0), ROT_OBLIQUE, (1, 2, 3)), 1, 0),
    "sform_only": (_affine((0.9, 1.1, 3.0), ROT_OBLIQUE, (1, 2, 3)), 0, 4),
}


def _assert_mask_round_trip(scan_path: Path, out_path: Path) -> None:
    source = nib.load(str(scan_path))
    scan = load_scan(scan_path)
    mask = (np.indices(scan.shape).sum(axis=0) % 3).astype(np.uint8)
    save_atomic(mask_like(mask, scan), out_path)
    back = nib.load(str(out_path))
    assert back.shape == source.shape
    assert np.array_equal(back.affine, source.affine)  # exact: the header fields are copied, not recomputed
    for key in ("qform_code", "sform_code"):
        assert int(back.header[key]) == int(source.header[key])
    assert np.array_equal(back.header.get_qform(), source.header.get_qform())
    assert np.array_equal(back.header.get_sform(), source.header.get_sform())
    assert np.array_equal(np.asanyarray(back.dataobj), mask)


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_mask_like_round_trip_keeps_geometry_and_codes(tmp_path: Path, name: str) -> None:
    affine, qcode, scode = GEOMETRIES[name]
    scan = _save(tmp_path / "scan.nii.gz", np.random.default_rng(0).normal(size=(6, 7, 5)).astype(np.float32), affine, qcode, scode)
    _assert_mask_round_trip(scan, tmp_path / "out" / "mask.nii.gz")


@settings(max_examples=25, deadline=None)
@given(
    perm=st.permutations([0, 1, 2]),
    flips=st.tuples(*[st.sampled_from([-1.0, 1.0])] * 3),
    spacing=st.tuples(*[st.floats(0.2, 8.0)] * 3),
    angles=st.tuples(*[st.floats(-15.0, 15.0)] * 3),
    origin=st.tuples(*[st.floats(-500.0, 500.0)] * 3),
    codes=st.sampled_from([(1, 1), (1, 0), (0, 1), (2, 2)]),
)
def test_mask_like_round_trip_property(perm, flips, spacing, angles, origin, codes) -> None:
    rotation = Rotation.from_euler("xyz", angles, degrees=True).as_matrix() @ np.eye(3)[:, list(perm)] @ np.diag(flips)
    affine = _affine(spacing, rotation, origin)
    with tempfile.TemporaryDirectory() as tmp:
        scan = _save(Path(tmp) / "scan.nii", np.zeros((3, 4, 5), np.int16), affine, *codes)
        _assert_mask_round_trip(scan, Path(tmp) / "mask.nii.gz")


def _image(shape=(4, 5, 6), affine=None, values=None) -> nib.Nifti1Image:
    data = np.zeros(shape, np.uint8) if values is None else values
    return nib.Nifti1Image(data, _affine((0.8, 0.8, 2.0), np.eye(3), (1, 2, 3)) if affine is None else affine)


def test_label_on_the_image_grid_with_declared_values_passes() -> None:
    image = _image()
    label = _image(values=np.ones((4, 5, 6), np.uint8))
    check_label_matches_image(image, label, {0, 1}, Path("label.nii.gz"))


@pytest.mark.parametrize(
    ("label", "message"),
    [
        (_image(shape=(4, 5, 7)), r"label shape \(4, 5, 7\) differs from its image's \(4, 5, 6\)"),
        (_image(affine=_affine((0.8, 0.8, 2.5), np.eye(3), (1, 2, 3))), r"label spacing \[0\.8, 0\.8, 2\.5\] mm differs from its image's \[0\.8, 0\.8, 2\.0\]"),
        (_image(affine=_affine((0.8, 0.8, 2.0), np.eye(3), (1, 2, 3.5))), r"label origin \[1\.0, 2\.0, 3\.5\] mm differs"),
        (_image(affine=_affine((0.8, 0.8, 2.0), np.diag([-1.0, 1, 1]), (1, 2, 3))), r"label orientation \('L', 'A', 'S'\)"),
        (_image(values=np.full((4, 5, 6), 3, np.uint8)), r"values \[3\] not declared"),
    ],
    ids=["shape", "spacing", "origin", "direction", "values"],
)
def test_label_mismatch_is_refused_showing_both(label, message) -> None:
    with pytest.raises(ScanError, match=message):
        check_label_matches_image(_image(), label, {0, 1, 2}, Path("label.nii.gz"))


def test_label_float_noise_is_tolerated() -> None:
    affine = _affine((0.8, 0.8, 2.0), np.eye(3), (1, 2, 3))
    noisy = affine + 1e-6
    noisy[3] = [0, 0, 0, 1]
    check_label_matches_image(_image(affine=affine), _image(affine=noisy), {0}, Path("label.nii.gz"))
