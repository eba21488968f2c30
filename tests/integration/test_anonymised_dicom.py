"""Real CT and MR series as some anonymisers leave them: SOP Class UID and SOP Instance UID emptied in every data
set, the file meta (Media Storage SOP Class/Instance UID) kept. The default ``medseg predict`` writes the NIfTI
mask and a DICOM-SEG that dciodvfy accepts and that reads back as the mask; a file with neither is refused
with the attribute named, and the NIfTI mask is still written."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from medseg.cli import main
from tests.integration.test_dicom_seg_real import _dciodvfy_errors, _seg_labels
from tests.unit.test_pipeline_faces import _bundle

pytest.importorskip("highdicom", reason="DICOM-SEG needs highdicom (pip install medseg[dicom])")

SERIES = {"torchio_ct_17": "CT", "philips_anatomical_001": "MR"}


def _anonymised_copy(source: Path, target: Path, keep_meta: bool = True) -> Path:
    shutil.copytree(source, target)
    for path in sorted(p for p in target.iterdir() if p.is_file()):
        ds = pydicom.dcmread(path)
        # The file meta holds the data set's identity (one vendor file here disagrees; the test needs them equal).
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SOPClassUID = ""
        ds.SOPInstanceUID = ""
        if not keep_meta:
            del ds.file_meta.MediaStorageSOPInstanceUID
        ds.save_as(path)
    return target


@pytest.fixture(scope="module")
def model_run(tmp_path_factory) -> Path:
    return _bundle(tmp_path_factory.mktemp("anon") / "run", 1)


@pytest.mark.parametrize("name", sorted(SERIES))
def test_default_predict_writes_mask_and_valid_seg_for_a_series_with_empty_sop_uids(
        shared_data, model_run, tmp_path, name):
    source = shared_data / "dicom" / "series" / name
    assert pydicom.dcmread(next(p for p in sorted(source.iterdir()) if p.is_file())).Modality == SERIES[name]
    series = _anonymised_copy(source, tmp_path / "in" / name)
    out = tmp_path / "out"
    assert main(["predict", "--model", str(model_run), "--input", str(series), "--output", str(out),
                 "--device", "cpu"]) == 0
    mask = np.asarray(nib.load(out / f"{name}.nii.gz").dataobj)
    seg_path = out / f"{name}.seg.dcm"
    assert _dciodvfy_errors(seg_path) == []
    assert np.array_equal(_seg_labels(seg_path, source, mask.shape), mask)
    # Each frame references the instance UID the file meta holds (the untouched source's).
    seg = pydicom.dcmread(seg_path)
    referenced = {item.ReferencedSOPInstanceUID for frame in seg.PerFrameFunctionalGroupsSequence
                  for item in frame.DerivationImageSequence[0].SourceImageSequence}
    originals = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in source.iterdir() if p.is_file()}
    assert referenced and referenced <= originals


def test_a_series_with_no_instance_uid_anywhere_is_refused_naming_it_and_keeps_its_mask(
        shared_data, model_run, tmp_path):
    series = _anonymised_copy(shared_data / "dicom" / "series" / "torchio_ct_17", tmp_path / "in" / "ct",
                              keep_meta=False)
    out = tmp_path / "out"
    assert main(["predict", "--model", str(model_run), "--input", str(series), "--output", str(out),
                 "--device", "cpu"]) == 1
    assert (out / "ct.nii.gz").is_file() and not (out / "ct.seg.dcm").exists()
    with (out / "failures.csv").open(newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["format"] == "dicom-seg" and row["error"] == "OutputError"
    assert "SOPInstanceUID is empty and the file meta has no MediaStorageSOPInstanceUID" in row["message"]
