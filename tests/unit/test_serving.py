"""The inference service: auth, upload checks, queue bound, persistence, dead workers, metrics, and masks
identical to ``medseg predict``'s."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")
pytest.importorskip("python_multipart", reason="the serve extra (python-multipart) is not installed")
pytest.importorskip("prometheus_client", reason="the serve extra (prometheus-client) is not installed")

from fastapi.testclient import TestClient  # noqa: E402

from medseg.data.phantom import make_phantom  # noqa: E402
from medseg.errors import MedsegError  # noqa: E402
from medseg.inference.runner import predict_paths  # noqa: E402
from medseg.models.bundle import load_bundle  # noqa: E402
from medseg.serving import auth as auth_module  # noqa: E402
from medseg.serving.app import ServeSettings, create_app  # noqa: E402
from medseg.serving.audit import AuditLog  # noqa: E402
from medseg.serving.auth import TokenSet, token_id  # noqa: E402
from medseg.serving.jobs import JobStore, new_job_id  # noqa: E402
from medseg.serving.server import check_security  # noqa: E402
from medseg.serving.uploads import UploadError, receive_scan  # noqa: E402
from tests.conftest import REPO_ROOT, TINY_SPEC, FakeClock, tiny_config  # noqa: E402
from tests.unit.dicom_synth import write_series  # noqa: E402

try:  # the dicom extra: without it the service writes no DICOM-SEG
    import highdicom as hd
except ImportError:
    hd = None

TOKEN = "token-for-tests-0123456789"
OTHER = "another-token-abcdefghijk"


@pytest.fixture(scope="module")
def model_run(tmp_path_factory) -> Path:
    """An untrained tiny 3D U-Net saved as a model bundle (deterministic, which is all equality needs)."""
    import torch

    from medseg.models import build_model
    from medseg.models.bundle import ModelBundle

    run = tmp_path_factory.mktemp("serve_model") / "run"
    config = tiny_config(run.parent / "unused.json", run)
    torch.manual_seed(0)
    names = {0: "background", 1: "lung", 2: "nodule"}
    ModelBundle.from_config(config, names, in_channels=1).with_weights(
        build_model(config.model, 1, 3).state_dict()).save(run / "best.pt")
    return run


@pytest.fixture(scope="module")
def scan_file(tmp_path_factory) -> Path:
    """A phantom CT on an LPS grid (qform and sform set), so a geometry slip would show."""
    image, _, affine, _ = make_phantom(np.random.default_rng(4), TINY_SPEC)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    img = nib.Nifti1Image(image.astype(np.float32), lps)
    img.set_qform(lps, code=1)
    img.set_sform(lps, code=1)
    path = tmp_path_factory.mktemp("serve_scan") / "phantom.nii.gz"
    nib.save(img, path)
    return path


def _until(condition, timeout: float = 60.0, what: str = "condition"):
    """Poll ``condition`` until it returns something true (a worker thread is involved); fail at the deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.02)
    raise AssertionError(f"{what} not met within {timeout} s")


def _settings(model_run: Path, data_dir: Path, **overrides) -> ServeSettings:
    values = {"model": model_run, "data_dir": data_dir, "tokens": TokenSet([TOKEN, OTHER]), "device": "cpu",
              "poll_s": 0.05, "max_upload_bytes": 4 * 1024 * 1024, "rate_per_minute": 0, **overrides}
    return ServeSettings(**values)


def _auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _post(client: TestClient, content: bytes, token: str | None = TOKEN, name: str = "upload.bin"):
    return client.post("/v1/segmentations", files={"scan": (name, content)}, headers=_auth(token) if token else {})


def _wait(client: TestClient, job_id: str, token: str = TOKEN, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = client.get(f"/v1/jobs/{job_id}", headers=_auth(token)).json()
        if state["status"] in ("done", "failed"):
            return state
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} not finished within {timeout} s: {state}")


def _nothing_stored(data_dir: Path) -> None:
    """No job row, no job folder, no staged upload left."""
    assert JobStore(data_dir / "jobs.sqlite").all() == []
    for sub in ("jobs", "incoming"):
        folder = data_dir / sub
        assert not folder.exists() or not any(folder.iterdir()), f"{sub}/ holds {list(folder.iterdir())}"


