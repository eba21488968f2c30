"""Real DICOM series from ../shared/data/dicom: our volumes against SimpleITK and dicom2nifti's
reference conversions, the enhanced / multi-frame objects against dicom2nifti and dcm2niix, the
known-bad series, gantry tilt, decoders, the convert verb and PHI."""

from __future__ import annotations

import gzip
import logging
import random
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from scipy.ndimage import map_coordinates

from medseg.cli import main
from medseg.errors import DicomSeriesError
from medseg.io.dicom import find_dicom_series, read_dicom_series, read_dicom_series_report
from medseg.io.nifti import mask_like, save_atomic
from medseg.io.scans import find_scans, load_scan

sitk = pytest.importorskip("SimpleITK")

SERIES = [
    "ge_anatomical_001", "generic_anatomical_001", "generic_anatomical_002_non_isotropic",
    "generic_compressed_j2k_001", "generic_compressed_jpeg_001", "generic_compressed_jpegls_001",
    "generic_compressed_rle_001", "hitachi_anatomical_001", "philips_anatomical_001",
    "siemens_anatomical_001", "torchio_ct_17",
]
WITH_REFERENCE = [name for name in SERIES if name != "torchio_ct_17"]
COMPRESSED = [name for name in SERIES if "compressed" in name]
#: Enhanced / multi-frame objects: one file per series, with dicom2nifti's reference.
MULTIFRAME = ["philips_enhanced_anatomical_001", "philips_enhanced_anatomical_001_implicit", "siemens_multiframe_anatomical_001"]
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@pytest.fixture(scope="module")
def dicom_root(shared_data: Path) -> Path:
    return shared_data / "dicom"


def _canonical(img: nib.Nifti1Image) -> tuple[np.ndarray, np.ndarray]:
    """Voxels (float64) and affine after reorienting to the closest RAS: one frame for any two converters.

    A trailing singleton dimension (dicom2nifti writes some volumes as x*y*z*1) is dropped first.
    """
    if img.ndim == 4 and img.shape[3] == 1:
        img = nib.Nifti1Image(np.asanyarray(img.dataobj)[..., 0], img.affine, img.header)
    img = nib.as_closest_canonical(img)
    return np.asanyarray(img.dataobj).astype(np.float64), img.affine


def _simpleitk(folder: Path) -> nib.Nifti1Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    image = reader.Execute()
    affine = np.eye(4)
    affine[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    return nib.Nifti1Image(sitk.GetArrayFromImage(image).transpose(2, 1, 0), LPS_TO_RAS @ affine)


@pytest.mark.parametrize("name", SERIES)
def test_volume_and_affine_equal_simpleitk(dicom_root: Path, name: str) -> None:
    ours, theirs = _canonical(read_dicom_series(dicom_root / "series" / name)), _canonical(_simpleitk(dicom_root / "series" / name))
    assert ours[0].shape == theirs[0].shape
    assert np.allclose(ours[1], theirs[1], rtol=0, atol=1e-4)
    # exact for integer pixels; float32 precision where the slope is fractional
    assert np.allclose(ours[0], theirs[0], rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", WITH_REFERENCE)
def test_volume_matches_dicom2nifti_reference_in_world_space(dicom_root: Path, name: str) -> None:
    ours = _canonical(read_dicom_series(dicom_root / "series" / name))
    reference = _canonical(nib.load(str(dicom_root / "series" / f"{name}_reference.nii.gz")))
    assert ours[0].shape == reference[0].shape
    assert np.allclose(ours[1], reference[1], rtol=0, atol=1e-4)
    assert np.allclose(ours[0], reference[0], rtol=1e-6, atol=0)


def test_compressed_series_decode_to_the_same_nonzero_pixels(dicom_root: Path) -> None:
    # the four compressed series are one acquisition in four transfer syntaxes
    volumes = [np.asanyarray(read_dicom_series(dicom_root / "series" / name).dataobj) for name in COMPRESSED]
    assert all(v.any() for v in volumes), "an all-zero volume means a decoder failed silently"
    assert all(np.array_equal(v, volumes[0]) for v in volumes[1:])


def test_missing_jpeg2000_decoder_is_refused_naming_the_package(dicom_root: Path, monkeypatch) -> None:
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEG2000Lossless

    monkeypatch.setattr(get_decoder(JPEG2000Lossless), "_available", {})
    with pytest.raises(
        DicomSeriesError, match=r"JPEG 2000 Image Compression \(Lossless Only\).*pip install pylibjpeg pylibjpeg-openjpeg"
    ):
        read_dicom_series(dicom_root / "series" / "generic_compressed_j2k_001")


def test_shuffled_file_names_give_the_identical_volume(dicom_root: Path, tmp_path: Path) -> None:
    source = dicom_root / "series" / "torchio_ct_17"
    files = sorted(source.iterdir())
    names = random.Random(0).sample(range(1000), len(files))
    for src, n in zip(files, names, strict=True):
        shutil.copy(src, tmp_path / f"{n:04d}.dcm")
    a, b = read_dicom_series(source), read_dicom_series(tmp_path)
    assert np.array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj))
    assert np.array_equal(a.affine, b.affine)


