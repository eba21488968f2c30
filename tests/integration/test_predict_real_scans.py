"""Prediction on real scans: every mask has exactly the grid of the scan it came from.

Uses ../shared/data (a real chest CT in NIfTI and real DICOM series); skipped when it is absent.
"""

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medseg.inference.predictor import Predictor
from medseg.inference.runner import predict_paths

DICOM_SERIES = ["torchio_ct_17", "siemens_anatomical_001", "philips_anatomical_001", "generic_anatomical_002_non_isotropic"]


@pytest.fixture(scope="module")
def predictor(trained_run):
    return Predictor.from_checkpoint(trained_run, "cpu")


def test_mask_of_a_real_ct_has_its_exact_geometry(shared_data, trained_run, predictor, tmp_path):
    ct_path = shared_data / "lung_ct" / "lung1_ct.nii.gz"
    summary = predict_paths(trained_run, [ct_path], tmp_path, predictor=predictor)
    assert not summary.failed, summary.describe()
    ct, mask = nib.load(ct_path), nib.load(tmp_path / "lung1_ct.nii.gz")
    assert mask.shape == ct.shape == (512, 512, 48)
    assert np.array_equal(mask.affine, ct.affine)
    for key in ("qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d", "srow_x", "srow_y", "srow_z"):
        assert np.array_equal(mask.header[key], ct.header[key]), key
    assert np.array_equal(mask.header.get_zooms(), ct.header.get_zooms())


def _sitk_ras_affine(folder) -> tuple[np.ndarray, tuple[int, ...]]:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    img = reader.Execute()
    direction = np.array(img.GetDirection()).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction * np.array(img.GetSpacing())
    affine[:3, 3] = img.GetOrigin()
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine, img.GetSize()


@pytest.mark.parametrize("name", DICOM_SERIES)
def test_mask_of_a_dicom_series_matches_simpleitk_geometry(shared_data, trained_run, predictor, tmp_path, name):
    folder = shared_data / "dicom" / "series" / name
    summary = predict_paths(trained_run, [folder], tmp_path, predictor=predictor)
    assert not summary.failed, summary.describe()
    mask = nib.load(tmp_path / f"{name}.nii.gz")
    affine, size = _sitk_ras_affine(folder)
    assert mask.shape == tuple(size)
    np.testing.assert_allclose(mask.affine, affine, atol=1e-4)
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1, 2}


CANARIES = {"PatientName": "ZZCANARY^PERSON", "PatientID": "CANARYID9876", "PatientBirthDate": "19010203",
            "StudyDate": "19020304", "InstitutionName": "CANARY HOSPITAL OF QUUX"}


def test_predict_and_its_lesion_report_carry_no_patient_identifiers(shared_data, trained_run, tmp_path, caplog, capsys):
    import gzip
    import io
    import logging

    import pydicom

    from medseg.cli import main
    from tests.conftest import SEG_ALLOWED_PATIENT_STUDY_TAGS

    folder = tmp_path / "in" / "series_a"
    folder.mkdir(parents=True)
    for path in sorted((shared_data / "dicom" / "series" / "torchio_ct_17").iterdir()):
        ds = pydicom.dcmread(str(path))
        for key, value in CANARIES.items():
            setattr(ds, key, value)
        ds.save_as(str(folder / path.name))
    out = tmp_path / "out"
    with caplog.at_level(logging.DEBUG):
        code = main(["-v", "predict", "--model", str(trained_run), "--input", str(folder), "--output", str(out),
                     "--device", "cpu", "--report", "--lesion-classes", "2"])
    assert code == 0
    names = sorted(p.name for p in out.iterdir())
    assert "series_a.nii.gz" in names and "lesion_inventory.csv" in names
    texts = [r.getMessage() for r in caplog.records] + list(capsys.readouterr())
    assert "series_a.seg.dcm" in names  # a DICOM series gets a SEG by default
    for path in out.iterdir():
        raw = path.read_bytes()
        raw = gzip.decompress(raw) if path.suffix == ".gz" else raw
        if path.name.endswith(".seg.dcm"):  # the SEG must carry the patient/study module, and nothing more
            seg = pydicom.dcmread(path)
            assert str(seg.PatientName) == CANARIES["PatientName"]
            for keyword in SEG_ALLOWED_PATIENT_STUDY_TAGS:
                seg.pop(keyword, None)
            buffer = io.BytesIO()
            seg.save_as(buffer, enforce_file_format=True)
            raw = buffer.getvalue()
        for canary in CANARIES.values():
            for part in canary.split("^"):
                assert part.encode() not in raw, (path.name, part)
                assert part not in path.name
                assert not any(part in t for t in texts), part