def _zip(members: dict[str, bytes], symlinks: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return buf.getvalue()


def test_requests_without_a_valid_token_get_401_and_store_nothing(model_run, scan_file, tmp_path):
    data = scan_file.read_bytes()
    with TestClient(create_app(_settings(model_run, tmp_path, workers=0))) as client:
        for token in (None, "wrong-token-0123456789", TOKEN[:-1]):
            r = _post(client, data, token=token)
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        r = client.post("/v1/segmentations", files={"scan": ("a", data)}, headers={"Authorization": f"Basic {TOKEN}"})
        assert r.status_code == 401
        assert client.get(f"/v1/jobs/{new_job_id()}").status_code == 401
    _nothing_stored(tmp_path)


def test_every_known_token_is_compared_in_constant_time(monkeypatch):
    tokens = TokenSet([TOKEN, OTHER, "third-token-0123456789"])
    calls = []
    real = auth_module.hmac.compare_digest

    def spy(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(auth_module.hmac, "compare_digest", spy)
    assert tokens.identify(f"Bearer {TOKEN}") == token_id(TOKEN)
    # No early exit on the first (matching) token, and digests of equal length whatever was sent.
    assert calls == [(32, 32)] * 3
    calls.clear()
    assert tokens.identify("Bearer x") is None and calls == [(32, 32)] * 3


def test_tokens_come_from_env_and_file_and_short_ones_are_refused(tmp_path, monkeypatch):
    file = tmp_path / "tokens"
    file.write_text(f"# ops team\n{OTHER}\n\n")
    monkeypatch.setenv("MEDSEG_API_TOKENS", f" {TOKEN} ,")
    tokens = TokenSet.from_sources(token_file=file)
    assert len(tokens) == 2 and tokens.identify(f"Bearer {OTHER}") == token_id(OTHER)
    with pytest.raises(MedsegError, match="shorter than 16"):
        TokenSet(["short"])
    with pytest.raises(MedsegError, match="cannot read the token file"):
        TokenSet.from_sources(env="", token_file=tmp_path / "missing")


def test_a_changed_token_file_takes_effect_without_a_restart(model_run, tmp_path):
    """Revoking a token is editing the file: the next request sees it (no restart); a file removed leaves
    only the environment's tokens; a too-short token in an edited file is skipped, the others stay valid."""
    file = tmp_path / "tokens"
    file.write_text(f"{TOKEN}\n{OTHER}\n")
    tokens = TokenSet.from_sources(env="env-token-0123456789", token_file=file)
    with TestClient(create_app(_settings(model_run, tmp_path / "d", workers=0, tokens=tokens))) as client:
        def status(token: str) -> int:
            return client.get("/v1/jobs", headers=_auth(token)).status_code

        assert [status(TOKEN), status(OTHER), status("env-token-0123456789")] == [200, 200, 200]
        replacement = tmp_path / "tokens.new"
        replacement.write_text(f"{TOKEN}\n")  # OTHER revoked, the file replaced as an editor or a script would
        os.replace(replacement, file)
        assert [status(TOKEN), status(OTHER)] == [200, 401]
        with file.open("a") as f:  # edited in place: a new token appended, and a typo
            f.write(f"{OTHER}-new\nshort\n")
        assert [status(TOKEN), status(f"{OTHER}-new"), status("short")] == [200, 200, 401]
        file.unlink()
        assert [status(TOKEN), status("env-token-0123456789")] == [401, 200]
        file.write_text(f"{OTHER}\n")
        assert [status(TOKEN), status(OTHER)] == [401, 200]


def test_server_refuses_to_start_without_a_token_unless_insecure_local_on_loopback(model_run, tmp_path):
    none = _settings(model_run, tmp_path, tokens=TokenSet([]))
    with pytest.raises(MedsegError, match="no API token"):
        check_security(none, "127.0.0.1")
    local = _settings(model_run, tmp_path, tokens=TokenSet([]), insecure_local=True)
    check_security(local, "127.0.0.1")
    check_security(local, "localhost")
    with pytest.raises(MedsegError, match="loopback"):
        check_security(local, "0.0.0.0")


def test_tokens_and_patient_file_names_never_reach_logs_audit_or_store(model_run, scan_file, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    with TestClient(create_app(_settings(model_run, tmp_path))) as client:
        job = _post(client, scan_file.read_bytes(), name="DOE_JOHN_1970.nii.gz").json()["job_id"]
        assert _wait(client, job)["status"] == "done"
        _post(client, b"x", token="wrong-token-0123456789")
    text = "\n".join(f"{r.getMessage()} {vars(r)}" for r in caplog.records)
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix in (".log", ".sqlite", ".json", ".sqlite-wal")]
    stored = b"".join(p.read_bytes() for p in files)
    for secret in (TOKEN, "wrong-token-0123456789", "DOE_JOHN"):
        assert secret not in text and secret.encode() not in stored
    audit = [e for e in (tmp_path / "audit.log").read_text().splitlines() if '"job_finished"' in e]
    assert token_id(TOKEN) in audit[0] and '"result_sha256"' in audit[0]


def test_an_oversized_upload_is_refused_while_it_is_read(model_run, tmp_path):
    async def body(consumed: list[int]):
        for _ in range(100):
            consumed.append(1)
            yield b"--b\r\nContent-Disposition: form-data; name=\"scan\"\r\n\r\n" if len(consumed) == 1 else b"\0" * 1000

    import asyncio

    consumed: list[int] = []
    with pytest.raises(UploadError) as err:
        asyncio.run(receive_scan(body(consumed), "multipart/form-data; boundary=b", None, tmp_path,
                                 max_bytes=2500, timeout_s=10))
    assert err.value.status == 413 and len(consumed) <= 5  # stopped at the cap, not after 100 kB
    with TestClient(create_app(_settings(model_run, tmp_path / "d", workers=0, max_upload_bytes=1000))) as client:
        r = _post(client, b"\0" * 200_000)
        assert r.status_code == 413
        assert "limit" in r.json()["error"]
    _nothing_stored(tmp_path / "d")


def _nifti_bytes(scan_file: Path, gz: bool) -> bytes:
    raw = nib.load(scan_file)
    buf = io.BytesIO()
    file_map = nib.Nifti1Image.make_file_map({"image": buf, "header": buf})
    nib.Nifti1Image(np.asarray(raw.dataobj), raw.affine).to_file_map(file_map)
    data = buf.getvalue()
    return __import__("gzip").compress(data) if gz else data


@pytest.mark.parametrize("case,status,says", [
    ("garbage", 415, "not a NIfTI"), ("text_named_nii", 415, "not a NIfTI"), ("gzip_not_nifti", 415, "gzip content"),
    ("truncated_gzip", 400, "truncated"), ("truncated_nifti", 400, "not a usable scan"), ("empty_zip", 400, "empty"),
    ("zip_slip", 400, "leaves the archive"), ("zip_absolute", 400, "leaves the archive"),
    ("zip_symlink", 400, "symbolic link"), ("zip_bomb", 413, "expands"), ("zip_not_dicom", 400, "not a usable scan"),
    ("not_multipart", 415, "multipart/form-data"), ("missing_field", 400, "missing"), ("empty_field", 400, "empty"),
])
def test_bad_uploads_get_the_right_status_and_leave_nothing(model_run, scan_file, tmp_path, case, status, says):
    import gzip

    nii = _nifti_bytes(scan_file, gz=False)
    payloads = {
        "garbage": b"\x00\x01garbage" * 100,
        "text_named_nii": b"hello, I am not a scan",
        "gzip_not_nifti": gzip.compress(b"plain text " * 100),
        "truncated_gzip": _nifti_bytes(scan_file, gz=True)[:200],
        "truncated_nifti": nii[: len(nii) // 2],
        "empty_zip": _zip({}),
        "zip_slip": _zip({"../../evil.dcm": b"x"}),
        "zip_absolute": _zip({"/etc/evil.dcm": b"x"}),
        "zip_symlink": _zip({"a.dcm": b"x"}, symlinks={"link.dcm": "/etc/passwd"}),
        "zip_bomb": _zip({"bomb.dcm": b"\0" * (20 * 1024 * 1024)}),
        "zip_not_dicom": _zip({"notes.txt": b"not dicom"}),
    }
    with TestClient(create_app(_settings(model_run, tmp_path, workers=0))) as client:
        if case == "not_multipart":
            r = client.post("/v1/segmentations", content=nii, headers={**_auth(), "Content-Type": "application/octet-stream"})
        elif case == "missing_field":
            r = client.post("/v1/segmentations", files={"image": ("a.nii", nii)}, headers=_auth())
        elif case == "empty_field":
            r = _post(client, b"")
        else:
            r = _post(client, payloads[case], name="scan.nii.gz")
        assert r.status_code == status, r.text
        assert says in r.json()["error"]
        metrics = client.get("/metrics").text
        assert f'medseg_uploads_rejected_total{{status="{status}"}} 1.0' in metrics
    _nothing_stored(tmp_path)


def test_a_full_queue_answers_429_and_stores_nothing_for_it(model_run, scan_file, tmp_path):
    data = scan_file.read_bytes()
    with TestClient(create_app(_settings(model_run, tmp_path, workers=0, max_queue=2))) as client:
        assert [_post(client, data).status_code for _ in range(2)] == [202, 202]
        r = _post(client, data)
        assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
        metrics = client.get("/metrics").text
        assert 'medseg_jobs{status="queued"} 2.0' in metrics
    assert len(JobStore(tmp_path / "jobs.sqlite").all()) == 2
    assert len(list((tmp_path / "jobs").iterdir())) == 2


def test_per_token_rate_limit(model_run, scan_file, tmp_path):
    clock = FakeClock()
    settings = _settings(model_run, tmp_path, workers=0, rate_per_minute=2, clock=clock)
    with TestClient(create_app(settings)) as client:
        codes = [client.get(f"/v1/jobs/{new_job_id()}", headers=_auth()).status_code for _ in range(3)]
        assert codes == [404, 404, 429]
        assert client.get(f"/v1/jobs/{new_job_id()}", headers=_auth(OTHER)).status_code == 404  # its own bucket
        # An upload over the limit is refused before its body is stored, and says when to come back.
        r = _post(client, scan_file.read_bytes())
        assert r.status_code == 429 and r.headers["retry-after"] == "30" and "rate limit" in r.json()["error"]
        clock.advance(29.9)
        assert _post(client, scan_file.read_bytes()).status_code == 429  # 2 a minute: one back after 30 s
        clock.advance(0.1)
        assert _post(client, scan_file.read_bytes()).status_code == 202
        assert _post(client, scan_file.read_bytes()).status_code == 429
    assert len(JobStore(tmp_path / "jobs.sqlite").all()) == 1
    assert [e["outcome"] for e in AuditLog(tmp_path / "audit.log").entries()] == ["queued"]


def test_jobs_survive_a_restart_and_belong_to_their_token(model_run, scan_file, tmp_path):
    data = scan_file.read_bytes()
    with TestClient(create_app(_settings(model_run, tmp_path, workers=0))) as client:  # API only: jobs wait
        ids = [_post(client, data).json()["job_id"] for _ in range(2)]
        assert {client.get(f"/v1/jobs/{i}", headers=_auth()).json()["status"] for i in ids} == {"queued"}
    with TestClient(create_app(_settings(model_run, tmp_path))) as client:  # a new server with a worker
        assert [_wait(client, i)["status"] for i in ids] == ["done", "done"]
        assert client.get(f"/v1/jobs/{ids[0]}", headers=_auth(OTHER)).status_code == 404
        assert client.get(f"/v1/jobs/{ids[0]}/mask", headers=_auth(OTHER)).status_code == 404
        assert client.get("/v1/jobs/..%2F..%2Fjobs.sqlite", headers=_auth()).status_code == 404


def test_a_job_left_running_by_a_killed_server_is_finished_by_the_next(model_run, scan_file, tmp_path):
    data = scan_file.read_bytes()
    with TestClient(create_app(_settings(model_run, tmp_path, workers=0))) as client:
        job_id = _post(client, data).json()["job_id"]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store = JobStore(tmp_path / "jobs.sqlite", lease_s=3600)  # a long lease: only the dead pid can free it
    assert store.claim(f"{socket.gethostname()}:{dead.pid}:x").id == job_id
    with TestClient(create_app(_settings(model_run, tmp_path, lease_s=3600))) as client:
        state = _wait(client, job_id)
    assert state["status"] == "done" and state["attempts"] == 2


def test_health_readiness_and_metrics(model_run, scan_file, tmp_path):
    with TestClient(create_app(_settings(model_run, tmp_path / "bad", model=tmp_path / "no_model"))) as client:
        assert client.get("/healthz").status_code == 200
        # The model loads in a background thread: "loading" first, then "failed to load" for good.
        r = _until(lambda: (r := client.get("/readyz")).json().get("error") != "model loading" and r,
                   what="the model load to end")
        assert r.status_code == 503 and "failed to load" in r.json()["error"]
    with TestClient(create_app(_settings(model_run, tmp_path / "ok"))) as client:
        job = _post(client, scan_file.read_bytes()).json()["job_id"]
        _wait(client, job)
        _post(client, b"x", token=None)
        assert client.get("/readyz").status_code == 200
        text = client.get("/metrics").text
    for expected in ('medseg_http_requests_total{method="POST",route="/v1/segmentations",status="202"} 1.0',
                     'medseg_http_requests_total{method="POST",route="/v1/segmentations",status="401"} 1.0',
                     'medseg_http_request_duration_seconds_bucket{le="+Inf",route="/v1/jobs/{job_id}"}',
                     'medseg_jobs{status="done"} 1.0', "medseg_job_duration_seconds_count 1.0",
                     'medseg_jobs_finished_total{result="done"} 1.0', 'medseg_model_info{device="cpu"',
                     "medseg_model_loaded 1.0"):
        assert expected in text, expected


def test_cors_is_off_by_default(model_run, tmp_path):
    with TestClient(create_app(_settings(model_run, tmp_path, workers=0))) as client:
        r = client.get("/healthz", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers
    with TestClient(create_app(_settings(model_run, tmp_path, workers=0, cors_origins=["https://ok.example"]))) as client:
        r = client.get("/healthz", headers={"Origin": "https://ok.example"})
        assert r.headers["access-control-allow-origin"] == "https://ok.example"


def _same_mask(service_mask: bytes, reference: Path, tmp_path: Path) -> None:
    path = tmp_path / "service_mask.nii.gz"
    path.write_bytes(service_mask)
    got, want = nib.load(path), nib.load(reference)
    assert got.shape == want.shape and got.get_data_dtype() == want.get_data_dtype() == np.uint8
    assert np.array_equal(np.asarray(got.dataobj), np.asarray(want.dataobj))
    assert np.array_equal(got.affine, want.affine)
    assert np.array_equal(got.get_qform(), want.get_qform()) and np.array_equal(got.get_sform(), want.get_sform())
    assert int(got.header["qform_code"]) == int(want.header["qform_code"])
    assert int(got.header["sform_code"]) == int(want.header["sform_code"])


def test_the_service_mask_equals_medseg_predicts_for_nifti_and_dicom(model_run, scan_file, tmp_path):
    series = tmp_path / "series"
    write_series(series, count=8, step=(0.0, 0.0, 3.0))
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(series.iterdir()):
            zf.write(f, f"PATIENT_NAME_FOLDER/{f.name}")
    summary = predict_paths(model_run, [scan_file, series], tmp_path / "predicted", device="cpu")
    assert not summary.failed and len(summary.written) == 2
    with TestClient(create_app(_settings(model_run, tmp_path / "data"))) as client:
        for upload, reference in ((scan_file.read_bytes(), tmp_path / "predicted" / "phantom.nii.gz"),
                                  (archive.getvalue(), tmp_path / "predicted" / "series.nii.gz")):
            r = _post(client, upload, name="whatever.bin")
            assert r.status_code == 202, r.text
            job = r.json()["job_id"]
            assert _wait(client, job)["status"] == "done"
            mask = client.get(f"/v1/jobs/{job}/mask", headers=_auth())
            assert mask.status_code == 200
            _same_mask(mask.content, reference, tmp_path)
            seg = client.get(f"/v1/jobs/{job}/seg", headers=_auth())
            if reference.name == "phantom.nii.gz" or hd is None:  # a NIfTI upload (or no highdicom): no SEG
                assert seg.status_code == 404 and "not a DICOM series" in seg.json()["error"]
            else:  # the DICOM upload's SEG: the segments and frames medseg predict's SEG holds
                assert seg.status_code == 200 and seg.headers["content-type"] == "application/dicom"
                got = hd.seg.segread(io.BytesIO(seg.content))
                want = hd.seg.segread(tmp_path / "predicted" / "series.seg.dcm")
                assert got.StudyInstanceUID == want.StudyInstanceUID  # in the source's study, as predict's
                assert [s.SegmentLabel for s in got.SegmentSequence] == [s.SegmentLabel for s in want.SegmentSequence]
                assert np.array_equal(got.pixel_array, want.pixel_array)
                assert "PATIENT_NAME_FOLDER" not in seg.headers.get("content-disposition", "")
        report = client.get(f"/v1/jobs/{job}/report", headers=_auth()).json()
    assert report["model"]["weights_sha256"] == load_bundle(model_run).spec.provenance.weights_sha256
    # The QC flags and statistics are medseg predict's, computed on the same scan.
    predicted = json.loads((tmp_path / "predicted" / "statistics.json").read_text())["cases"]["series"]
    assert report["statistics"]["qc_flags"] == predicted["qc_flags"]
    assert report["statistics"]["classes"] == predicted["classes"]
    voxels = nib.load(tmp_path / "predicted" / "series.nii.gz")
    labels = np.asarray(voxels.dataobj)
    for name, k in (("lung", 1), ("nodule", 2)):
        assert report["classes"][name]["voxels"] == int((labels == k).sum())
        assert report["classes"][name]["volume_ml"] == pytest.approx(
            (labels == k).sum() * abs(np.linalg.det(voxels.affine[:3, :3])) / 1000)
        listed = report["lesion_inventory"]["classes"][name]
        assert sum(x["voxels"] for x in listed["lesions"] + listed["dropped"]) == int((labels == k).sum())


def test_two_worker_threads_sharing_one_model_give_predicts_masks(model_run, tmp_path):
    """``--workers 2``: two threads run jobs at once on one loaded model; every mask equals medseg predict's."""
    scans = tmp_path / "scans"
    scans.mkdir()
    for seed in range(4):
        image, _, affine, _ = make_phantom(np.random.default_rng(10 + seed), TINY_SPEC)
        nib.save(nib.Nifti1Image(image.astype(np.float32), affine), scans / f"scan{seed}.nii.gz")
    predict_paths(model_run, [scans], tmp_path / "predicted", device="cpu")
    jobs = {}
    with TestClient(create_app(_settings(model_run, tmp_path / "data"), start_workers=False)) as client:
        for path in sorted(scans.iterdir()):  # queued while no worker runs, so both threads start on one
            r = _post(client, path.read_bytes())
            assert r.status_code == 202, r.text
            jobs[r.json()["job_id"]] = tmp_path / "predicted" / path.name
    with TestClient(create_app(_settings(model_run, tmp_path / "data", workers=2))) as client:
        states = {job: _wait(client, job) for job in jobs}
        assert all(state["status"] == "done" for state in states.values()), states
        for job, reference in jobs.items():
            _same_mask(client.get(f"/v1/jobs/{job}/mask", headers=_auth()).content, reference, tmp_path)
    # The two threads overlapped: some job started before another had finished.
    spans = sorted((state["started"], state["finished"]) for state in states.values())
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:], strict=False)), spans


def test_prometheus_alert_rules_pass_promtool(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus)")
    rules = REPO_ROOT / "deploy" / "prometheus" / "alerts.yml"
    check = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    test = subprocess.run([promtool, "test", "rules", str(REPO_ROOT / "deploy" / "prometheus" / "alerts_test.yml")],
                          capture_output=True, text=True, cwd=REPO_ROOT / "deploy" / "prometheus")
    assert test.returncode == 0, test.stdout + test.stderr



def test_a_stalled_upload_times_out_with_408(tmp_path):
    import asyncio

    async def stalled():
        yield b"--b\r\nContent-Disposition: form-data; name=\"scan\"\r\n\r\n"
        await asyncio.sleep(5)
        yield b"never"

    with pytest.raises(UploadError) as err:
        asyncio.run(receive_scan(stalled(), "multipart/form-data; boundary=b", None, tmp_path,
                                 max_bytes=10_000, timeout_s=0.2))
    assert err.value.status == 408


def test_a_zip_of_two_dicom_series_is_refused(model_run, tmp_path):
    write_series(tmp_path / "s" / "a", count=3)
    write_series(tmp_path / "s" / "b", count=3)
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted((tmp_path / "s").rglob("*.dcm")):
            zf.write(f, str(f.relative_to(tmp_path / "s")))
    with TestClient(create_app(_settings(model_run, tmp_path / "d", workers=0))) as client:
        r = _post(client, archive.getvalue())
        assert r.status_code == 400 and "series" in r.json()["error"]
    _nothing_stored(tmp_path / "d")


def test_leftovers_of_a_killed_upload_are_removed_at_start(model_run, tmp_path):
    staged = tmp_path / "incoming" / new_job_id()
    orphan = tmp_path / "jobs" / new_job_id()  # renamed into place, killed before its row was written
    young = tmp_path / "incoming" / new_job_id()  # maybe another replica's upload in progress
    for folder in (staged, orphan, young):
        (folder / "input").mkdir(parents=True)
    old = time.time() - 3600
    for folder in (staged, orphan):
        os.utime(folder, (old, old))
    with TestClient(create_app(_settings(model_run, tmp_path, workers=0, request_timeout_s=60))):
        pass
    assert not staged.exists() and not orphan.exists() and young.exists()


def test_medseg_serve_passes_its_options_to_the_server(model_run, tmp_path, monkeypatch):
    import medseg.serving.server as server_module
    from medseg.cli import main

    seen = {}
    monkeypatch.setattr(server_module, "serve", lambda settings, **kw: seen.update(settings=settings, **kw))
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    monkeypatch.delenv("MEDSEG_API_TOKENS", raising=False)
    assert main(["serve", str(model_run), "--token-file", str(tokens), "--port", "9123", "--max-upload-mb", "2",
                 "--max-queue", "5", "--ssl-certfile", "c.pem", "--ssl-keyfile", "k.pem"]) == 0
    settings = seen["settings"]
    assert settings.tokens.identify(f"Bearer {TOKEN}") == token_id(TOKEN)
    assert (settings.max_upload_bytes, settings.max_queue, seen["port"]) == (2 * 1024 * 1024, 5, 9123)
    assert seen["ssl_certfile"] == Path("c.pem") and settings.cors_origins == []


def test_medseg_serve_ray_options_become_the_scaling_settings(model_run, tmp_path, monkeypatch):
    import medseg.serving.server as server_module
    from medseg.cli import main

    seen = {}
    monkeypatch.setattr(server_module, "serve", lambda settings, **kw: seen.update(settings=settings))
    monkeypatch.setenv("MEDSEG_API_TOKENS", TOKEN)
    assert main(["serve", str(model_run), "--ray", "auto", "--min-replicas", "2", "--max-replicas", "4",
                 "--ray-cpus-per-replica", "3", "--ray-downscale-delay", "30", "--retention-hours", "0.5",
                 "--job-store", "postgresql://medseg@db:5432/medseg"]) == 0
    settings = seen["settings"]
    config = settings.ray.autoscaling_config()
    assert (config["min_replicas"], config["max_replicas"], config["downscale_delay_s"]) == (2, 4, 30.0)
    assert config["target_ongoing_requests"] == 1 and settings.ray.cpus_per_replica == 3
    assert (settings.retention_hours, settings.job_store) == (0.5, "postgresql://medseg@db:5432/medseg")
    # Replica bounds without --ray, or min above max: refused before anything starts.
    assert main(["serve", str(model_run), "--max-replicas", "3"]) == 2
    assert main(["serve", str(model_run), "--ray", "auto", "--min-replicas", "3", "--max-replicas", "2"]) == 2


def test_logs_are_one_json_object_per_line_with_the_extra_fields():
    import json

    from medseg.serving.logs import JsonFormatter

    record = logging.makeLogRecord({"name": "medseg.serving", "levelname": "INFO", "msg": "job finished",
                                    "job_id": "abc", "duration_s": 1.5, "color_message": "\x1b[36mjob\x1b[0m"})
    entry = json.loads(JsonFormatter().format(record))
    assert entry["msg"] == "job finished" and entry["job_id"] == "abc" and entry["duration_s"] == 1.5
    assert entry["level"] == "info" and "color_message" not in entry


# --- data lifecycle: DELETE, listing, retention, patient identifiers ---------------------------------


def _job_files(data_dir: Path, job_id: str) -> list[Path]:
    folder = data_dir / "jobs" / job_id
    return sorted(p for p in folder.rglob("*")) if folder.exists() else []


def test_delete_removes_the_upload_and_every_result_and_keeps_ids_times_and_hashes(model_run, scan_file, tmp_path):
    with TestClient(create_app(_settings(model_run, tmp_path))) as client:
        job = _post(client, scan_file.read_bytes()).json()["job_id"]
        done = _wait(client, job)
        assert done["status"] == "done" and len(_job_files(tmp_path, job)) >= 3  # input/, scan, mask, report
        # The record names the model that ran the job, as its report does.
        bundle = load_bundle(model_run)
        assert done["model"] == {"name": bundle.spec.name, "weights_sha256": bundle.spec.provenance.weights_sha256}
        assert len(done["model"]["weights_sha256"]) == 64
        assert client.get(f"/v1/jobs/{job}/report", headers=_auth()).json()["model"] == done["model"]
        assert client.delete(f"/v1/jobs/{job}", headers=_auth(OTHER)).status_code == 404  # not theirs
        assert client.delete(f"/v1/jobs/{job}").status_code == 401
        assert _job_files(tmp_path, job)
        r = client.delete(f"/v1/jobs/{job}", headers=_auth())
        assert r.status_code == 204 and r.content == b""
        assert not (tmp_path / "jobs" / job).exists()
        state = client.get(f"/v1/jobs/{job}", headers=_auth()).json()
        assert state["status"] == "deleted" and state["deleted"] >= state["finished"]
        assert (state["input_sha256"], state["mask_sha256"]) == (done["input_sha256"], done["mask_sha256"])
        for route in ("mask", "seg", "report"):
            r = client.get(f"/v1/jobs/{job}/{route}", headers=_auth())
            assert r.status_code == 410 and "deleted" in r.json()["error"]
        assert client.delete(f"/v1/jobs/{job}", headers=_auth()).status_code == 204  # again: nothing to do
    row = JobStore(tmp_path / "jobs.sqlite").get(job)
    assert row.error is None and row.error_class is None and row.lease_owner is None
    deletes = [e for e in AuditLog(tmp_path / "audit.log").entries() if e["action"] == "delete"]
    assert [(e["token_id"], e["outcome"]) for e in deletes] == [(token_id(TOKEN), "deleted_done"),
                                                                 (token_id(TOKEN), "already_deleted")]
    assert deletes[0]["input_sha256"] == done["input_sha256"] and deletes[0]["result_sha256"] == done["mask_sha256"]


def test_deleting_a_running_job_cancels_it_and_its_worker_writes_nothing_back(model_run, scan_file, tmp_path,
                                                                              monkeypatch):
    import threading

    from medseg.inference.predictor import Predictor

    started, release = threading.Event(), threading.Event()
    real = Predictor.predict_image

    def held(self, *args, **kwargs):
        started.set()
        assert release.wait(60), "the test never released the prediction"
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Predictor, "predict_image", held)
    with TestClient(create_app(_settings(model_run, tmp_path))) as client:
        job = _post(client, scan_file.read_bytes()).json()["job_id"]
        assert started.wait(60)
        assert client.get(f"/v1/jobs/{job}", headers=_auth()).json()["status"] == "running"
        assert client.delete(f"/v1/jobs/{job}", headers=_auth()).status_code == 204
        assert not (tmp_path / "jobs" / job).exists()
        release.set()  # the worker finishes its prediction: the store refuses its result, its files go
        finished = _until(lambda: [e for e in AuditLog(tmp_path / "audit.log").entries()
                                   if e["action"] == "job_finished"], what="the worker to finish")
        assert finished[0]["outcome"] == "cancelled"
        assert 'medseg_jobs_finished_total{result="cancelled"} 1.0' in client.get("/metrics").text
        assert client.get(f"/v1/jobs/{job}", headers=_auth()).json()["status"] == "deleted"
    assert not (tmp_path / "jobs" / job).exists()
    assert JobStore(tmp_path / "jobs.sqlite").get(job).mask_sha256 is None


