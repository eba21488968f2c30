"""The PACS client's pieces that need no server: SEG UIDs stable per series and model, credentials only from
the environment or a file, names that are not DICOM identifiers. (The round trip: tests/integration.)"""

from __future__ import annotations

import re

import pytest

pytest.importorskip("dicomweb_client", reason="DICOMweb needs medseg[dicom] (dicomweb-client)")

from medseg.errors import PacsError  # noqa: E402
from medseg.inference.pacs import seg_uids  # noqa: E402
from medseg.io.dicomweb import AUTH_ENV, DicomWebSettings, connect, local_name  # noqa: E402


def test_seg_uids_are_valid_new_and_the_same_for_one_series_and_model():
    first = seg_uids("1.2.840.1.2", "aa" * 32)
    assert first == seg_uids("1.2.840.1.2", "aa" * 32)  # a rerun finds what it stored
    assert first != seg_uids("1.2.840.1.3", "aa" * 32) and first != seg_uids("1.2.840.1.2", "bb" * 32)
    for uid in first:
        assert re.fullmatch(r"2\.25\.(0|[1-9][0-9]*)", uid) and len(uid) <= 64
    assert first[0] != first[1]


def test_credentials_come_from_a_file_or_the_environment_never_elsewhere(tmp_path, monkeypatch):
    monkeypatch.setenv(AUTH_ENV, "alice:from-env")
    assert connect(DicomWebSettings("http://127.0.0.1:1/dicom-web"))._session.auth == ("alice", "from-env")
    secret = tmp_path / "auth"
    secret.write_text("Bearer tok123\n")
    session = connect(DicomWebSettings("http://127.0.0.1:1/dicom-web", auth_file=secret))._session
    assert session.headers["Authorization"] == "Bearer tok123" and session.auth is None
    secret.write_text("no-colon-here")
    with pytest.raises(PacsError, match="user:password") as refused:
        connect(DicomWebSettings("http://127.0.0.1:1/dicom-web", auth_file=secret))
    assert "no-colon-here" not in str(refused.value)


def test_local_names_are_hashes_not_uids():
    name = local_name("1.2.840.113619.2.55.3.604688119.868.1249538112.418")
    assert re.fullmatch(r"series-[0-9a-f]{12}", name)