FAILING = {
    "gantrytilting_001": r"gantry tilt of 14\.00 degrees.*allow_gantry_tilt=True",
    "notavolume_001": r"001\.dcm and 002\.dcm are at the same position .* hold different pixels",
    "slicecount_001": r"not a volume: 2 distinct slice position\(s\), at least 3 are needed",
    "sliceincrement_001": r"missing slice\(s\): a gap of 10\.000 mm between IM-0001-0009-0001\.dcm at "
    r"\[-123\.5, -115\.2, 28\.107\] and IM-0001-0010-0001\.dcm at \[-123\.5, -115\.2, 38\.107\]",
    "sliceorientation_001": r"2 different orientations and none holds a majority",
}


@pytest.mark.parametrize("name", sorted(FAILING))
def test_known_bad_series_are_refused_with_the_reason(dicom_root: Path, name: str) -> None:
    folder = dicom_root / "failing" / name
    with pytest.raises(DicomSeriesError, match=FAILING[name]) as caught:
        load_scan(folder)
    assert str(folder) in str(caught.value)


def test_gantry_tilt_when_allowed_is_resampled_onto_an_orthogonal_grid_in_hu(dicom_root: Path) -> None:
    folder = dicom_root / "failing" / "gantrytilting_001"
    img, report = read_dicom_series_report(folder, allow_gantry_tilt=True)
    assert "gantry tilt of 14.00 degrees corrected" in report.notes[0]
    directions = img.affine[:3, :3] / np.linalg.norm(img.affine[:3, :3], axis=0)
    assert np.allclose(directions.T @ directions, np.eye(3), atol=1e-6)
    volume = np.asanyarray(img.dataobj)
    assert volume.min() == -1024.0 and -1010 < np.percentile(volume, 5) < -990  # air, in HU
    # Each voxel of the corrected grid holds the last slice's pixels interpolated at that voxel's world
    # position, computed here independently from the slice's own DICOM geometry.
    files = sorted(folder.iterdir())
    last = max((pydicom.dcmread(str(p)) for p in files), key=lambda ds: float(ds.ImagePositionPatient[2]))
    pixels = last.pixel_array.astype(float) * float(last.RescaleSlope) + float(last.RescaleIntercept)
    row, col = np.array(last.ImageOrientationPatient[:3], float), np.array(last.ImageOrientationPatient[3:], float)
    dy, dx = (float(v) for v in last.PixelSpacing)
    origin = np.array(last.ImagePositionPatient, float)
    for i, j in [(200, 200), (300, 256), (150, 300)]:
        lps = (np.linalg.inv(LPS_TO_RAS) @ img.affine @ [i, j, 3, 1])[:3]
        c, r = np.dot(lps - origin, row) / dx, np.dot(lps - origin, col) / dy
        assert abs(np.dot(lps - origin, np.cross(row, col))) < 1e-3  # on the slice's own plane
        assert abs(c - i) < 1e-6 and abs(r - j) > 8  # shifted along the rows by the tilt
        expected = map_coordinates(pixels, [[r], [c]], order=1)[0]
        assert volume[i, j, 3] == pytest.approx(expected, abs=1e-2)