def test_a_token_lists_its_own_jobs_newest_first_in_pages(model_run, scan_file, tmp_path):
    clock = FakeClock()
    data = scan_file.read_bytes()
    with TestClient(create_app(_settings(model_run, tmp_path, workers=0, clock=clock))) as client:
        mine = []
        for _ in range(3):
            mine.append(_post(client, data).json()["job_id"])
            clock.advance(1)
        theirs = _post(client, data, token=OTHER).json()["job_id"]
        first = client.get("/v1/jobs?limit=2", headers=_auth()).json()
        assert [j["job_id"] for j in first["jobs"]] == mine[::-1][:2]
        assert first["jobs"][0]["status"] == "queued" and first["next"] == f"/v1/jobs?limit=2&after={mine[1]}"
        second = client.get(first["next"], headers=_auth()).json()
        assert [j["job_id"] for j in second["jobs"]] == [mine[0]] and second["next"] is None
        assert [j["job_id"] for j in client.get("/v1/jobs", headers=_auth(OTHER)).json()["jobs"]] == [theirs]
        # Paging from another token's job id, a malformed id, a silly limit, or no token: refused.
        for query in (f"after={theirs}", "after=../x", "limit=0", "limit=501"):
            assert client.get(f"/v1/jobs?{query}", headers=_auth()).status_code == 400, query
        assert client.get("/v1/jobs").status_code == 401


