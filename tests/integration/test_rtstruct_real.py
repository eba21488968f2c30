"""RT structure sets of real series (../shared/data/dicom/series): a CT, two single-frame MRs and a
multi-frame MR, with masks holding holes and several islands per slice. Each file passes dciodvfy, and its
contours, rasterised back onto the source grid by pixel centres with the even-odd rule (independently of
medseg's reader, tests/unit/rtstruct_raster.py), give the NIfTI mask written beside it: Dice >= 0.95 per
ROI is the bar of issue 19; the writer's contours give Dice 1.0 (the exact mask). Also a CT copy whose
data sets have blank SOP Class/Instance UIDs (file meta kept), as some anonymisers leave them."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from medseg.data.labels import label_code, label_table
from medseg.io.mask_writers import ModelInfo, NiftiMaskWriter
from medseg.io.nifti import mask_like
from medseg.io.rtstruct import RtStructWriter
from medseg.io.scans import find_scans, load_scan
from tests.unit.rtstruct_raster import dice, rasterise, structures

SERIES = ["torchio_ct_17", "philips_anatomical_001", "siemens_anatomical_001", "philips_enhanced_anatomical_001"]
NAMES = {1: "ring", 2: "core", 3: "bright"}
MODEL = ModelInfo("threshold", tuple(label.model_copy(update={"code": label_code(label)})
                                     for label in label_table({0: "background", **NAMES})))


def _dciodvfy_errors(path: Path) -> list[str]:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy not installed (Debian package dicom3tools)")
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def _check(folder: Path, out: Path) -> dict[str, float]:
    """Write the NIfTI mask and the RT structure set of ``structures`` on ``folder``'s series; check the
    RTSTRUCT with dciodvfy and rasterised against the NIfTI mask read back; return the per-ROI Dice."""
    scan = find_scans([folder])[0]
    image = load_scan(scan)
    mask = mask_like(structures(image.shape, np.asarray(image.dataobj)), image)
    NiftiMaskWriter().write(scan, image, mask, out / f"{scan.case_id}.nii.gz")
    path = out / f"{scan.case_id}.rtstruct.dcm"
    RtStructWriter(MODEL).write(scan, image, mask, path)
    assert _dciodvfy_errors(path) == []
    labels = np.asarray(nib.load(out / f"{scan.case_id}.nii.gz").dataobj)
    ds = pydicom.dcmread(str(path))
    ring = next(item for item in ds.ROIContourSequence if int(item.ReferencedROINumber) == 1)
    per_image = {}
    for contour in ring.ContourSequence:
        ref = contour.ContourImageSequence[0]
        key = (ref.ReferencedSOPInstanceUID, ref.get("ReferencedFrameNumber"))
        per_image[key] = per_image.get(key, 0) + 1
    assert len(per_image) == labels.shape[2] and min(per_image.values()) == 3  # outline, hole, second island
    back = rasterise(path, folder)
    scores = {name: dice(back[name], labels == value) for value, name in NAMES.items()}
    print(f"{folder.name}: Dice per ROI {scores}")
    for value, name in NAMES.items():
        assert (labels == value).any(), name  # every ROI has something to get right
        assert scores[name] >= 0.95, (name, scores)
        assert np.array_equal(back[name], labels == value), (name, scores)  # the writer's promise: exact
    return scores


@pytest.mark.parametrize("name", SERIES)
def test_rtstruct_of_a_real_series_is_valid_and_rasterises_back_to_the_mask(shared_data, tmp_path, name):
    _check(shared_data / "dicom" / "series" / name, tmp_path)


def test_rtstruct_of_a_real_ct_with_blank_sop_uids_references_the_file_meta_uids(shared_data, tmp_path):
    folder = tmp_path / "blank" / "torchio_ct_17"
    folder.mkdir(parents=True)
    metas = set()
    for source in sorted((shared_data / "dicom" / "series" / "torchio_ct_17").iterdir()):
        ds = pydicom.dcmread(str(source))
        ds.SOPClassUID, ds.SOPInstanceUID = "", ""
        ds.save_as(str(folder / source.name), enforce_file_format=True)
        metas.add(ds.file_meta.MediaStorageSOPInstanceUID)
    _check(folder, tmp_path)
    ds = pydicom.dcmread(str(tmp_path / "torchio_ct_17.rtstruct.dcm"))  # case id: the folder name
    series = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert {item.ReferencedSOPInstanceUID for item in series.ContourImageSequence} == metas
