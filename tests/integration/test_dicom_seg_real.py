"""DICOM-SEG of real series (../shared/data/dicom/series): single-frame CT and MR, compressed sources
(JPEG lossless, JPEG-LS, JPEG 2000, RLE) and multi-frame Philips/Siemens files. Each SEG passes dciodvfy
and, read back by highdicom through its source references, gives exactly the mask on the source grid:
the NIfTI mask ``medseg predict --output-format both`` wrote, and a threshold mask with every class."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from medseg.data.labels import label_code, label_table
from medseg.inference.predictor import Predictor
from medseg.inference.runner import predict_paths
from medseg.io.mask_writers import DicomSegWriter, ModelInfo
from medseg.io.nifti import mask_like
from medseg.io.scans import find_scans, load_scan

hd = pytest.importorskip("highdicom", reason="DICOM-SEG needs highdicom (pip install medseg[dicom])")

SERIES = [
    "torchio_ct_17", "philips_anatomical_001", "siemens_anatomical_001", "generic_anatomical_002_non_isotropic",
    "generic_compressed_jpeg_001", "generic_compressed_jpegls_001", "generic_compressed_j2k_001",
    "generic_compressed_rle_001",
    "philips_enhanced_anatomical_001", "philips_enhanced_anatomical_001_implicit", "siemens_multiframe_anatomical_001",
]
MODEL = ModelInfo("threshold", tuple(label.model_copy(update={"code": label_code(label)})
                                     for label in label_table({0: "background", 1: "tissue", 2: "bright"})))


def _dciodvfy_errors(path: Path) -> list[str]:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy not installed (Debian package dicom3tools)")
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (run.stdout + run.stderr).splitlines() if "Error" in line]


def _source_planes(folder: Path) -> list[tuple[str, int | None, float]]:
    """(SOPInstanceUID, frame or None, distance along the normal in mm) of every source plane, sorted by
    distance: computed here from the files, independently of medseg's reader."""
    planes = []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
        if "PerFrameFunctionalGroupsSequence" in ds:
            shared = ds.get("SharedFunctionalGroupsSequence", [pydicom.Dataset()])[0]
            for number, frame in enumerate(ds.PerFrameFunctionalGroupsSequence, start=1):
                orientation = (frame.get("PlaneOrientationSequence") or shared.PlaneOrientationSequence)[0]
                normal = np.cross(*np.reshape(np.array(orientation.ImageOrientationPatient, float), (2, 3)))
                position = np.array(frame.PlanePositionSequence[0].ImagePositionPatient, float)
                planes.append((ds.SOPInstanceUID, number, float(position @ normal)))
        else:
            normal = np.cross(*np.reshape(np.array(ds.ImageOrientationPatient, float), (2, 3)))
            planes.append((ds.SOPInstanceUID, None, float(np.array(ds.ImagePositionPatient, float) @ normal)))
    return sorted(planes, key=lambda p: p[2])


def _seg_labels(seg_path: Path, folder: Path, shape: tuple[int, int, int]) -> np.ndarray:
    """The SEG's label map as (columns, rows, slices), slices in the sources' order along the normal."""
    seg = hd.seg.segread(seg_path)
    planes = _source_planes(folder)
    assert len(planes) == shape[2]
    if planes[0][1] is not None:
        pixels = seg.get_pixels_by_source_frame(planes[0][0], [p[1] for p in planes], combine_segments=True,
                                                assert_missing_frames_are_empty=True)
    else:
        pixels = seg.get_pixels_by_source_instance([p[0] for p in planes], combine_segments=True,
                                                   assert_missing_frames_are_empty=True)
    return np.asarray(pixels).transpose(2, 1, 0)


@pytest.mark.parametrize("name", SERIES)
def test_seg_of_a_threshold_mask_is_valid_and_exact(shared_data, tmp_path, name):
    folder = shared_data / "dicom" / "series" / name
    scan = find_scans([folder])[0]
    image = load_scan(scan)
    values = np.asarray(image.dataobj)
    low, high = np.percentile(values, [50, 90])
    labels = ((values > low).astype(np.uint8) + (values > high)).astype(np.uint8)
    path = tmp_path / f"{name}.seg.dcm"
    DicomSegWriter(MODEL).write(scan, image, mask_like(labels, image), path)
    assert _dciodvfy_errors(path) == []
    assert np.array_equal(_seg_labels(path, folder, image.shape), labels)


def test_predicted_seg_reads_back_as_the_nifti_mask(shared_data, trained_run, tmp_path):
    folders = [shared_data / "dicom" / "series" / name for name in SERIES]
    summary = predict_paths(trained_run, folders, tmp_path, predictor=Predictor.from_checkpoint(trained_run, "cpu"),
                            output_format="both")
    assert not summary.failed, summary.describe()
    for name, folder in zip(SERIES, folders, strict=True):
        mask = np.asarray(nib.load(tmp_path / f"{name}.nii.gz").dataobj)
        seg_path = tmp_path / f"{name}.seg.dcm"
        assert _dciodvfy_errors(seg_path) == [], name
        assert np.array_equal(_seg_labels(seg_path, folder, mask.shape), mask), name