def test_retention_removes_uploads_then_results_and_survives_a_restart(model_run, scan_file, tmp_path):
    clock = FakeClock()
    settings = _settings(model_run, tmp_path, clock=clock, retention_hours=1.0, result_retention_hours=2.5,
                         purge_interval_s=3600)
    with TestClient(create_app(settings)) as client:
        job = _post(client, scan_file.read_bytes()).json()["job_id"]
        assert _wait(client, job)["status"] == "done"
        retention = client.app.state.retention
        assert "medseg_replicas 1.0" in client.get("/metrics").text  # this process's pool, beaten at load
        clock.advance(3599)
        assert retention.purge_once() == {"input": 0, "results": 0}
        before = client.get("/metrics").text
        assert 'medseg_jobs_stored{part="input"} 1.0' in before and 'medseg_jobs_stored{part="results"} 1.0' in before
        clock.advance(2)
        assert retention.purge_once() == {"input": 1, "results": 0}
        assert not (tmp_path / "jobs" / job / "input").exists()
        assert (tmp_path / "jobs" / job).is_dir() and client.get(f"/v1/jobs/{job}/mask", headers=_auth()).status_code == 200
        text = client.get("/metrics").text
        for expected in ('medseg_stored_bytes{part="input"} 0.0', 'medseg_jobs_stored{part="input"} 0.0',
                         'medseg_jobs_stored{part="results"} 1.0', 'medseg_jobs_purged{part="input"} 1.0',
                         'medseg_jobs_purged{part="results"} 0.0'):
            assert expected in text, expected
        assert retention.purge_once() == {"input": 0, "results": 0}  # marked in the store: never twice
    clock.advance(2 * 3600)  # the service is down while the results fall due; the next start purges them
    with TestClient(create_app(settings)) as client:
        _until(lambda: not (tmp_path / "jobs" / job).exists(), what="the results purge after the restart")
        r = client.get(f"/v1/jobs/{job}/mask", headers=_auth())
        assert r.status_code == 410 and "retention" in r.json()["error"]
        assert client.get(f"/v1/jobs/{job}", headers=_auth()).json()["results_purged"] == clock.now
        text = client.get("/metrics").text
        assert 'medseg_jobs_purged{part="results"} 1.0' in text and 'medseg_stored_bytes{part="results"} 0.0' in text