def test_convert_writes_scanner_coded_nifti_atomically_and_refuses_to_overwrite(dicom_root: Path, tmp_path: Path, capsys) -> None:
    folder = dicom_root / "series" / "hitachi_anatomical_001"
    out = tmp_path / "out" / "hitachi.nii.gz"
    assert main(["convert", str(folder), str(out)]) == 0
    written = nib.load(str(out))
    assert int(written.header["qform_code"]) == 1 and int(written.header["sform_code"]) == 1
    direct = read_dicom_series(folder)
    assert np.allclose(written.affine, direct.affine, atol=1e-4)
    assert np.array_equal(np.asanyarray(written.dataobj), np.asanyarray(direct.dataobj))
    assert [p.name for p in out.parent.iterdir()] == ["hitachi.nii.gz"]  # no temporary left behind
    before = out.read_bytes()
    assert main(["convert", str(folder), str(out)]) == 2
    assert "already exists (use --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert main(["convert", str(folder), str(out), "--overwrite"]) == 0
    assert main(["convert", str(dicom_root / "failing" / "gantrytilting_001"), str(tmp_path / "t.nii.gz")]) == 2
    assert "gantry tilt" in capsys.readouterr().err
    assert main(["convert", str(dicom_root / "failing" / "gantrytilting_001"), str(tmp_path / "t.nii.gz"), "--allow-gantry-tilt"]) == 0


def test_mask_on_a_dicom_scan_overlays_it_after_reload(dicom_root: Path, tmp_path: Path) -> None:
    scan = load_scan(dicom_root / "series" / "philips_anatomical_001")
    save_atomic(scan, tmp_path / "scan.nii.gz")
    mask = (np.asanyarray(scan.dataobj) > 100).astype(np.uint8)
    save_atomic(mask_like(mask, scan), tmp_path / "mask.nii.gz")
    written_scan, written_mask = nib.load(str(tmp_path / "scan.nii.gz")), nib.load(str(tmp_path / "mask.nii.gz"))
    assert np.array_equal(written_mask.affine, written_scan.affine)
    assert np.allclose(written_mask.affine, scan.affine, atol=1e-4)
    assert np.array_equal(np.asanyarray(written_mask.dataobj), mask)


CANARIES = {
    "PatientName": "CANARYNAME^ZEBULON",
    "PatientID": "CANARYID7731",
    "PatientBirthDate": "19010203",
    "StudyDate": "19020304",
    "InstitutionName": "CANARY INSTITUTE OF ZEBULON",
}


def test_patient_tags_never_reach_outputs_or_logs(dicom_root: Path, tmp_path: Path, caplog, capsys) -> None:
    folder = tmp_path / "scans" / "case_a"
    folder.mkdir(parents=True)
    for path in sorted((dicom_root / "series" / "torchio_ct_17").iterdir()):
        ds = pydicom.dcmread(str(path))
        for key, value in CANARIES.items():
            setattr(ds, key, value)
        ds.save_as(str(folder / path.name))
    (folder / "junk.txt").write_text("not dicom")  # forces a warning about skipped files
    with caplog.at_level(logging.DEBUG), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scans = find_scans([tmp_path / "scans"])
        assert [s.case_id for s in scans] == ["scans_case_a"]
        img = load_scan(scans[0])
        save_atomic(mask_like(np.zeros(img.shape, np.uint8), img), tmp_path / "out" / "mask.nii.gz")
        assert main(["-v", "convert", str(folder), str(tmp_path / "out" / f"{scans[0].case_id}.nii.gz")]) == 0
    texts = [r.getMessage() for r in caplog.records] + [str(w.message) for w in caught]
    streams = capsys.readouterr()
    texts += [streams.out, streams.err]
    assert any("junk.txt" in t for t in texts)  # the logs were captured at all
    outputs = sorted((tmp_path / "out").iterdir())
    assert [p.name for p in outputs] == ["mask.nii.gz", "scans_case_a.nii.gz"]
    for path in outputs:
        raw = gzip.decompress(path.read_bytes())
        header = nib.load(str(path)).header
        for field in ("descrip", "aux_file", "db_name", "intent_name"):
            assert bytes(header[field]).strip(b"\0") == b"", field
        for canary in CANARIES.values():
            for part in canary.split("^"):
                assert part.encode() not in raw, (path.name, part)
    for canary in CANARIES.values():
        for part in canary.split("^"):
            assert not any(part in t for t in texts), part


