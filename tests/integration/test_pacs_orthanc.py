"""A study on a real PACS: Orthanc with DICOMweb, started on loopback with generated credentials.

medseg retrieves the study, segments each CT series, stores the DICOM-SEG back; a rerun stores nothing
new; a wrong password, a server that is down or silent, an unknown study and a study of another modality
each give a clear error and store nothing.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.orthanc_server import orthanc, unavailable_reason, upload_folder

pytest.importorskip("dicomweb_client", reason="DICOMweb needs medseg[dicom] (dicomweb-client)")
_why = unavailable_reason()
pytestmark = pytest.mark.skipif(_why is not None, reason=_why or "")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with orthanc(tmp_path_factory.mktemp("orthanc")) as running:
        yield running


def _medseg(*args: str, env_auth: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    import os

    env = {k: v for k, v in os.environ.items() if k != "MEDSEG_DICOMWEB_AUTH"}
    if env_auth is not None:
        env["MEDSEG_DICOMWEB_AUTH"] = env_auth
    return subprocess.run([sys.executable, "-m", "medseg", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)


def _series_on_server(server, study_uid: str) -> list[dict]:
    import requests

    r = requests.get(f"{server.dicomweb_url}/studies/{study_uid}/series", auth=server.user_password, timeout=30)
    r.raise_for_status()
    return r.json() if r.content else []


def _study_uid(folder: Path) -> str:
    import pydicom

    first = next(p for p in sorted(folder.iterdir()) if p.is_file())
    return str(pydicom.dcmread(first, stop_before_pixels=True).StudyInstanceUID)


def test_a_study_is_segmented_and_its_seg_stored_once(server, shared_data, trained_run, tmp_path):
    from tests.integration.test_dicom_seg_real import _seg_labels  # reads a SEG back independently of medseg

    source = shared_data / "dicom" / "series" / "torchio_ct_17"
    upload_folder(server, source)
    study = _study_uid(source)
    before = len(_series_on_server(server, study))

    run = _medseg("predict", "--model", str(trained_run), "--dicomweb", server.dicomweb_url, "--study", study,
                  "--output", str(tmp_path / "out"), "--device", "cpu", env_auth=server.auth)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 segmentation(s) stored" in run.stdout
    series = _series_on_server(server, study)
    assert len(series) == before + 1
    assert server.auth.split(":")[1] not in run.stdout + run.stderr

    # The SEG fetched back from the PACS decodes to exactly the mask of a local predict of the same series.
    import requests
    from dicomweb_client.api import DICOMwebClient

    session = requests.Session()
    session.auth = server.user_password
    client = DICOMwebClient(server.dicomweb_url, session=session)
    seg_series = [s["0020000E"]["Value"][0] for s in series if s["00080060"]["Value"][0] == "SEG"]
    assert len(seg_series) == 1
    (seg,) = client.retrieve_series(study, seg_series[0])
    local = _medseg("predict", "--model", str(trained_run), "--input", str(source), "--output", str(tmp_path / "local"),
                    "--device", "cpu", "--output-format", "nifti")
    assert local.returncode == 0, local.stdout + local.stderr
    mask = np.asarray(nib.load(tmp_path / "local" / "torchio_ct_17.nii.gz").dataobj)
    assert mask.any(), "the test needs a non-empty prediction"
    seg.save_as(tmp_path / "fetched.seg.dcm", enforce_file_format=True)
    assert np.array_equal(_seg_labels(tmp_path / "fetched.seg.dcm", source, mask.shape), mask)

    again = _medseg("predict", "--model", str(trained_run), "--dicomweb", server.dicomweb_url, "--study", study,
                    "--output", str(tmp_path / "out2"), "--device", "cpu", env_auth=server.auth)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "0 segmentation(s) stored, 1 already on the server" in again.stdout
    assert len(_series_on_server(server, study)) == before + 1


def test_every_storable_format_asked_for_is_stored_once(server, trained_run, tmp_path):
    """The store step reads the output-format registry: a SEG and an RTSTRUCT, each under its derived UIDs."""
    import pydicom

    from tests.unit.dicom_synth import write_series

    study = "1.2.826.0.1.3680043.8.498.79"
    write_series(tmp_path / "ct", count=6, step=(0.0, 0.0, 3.0), StudyInstanceUID=study)
    upload_folder(server, tmp_path / "ct")
    args = ["predict", "--model", str(trained_run), "--dicomweb", server.dicomweb_url, "--study", study,
            "--device", "cpu", "--output-format", "dicom-seg,rtstruct"]
    run = _medseg(*args, "--output", str(tmp_path / "out"), env_auth=server.auth)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 segmentation(s) stored" in run.stdout
    modalities = sorted(s["00080060"]["Value"][0] for s in _series_on_server(server, study))
    assert modalities == ["CT", "RTSTRUCT", "SEG"]
    local = sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.endswith(".dcm"))
    assert len(local) == 2 and any(n.endswith(".rtstruct.dcm") for n in local)
    rtstruct = pydicom.dcmread(next((tmp_path / "out").glob("*.rtstruct.dcm")))
    assert rtstruct.StudyInstanceUID == study
    again = _medseg(*args, "--output", str(tmp_path / "out2"), env_auth=server.auth)
    assert again.returncode == 0 and "0 segmentation(s) stored, 1 already on the server" in again.stdout
    assert len(_series_on_server(server, study)) == 3


def test_wrong_credentials_another_modality_and_an_unknown_study_are_named(server, trained_run, tmp_path):
    from tests.unit.dicom_synth import write_series

    study = "1.2.826.0.1.3680043.8.498.78"
    write_series(tmp_path / "mr", count=3, StudyInstanceUID=study, Modality="MR")
    upload_folder(server, tmp_path / "mr")
    args = ["predict", "--model", str(trained_run), "--dicomweb", server.dicomweb_url, "--output", str(tmp_path / "o"),
            "--device", "cpu"]
    wrong = tmp_path / "wrong.txt"
    wrong.write_text(server.auth.split(":")[0] + ":not-the-password\n")
    refused = _medseg(*args, "--study", study, "--dicomweb-auth-file", str(wrong))
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "HTTP 401 (wrong or missing credentials)" in refused.stderr
    assert "not-the-password" not in refused.stdout + refused.stderr

    good = tmp_path / "auth.txt"  # credentials from a file; the server now answers, and the MR study is refused
    good.write_text(server.auth + "\n")
    other = _medseg(*args, "--study", study, "--dicomweb-auth-file", str(good))
    assert other.returncode != 0 and "no series of modality CT (it has MR)" in other.stderr
    assert len(_series_on_server(server, study)) == 1  # nothing stored

    unknown = _medseg(*args, "--study", "1.2.3.4.5.6.7", env_auth=server.auth)
    assert unknown.returncode != 0 and "study 1.2.3.4.5.6.7 not found" in unknown.stderr
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_a_server_that_is_down_or_silent_gives_a_clear_error(trained_run, tmp_path):
    from tests.orthanc_server import free_port

    down = _medseg("predict", "--model", str(trained_run), "--dicomweb", f"http://127.0.0.1:{free_port()}/dicom-web",
                   "--study", "1.2.3", "--output", str(tmp_path / "o"), "--device", "cpu", env_auth="u:p")
    assert down.returncode != 0 and "cannot connect" in down.stderr and "Traceback" not in down.stderr

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)  # accepts connections, never answers
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.append(silent.accept()[0]), daemon=True).start()
    try:
        port = silent.getsockname()[1]
        slow = _medseg("predict", "--model", str(trained_run), "--dicomweb", f"http://127.0.0.1:{port}/dicom-web",
                       "--study", "1.2.3", "--dicomweb-timeout", "2", "--output", str(tmp_path / "o"),
                       "--device", "cpu", env_auth="u:p")
    finally:
        silent.close()
        for conn in accepted:
            conn.close()
    assert slow.returncode != 0 and "timed out" in slow.stderr
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