CANARIES = {"PatientName": "ZZCANARYNAMEQUUXSRV", "PatientID": "CANARYPIDSRV4242", "PatientBirthDate": "19230405",
            "AccessionNumber": "CANARYACCSRV77", "InstitutionName": "CANARY SERVICE INSTITUTE",
            "ReferringPhysicianName": "CANARYDOCSRV^ZED"}


def test_patient_identifiers_of_a_dicom_upload_stay_only_in_the_upload_and_the_seg(model_run, tmp_path, caplog):
    """Canary values in the patient tags of a DICOM zip: the job record, report, logs, audit log, metrics and
    every response hold none of them; after DELETE (one job) and retention (another) nothing of either is left."""
    caplog.set_level(logging.DEBUG)
    series = tmp_path / "series"
    write_series(series, count=8, step=(0.0, 0.0, 3.0), **CANARIES)
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(series.iterdir()):
            zf.write(f, f"{CANARIES['PatientID']}/{CANARIES['PatientName']}_{f.name}")
    canaries = [v for v in CANARIES.values()] + ["CANARY"]
    data_dir, clock = tmp_path / "data", FakeClock()
    settings = _settings(model_run, data_dir, clock=clock, retention_hours=0.0, result_retention_hours=0.0,
                         purge_interval_s=3600)
    responses = []
    with TestClient(create_app(settings)) as client:
        client.app.state.retention.hours = {"input": None, "results": None}  # purged by hand below
        jobs = []
        for _ in range(2):
            r = _post(client, archive.getvalue(), name=f"{CANARIES['PatientName']}.zip")
            assert r.status_code == 202, r.text
            jobs.append(r.json()["job_id"])
            responses.append(r)
        for job in jobs:
            assert _wait(client, job)["status"] == "done"
            responses += [client.get(f"/v1/jobs/{job}", headers=_auth()), client.get(f"/v1/jobs/{job}/report", headers=_auth()),
                          client.get(f"/v1/jobs/{job}/mask", headers=_auth())]
        seg = client.get(f"/v1/jobs/{jobs[0]}/seg", headers=_auth())
        if hd is not None:  # the SEG carries the patient module: the one result that needs it
            assert seg.status_code == 200 and CANARIES["PatientID"].encode() in seg.content
        responses += [client.get("/v1/jobs", headers=_auth()), client.get("/metrics"), client.get("/readyz")]
        report = json.loads((data_dir / "jobs" / jobs[0] / "output" / "scan.report.json").read_text())
        responses.append(client.delete(f"/v1/jobs/{jobs[0]}", headers=_auth()))
        client.app.state.retention.hours = {"input": 0.0, "results": 0.0}
        clock.advance(1)
        assert client.app.state.retention.purge_once() == {"input": 1, "results": 1}
        responses += [client.get(f"/v1/jobs/{j}", headers=_auth()) for j in jobs]
        responses.append(client.get("/metrics"))
    seen = "\n".join([json.dumps(report), *(f"{r.status_code} {r.headers} {r.content!r}" for r in responses),
                      *(f"{rec.getMessage()} {vars(rec)}" for rec in caplog.records),
                      *(repr(j) for j in JobStore(data_dir / "jobs.sqlite").all())])
    for canary in canaries:
        assert canary not in seen and canary.lower() not in seen.lower(), canary
    assert all(not (data_dir / "jobs" / j).exists() for j in jobs)
    left = [p for p in data_dir.rglob("*") if p.is_file()]
    assert sorted(p.name for p in left if p.parent == data_dir) == sorted(p.name for p in left)  # store + audit only
    for path in left:  # the store (its WAL too) and the audit log: no canary in their bytes
        content = path.read_bytes()
        assert not any(c.encode() in content for c in canaries), path.name