def test_series_in_subfolders_are_found_recursively_and_named_by_folder(dicom_root: Path, tmp_path: Path) -> None:
    for name in ("hitachi_anatomical_001", "torchio_ct_17"):
        shutil.copytree(dicom_root / "series" / name, tmp_path / "study" / name)
    assert len(find_dicom_series(tmp_path / "study")) == 2
    scans = find_scans([tmp_path / "study"])
    assert sorted(s.case_id for s in scans) == ["study_hitachi_anatomical_001", "study_torchio_ct_17"]
    assert {load_scan(s).shape for s in scans} == {(64, 64, 4), (88, 128, 17)}


# ----------------------------------------------------------------------------------------------
# Enhanced / multi-frame objects


def _dcm2niix(folder: Path, out: Path) -> nib.Nifti1Image:
    """dcm2niix's conversion of ``folder`` (the pip package's executable), or skip when it is absent."""
    exe = shutil.which("dcm2niix") or shutil.which("dcm2niix", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("dcm2niix is not installed (pip install dcm2niix, in the dev extra)")
    out.mkdir(parents=True, exist_ok=True)
    # output captured and never shown: dcm2niix prints header values
    done = subprocess.run([exe, "-z", "n", "-b", "n", "-f", "out", "-o", str(out), str(folder)],
                          capture_output=True, check=False, timeout=120)
    written = sorted(out.glob("*.nii"))
    assert done.returncode == 0 and len(written) == 1, (done.returncode, [p.name for p in written])
    return nib.load(str(written[0]))


#: medseg's (display) values = dcm2niix's (Philips floating-point) values x RS x SS: dcm2niix's are 849x / 327x larger.
PHILIPS_FLOAT_FACTOR = {"philips_enhanced_anatomical_001": 1 / 849.0, "philips_enhanced_anatomical_001_implicit": 1 / 326.9}


def _philips_display_to_float_factor(folder: Path) -> float:
    """RescaleSlope x Philips' private MR scale slope (2005,100E): display value / floating-point value.

    Read here independently of medseg (which ignores the private tag); the same for every frame of
    these files, which the test checks.
    """
    ds = pydicom.dcmread(str(next(folder.iterdir())))
    factors = set()
    for frame in ds.PerFrameFunctionalGroupsSequence:
        rescale_slope = float(frame.PixelValueTransformationSequence[0].RescaleSlope)
        private = frame[(0x2005, 0x140F)].value[0]
        factors.add(rescale_slope * float(private[(0x2005, 0x100E)].value))
    assert len(factors) == 1
    return factors.pop()


@pytest.mark.parametrize("name", MULTIFRAME)
def test_multiframe_volume_matches_dicom2nifti_reference_in_world_space(dicom_root: Path, name: str) -> None:
    img = load_scan(dicom_root / "series" / name)
    assert img.shape == (256, 256, 8)
    ours = _canonical(img)
    reference = _canonical(nib.load(str(dicom_root / "series" / f"{name}_reference.nii.gz")))
    assert ours[0].shape == reference[0].shape
    assert np.allclose(ours[1], reference[1], rtol=0, atol=1e-4)
    # medseg's intensity rule (the standard RescaleSlope/Intercept) is dicom2nifti's: equal values
    assert np.allclose(ours[0], reference[0], rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", MULTIFRAME)
def test_multiframe_volume_matches_dcm2niix_in_world_space(dicom_root: Path, tmp_path: Path, name: str) -> None:
    folder = dicom_root / "series" / name
    theirs = _canonical(_dcm2niix(folder, tmp_path / "dcm2niix"))
    ours = _canonical(load_scan(folder))
    assert ours[0].shape == theirs[0].shape
    assert np.allclose(ours[1], theirs[1], rtol=0, atol=1e-4)
    if name.startswith("philips"):
        # dcm2niix applies Philips' floating-point scale: our display values = theirs x RS x SS
        factor = _philips_display_to_float_factor(folder)
        assert factor == pytest.approx(PHILIPS_FLOAT_FACTOR[name], rel=1e-3)
        assert np.allclose(ours[0], theirs[0] * factor, rtol=1e-5, atol=1e-4)
        assert not np.allclose(ours[0], theirs[0], rtol=0.5)
    else:
        assert np.allclose(ours[0], theirs[0], rtol=1e-6, atol=0)


def test_multiframe_frames_are_the_file_pixels_rescaled_in_order_along_the_normal(dicom_root: Path) -> None:
    folder = dicom_root / "series" / "philips_enhanced_anatomical_001_implicit"
    img, report = read_dicom_series_report(folder)
    assert report.clean and report.slices_used == 8
    ds = pydicom.dcmread(str(next(folder.iterdir())))
    frames = ds.PerFrameFunctionalGroupsSequence
    position = [np.array(f.PlanePositionSequence[0].ImagePositionPatient, float) for f in frames]
    # voxel (0, 0, k) lies at frame k's ImagePositionPatient and holds its first pixel x RescaleSlope
    volume = np.asanyarray(img.dataobj)
    lps_of_voxel = [(np.linalg.inv(LPS_TO_RAS) @ img.affine @ [0, 0, k, 1])[:3] for k in range(8)]
    for f, frame in enumerate(frames):
        k = int(np.argmin([np.linalg.norm(p - position[f]) for p in lps_of_voxel]))
        assert np.linalg.norm(lps_of_voxel[k] - position[f]) < 1e-3
        slope = float(frame.PixelValueTransformationSequence[0].RescaleSlope)
        assert np.allclose(volume[:, :, k], (ds.pixel_array[f].T * slope).astype(np.float32))


def test_convert_and_predict_discovery_read_a_multiframe_folder(dicom_root: Path, tmp_path: Path) -> None:
    name = "siemens_multiframe_anatomical_001"
    out = tmp_path / f"{name}.nii.gz"
    assert main(["convert", str(dicom_root / "series" / name), str(out)]) == 0
    written = nib.load(str(out))
    assert int(written.header["qform_code"]) == 1 and int(written.header["sform_code"]) == 1
    ours, reference = _canonical(written), _canonical(nib.load(str(dicom_root / "series" / f"{name}_reference.nii.gz")))
    assert np.allclose(ours[1], reference[1], rtol=0, atol=1e-4)
    assert np.allclose(ours[0], reference[0], rtol=1e-6, atol=0)
    # `medseg predict` finds its inputs with find_scans: each multi-frame folder is one scan
    for case in MULTIFRAME:
        shutil.copytree(dicom_root / "series" / case, tmp_path / "inputs" / case)
    scans = find_scans([tmp_path / "inputs"])
    assert sorted(s.case_id for s in scans) == sorted(f"inputs_{case}" for case in MULTIFRAME)
    assert {load_scan(s).shape for s in scans} == {(256, 256, 8)}


def test_patient_tags_and_frame_dates_of_a_multiframe_file_never_reach_outputs_or_logs(
    dicom_root: Path, tmp_path: Path, caplog, capsys
) -> None:
    source = next((dicom_root / "series" / "siemens_multiframe_anatomical_001").iterdir())
    frame_date = "19030405060708.000000"
    for case, broken in (("good", False), ("bad", True)):
        ds = pydicom.dcmread(str(source))
        for key, value in CANARIES.items():
            setattr(ds, key, value)
        for frame in ds.PerFrameFunctionalGroupsSequence:
            frame.FrameContentSequence[0].FrameAcquisitionDateTime = frame_date
        if broken:  # an error message on a file holding the canaries
            del ds.PerFrameFunctionalGroupsSequence[1].PlanePositionSequence
        (tmp_path / "scans" / case).mkdir(parents=True)
        ds.save_as(str(tmp_path / "scans" / case / "mf.dcm"))
    with caplog.at_level(logging.DEBUG), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["-v", "convert", str(tmp_path / "scans" / "good"), str(tmp_path / "out" / "good.nii.gz")]) == 0
        assert main(["-v", "convert", str(tmp_path / "scans" / "bad"), str(tmp_path / "out" / "bad.nii.gz")]) == 2
    texts = [r.getMessage() for r in caplog.records] + [str(w.message) for w in caught]
    streams = capsys.readouterr()
    texts += [streams.out, streams.err]
    assert "frame 2 of 8 has no PlanePositionSequence" in streams.err
    raw = gzip.decompress((tmp_path / "out" / "good.nii.gz").read_bytes())
    for canary in [*CANARIES.values(), frame_date[:8]]:
        for part in canary.split("^"):
            assert part.encode() not in raw, part
            assert not any(part in t for t in texts), part
