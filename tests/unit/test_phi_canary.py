"""Patient data canaries on synthetic DICOM (runs on a fresh clone, no ../shared needed).

Canary strings go into the patient, study and institution tags of two series: one that is segmented
(NIfTI, sidecars, DICOM-SEG and a lesion report) and one with a missing slice that fails. The SEG may
carry them in its Patient and General Study attributes and nowhere else; every other output file, file
name, failures.csv, log record (at DEBUG), warning, stdout and stderr must be free of them.
"""

from __future__ import annotations

import gzip
import io
import logging
import warnings
from pathlib import Path

import pydicom
import pytest

from medseg.cli import main
from medseg.io.mask_writers import PATIENT_STUDY_TAGS
from tests.conftest import SEG_ALLOWED_PATIENT_STUDY_TAGS
from tests.unit.dicom_synth import write_series

pytest.importorskip("highdicom", reason="DICOM-SEG needs highdicom (pip install medseg[dicom])")

CANARIES = {
    "PatientName": "ZZCANARYNAMEQUUXINA",  # one component: highdicom warns about it, quoting the name
    "PatientID": "CANARYPID4242",
    "PatientBirthDate": "19010203",
    "StudyDate": "19020304",
    "AccessionNumber": "CANARYACC77",
    "ReferringPhysicianName": "CANARYDOC^ZEDEKIAH",
    "InstitutionName": "CANARY INSTITUTE OF QUUX",
    "OtherPatientIDs": "CANARYOTHERID5",
    "PatientAddress": "CANARYSTREET 9",
}
PARTS = sorted({part for value in CANARIES.values() for part in [value, *value.split("^")]})


@pytest.fixture(scope="module")
def untrained_model(tmp_path_factory) -> Path:
    """A bundle with random weights: enough to run predict end to end in seconds."""
    from medseg.models.bundle import ModelBundle
    from medseg.models.registry import build_model
    from tests.conftest import tiny_config

    folder = tmp_path_factory.mktemp("model")
    config = tiny_config(folder / "none.json", folder)
    bundle = ModelBundle.from_config(config, {0: "background", 1: "lung", 2: "nodule"}, 1)
    bundle.with_weights(build_model(config.model, 1, 3).state_dict()).save(folder / "best.pt")
    return folder


def test_medseg_copies_no_patient_or_study_attribute_beyond_the_allowed_ones():
    # medseg's list may be narrower than the standard's type 1/2 set, never wider.
    assert set(PATIENT_STUDY_TAGS) <= set(SEG_ALLOWED_PATIENT_STUDY_TAGS)


def _without_allowed(seg_path: Path) -> bytes:
    """The SEG re-encoded without its Patient and General Study attributes (where canaries may be)."""
    ds = pydicom.dcmread(str(seg_path))
    for keyword in SEG_ALLOWED_PATIENT_STUDY_TAGS:
        if keyword in ds:
            del ds[keyword]
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_patient_data_reach_only_the_seg_patient_and_study_attributes(untrained_model, tmp_path, caplog, capsys):
    write_series(tmp_path / "in" / "good", 4, **CANARIES)
    bad = write_series(tmp_path / "in" / "bad", 5, **CANARIES)
    bad[2].unlink()  # a missing slice: this series fails, with a message about its geometry
    out = tmp_path / "out"
    with caplog.at_level(logging.DEBUG), warnings.catch_warnings(record=True) as caught:  # noqa: SIM117
        warnings.simplefilter("always")
        code = main(["-v", "predict", "--model", str(untrained_model), "--input", str(tmp_path / "in"), "--output",
                     str(out), "--device", "cpu", "--output-format", "both", "--report", "--lesion-classes", "2"])
    assert code == 1  # one scan failed
    names = sorted(p.name for p in out.rglob("*"))
    assert {"in_good.nii.gz", "in_good.seg.dcm", "in_good.ctbl", "in_good.itksnap.txt", "failures.csv"} <= set(names)
    assert "missing slice" in (out / "failures.csv").read_text()
    seg = pydicom.dcmread(str(out / "in_good.seg.dcm"))
    assert str(seg.PatientName) == CANARIES["PatientName"] and seg.AccessionNumber == CANARIES["AccessionNumber"]
    streams = capsys.readouterr()
    texts = [r.getMessage() for r in caplog.records] + [str(w.message) for w in caught] + [streams.out, streams.err]
    assert any(str(tmp_path / "in" / "bad") in t for t in texts)  # the failure was reported at all
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        raw = path.read_bytes()
        if path.name.endswith(".seg.dcm"):
            raw = _without_allowed(path)
        elif path.suffix == ".gz":
            raw = gzip.decompress(raw)
        for part in PARTS:
            assert part.encode() not in raw, (path.name, part)
            assert part not in path.name
    for part in PARTS:
        assert not any(part in t for t in texts), part