# --- attacks: another token on every job route, the 504 deadline, job ids that are not ours ------------

JOB_ROUTES = [("GET", ""), ("GET", "/mask"), ("GET", "/seg"), ("GET", "/rtstruct"), ("GET", "/report"), ("DELETE", "")]


def test_another_token_gets_404_on_every_job_route_and_changes_nothing(model_run, tmp_path):
    series = tmp_path / "series"
    write_series(series, count=8, step=(0.0, 0.0, 3.0))
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(series.iterdir()):
            zf.write(f, f.name)
    with TestClient(create_app(_settings(model_run, tmp_path / "data"))) as client:
        job = _post(client, archive.getvalue()).json()["job_id"]
        assert _wait(client, job)["status"] == "done"
        # Every route the app has under /v1/jobs/{job_id} is in the list (a new route must be added here).
        routes = {(m, r.path.removeprefix("/v1/jobs/{job_id}")) for r in client.app.routes
                  for m in getattr(r, "methods", ()) if r.path.startswith("/v1/jobs/{job_id}")}
        assert routes == set(JOB_ROUTES)
        files = _job_files(tmp_path / "data", job)
        unknown = new_job_id()
        for method, suffix in JOB_ROUTES:
            theirs = client.request(method, f"/v1/jobs/{job}{suffix}", headers=_auth(OTHER))
            missing = client.request(method, f"/v1/jobs/{unknown}{suffix}", headers=_auth(OTHER))
            assert theirs.status_code == missing.status_code == 404, (method, suffix)
            assert theirs.content == missing.content  # indistinguishable from a job that does not exist
            assert client.request(method, f"/v1/jobs/{job}{suffix}").status_code == 401
        assert client.get("/v1/jobs", headers=_auth(OTHER)).json()["jobs"] == []
        assert _job_files(tmp_path / "data", job) == files
        assert client.get(f"/v1/jobs/{job}", headers=_auth()).json()["status"] == "done"
        for method, suffix in JOB_ROUTES:  # and the owner gets each
            assert client.request(method, f"/v1/jobs/{job}{suffix}", headers=_auth()).status_code == (
                204 if method == "DELETE" else 200 if hd is not None or suffix != "/seg" else 404), (method, suffix)
    fetches = [e for e in AuditLog(tmp_path / "data" / "audit.log").entries() if e["action"].startswith("fetch")]
    assert {e["token_id"] for e in fetches} == {token_id(TOKEN)}  # the refused requests fetched nothing


def test_a_request_not_answered_in_time_gets_504_and_leaves_nothing(model_run, scan_file, tmp_path):
    # No scan-check slot ever frees (0 slots): the upload waits until the response deadline passes.
    settings = _settings(model_run, tmp_path, workers=0, max_concurrent_checks=0, request_timeout_s=0.5,
                         response_grace_s=0.5)
    with TestClient(create_app(settings)) as client:
        r = _post(client, scan_file.read_bytes())
        assert r.status_code == 504 and "not answered within 1 s" in r.json()["error"]
        assert 'medseg_http_requests_total{method="POST",route="/v1/segmentations",status="504"} 1.0' in (
            client.get("/metrics").text)
    _nothing_stored(tmp_path)


@pytest.mark.parametrize("crafted", ["...", "%2e%2e", "EVILX", "0123456789ABCDEF0123456789ABCDEF",
                                     "0123456789abcdef0123456789abcdef0", "0123456789abcdef0123456789abcde",
                                     "0123456789abcdef0123456789abcdeg", "0123456789abcdef0123456789abcde%00"])
def test_a_job_id_that_is_not_ours_never_reaches_the_store_or_the_file_system(model_run, tmp_path, monkeypatch,
                                                                              crafted):
    import urllib.parse

    text = urllib.parse.unquote(crafted)
    touched: list[str] = []
    real_stat, real_lstat = os.stat, os.lstat

    def spy(real):
        def stat(path, *args, **kwargs):
            touched.append(os.fsdecode(path) if isinstance(path, str | bytes | os.PathLike) else str(path))
            return real(path, *args, **kwargs)
        return stat

    with TestClient(create_app(_settings(model_run, tmp_path, workers=0))) as client:
        store = client.app.state.store
        asked: list[str] = []
        real_get = store.get
        monkeypatch.setattr(store, "get", lambda job_id: asked.append(job_id) or real_get(job_id))
        monkeypatch.setattr(os, "stat", spy(real_stat))
        monkeypatch.setattr(os, "lstat", spy(real_lstat))
        _AUDITED.clear()
        _AUDITED.append("on")
        try:
            for method, suffix in JOB_ROUTES:
                r = client.request(method, f"/v1/jobs/{crafted}{suffix}", headers=_auth())
                assert r.status_code == 404, (method, suffix, r.status_code)
            assert client.get(f"/v1/jobs?after={crafted}", headers=_auth()).status_code == 400
        finally:
            _AUDITED.clear()
        opened = list(_OPENED)
        _OPENED.clear()
    assert asked == []
    assert not [p for p in touched + opened if text in Path(p).name or text in p.split(os.sep)], (touched, opened)


_AUDITED: list[str] = []  # non-empty while a test records file-system events
_OPENED: list[str] = []


def _audit_hook(event: str, args: tuple) -> None:
    if _AUDITED and event in ("open", "os.listdir", "os.scandir", "os.mkdir", "os.rename", "os.remove", "os.rmdir",
                              "shutil.rmtree", "os.chmod", "os.truncate"):
        if args and isinstance(args[0], str | bytes | os.PathLike):
            _OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit_hook)


def test_two_servers_sharing_a_postgresql_store_run_each_job_once(model_run, scan_file, tmp_path, postgres_url):
    """``--job-store postgresql://``: an API-only server and a worker server (stand-ins for two machines)
    share one store and one data folder; the job runs once, its mask is fetched through either, and DELETE
    through one is seen by the other."""
    from tests.postgres_server import fresh_database

    url = fresh_database(postgres_url)
    api = create_app(_settings(model_run, tmp_path, workers=0, job_store=url))
    worker = create_app(_settings(model_run, tmp_path, job_store=url))
    with TestClient(api) as front, TestClient(worker) as back:
        job = _post(front, scan_file.read_bytes()).json()["job_id"]
        state = _wait(front, job)
        assert state["status"] == "done" and state["attempts"] == 1
        assert front.get(f"/v1/jobs/{job}/mask", headers=_auth()).content == back.get(
            f"/v1/jobs/{job}/mask", headers=_auth()).content
        assert "medseg_replicas 1.0" in front.get("/metrics").text  # the worker server's pool, seen by both
        assert back.delete(f"/v1/jobs/{job}", headers=_auth()).status_code == 204
        assert front.get(f"/v1/jobs/{job}", headers=_auth()).json()["status"] == "deleted"
    assert not (tmp_path / "jobs.sqlite").exists() and not (tmp_path / "jobs" / job).exists()
