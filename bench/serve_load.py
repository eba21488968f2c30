"""Load and fault test of ``medseg serve`` on loopback: a real uvicorn server in a subprocess.

1. Load: ``--requests`` uploads from ``--clients`` concurrent clients, a seeded mix of valid scans (real
   ones from ../shared/data) and bad requests: missing and wrong tokens, oversized (declared and streamed
   without a length), truncated, malformed and non-scan uploads, zip-slip archives. Each answer is
   checked against the status that kind must get.
2. Fault: ``--kill-jobs`` more valid uploads, ``kill -9`` of the server while a job runs, a restart on
   the same data folder, and a wait until every accepted job has finished.
3. Checks: jobs lost (accepted but never finished, must be 0); nothing stored for a refused request
   (job rows and folders equal the accepted uploads, no staged upload left); the service's masks equal
   ``medseg predict``'s for the same scans, voxel for voxel with identical affines.

Figures go to ``--json`` and, with ``--docs``, to the serving section of docs/benchmarks.md:

    PYTHONPATH=$PWD python bench/serve_load.py --model runs/mr_hippocampus --docs
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import secrets
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
from docs_section import replace_section  # bench/ is this script's folder, first on sys.path

REPO = Path(__file__).resolve().parents[1]
DOCS_BEGIN, DOCS_END = "<!-- serve_load:begin -->", "<!-- serve_load:end -->"
BOUNDARY = "medsegbenchboundary"

#: kind -> (share of the requests, the status it must get)
MIX = {
    "valid": (0.30, 202),
    "missing_token": (0.08, 401),
    "wrong_token": (0.08, 401),
    "oversized": (0.08, 413),
    "oversized_streamed": (0.07, 413),
    "truncated": (0.10, 400),
    "malformed": (0.10, 415),
    "broken_multipart": (0.09, 400),
    "zip_slip": (0.10, 400),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def multipart(data: bytes) -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"scan\"; filename=\"upload\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()


class Server:
    """``medseg serve`` in a subprocess (its JSON logs to a file)."""

    def __init__(self, model: Path, data_dir: Path, token_file: Path, port: int, max_upload_mb: float, log: Path):
        self.cmd = [sys.executable, "-m", "medseg", "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
                    "--data-dir", str(data_dir), "--token-file", str(token_file), "--max-queue", "1000",
                    "--max-upload-mb", str(max_upload_mb), "--rate-limit", "0", "--workers", "1", "--device", "auto",
                    "--lease", "30"]
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 300.0) -> float:
        """Start and wait for /readyz; seconds until ready."""
        started = time.monotonic()
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                         env={**os.environ, "PYTHONPATH": str(REPO)})
        while time.monotonic() - started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready within {timeout} s")

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def make_payloads(scans: list[Path], max_upload_bytes: int) -> dict[str, object]:
    valid = [p.read_bytes() for p in scans]
    zip_buf = io.BytesIO()
    with zipfile.ZipFile(zip_buf, "w") as zf:
        zf.writestr("../../../tmp/evil.dcm", b"x" * 100)
    rng = np.random.default_rng(0)
    return {"valid": valid, "truncated": [v[: len(v) // 2] for v in valid],
            "malformed": rng.bytes(20_000), "zip_slip": zip_buf.getvalue(),
            "oversized": rng.bytes(max_upload_bytes + 256 * 1024)}


def send(client: httpx.Client, kind: str, payloads: dict, token: str, i: int) -> int:
    """One request of ``kind``; its HTTP status (or -1 when the connection failed without an answer)."""
    auth = {"Authorization": f"Bearer {token}"}
    if kind == "missing_token":
        auth = {}
    elif kind == "wrong_token":
        auth = {"Authorization": f"Bearer {secrets.token_urlsafe(24)}"}
    headers = {**auth, "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    valid = payloads["valid"]
    if kind in ("valid", "missing_token", "wrong_token"):
        body = multipart(valid[i % len(valid)])
    elif kind == "truncated":
        body = multipart(payloads["truncated"][i % len(valid)])
    elif kind == "broken_multipart":
        body = multipart(valid[i % len(valid)])[:-40]  # the closing boundary cut off
    elif kind == "oversized_streamed":
        data = multipart(payloads["oversized"])
        body = (data[k:k + 65536] for k in range(0, len(data), 65536))  # chunked: no Content-Length
    else:
        body = multipart(payloads[kind])
    try:
        return client.post("/v1/segmentations", content=body, headers=headers).status_code
    except httpx.HTTPError:
        return -1


def wait_jobs(url: str, token: str, job_ids: list[str], timeout: float) -> dict[str, dict]:
    """Poll until every job is done or failed (or ``timeout``); the last state of each."""
    states: dict[str, dict] = {}
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as client:
        pending = list(job_ids)
        while pending and time.monotonic() < deadline:
            still = []
            for job_id in pending:
                try:
                    state = client.get(f"/v1/jobs/{job_id}").json()
                except httpx.HTTPError:
                    state = {"status": "unreachable"}
                states[job_id] = state
                if state.get("status") not in ("done", "failed"):
                    still.append(job_id)
            pending = still
            if pending:
                time.sleep(0.5)
    return states


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def docs_section(r: dict) -> str:
    lat = r["latency_ms"]
    v = r["model_validation"]
    start_end = r.get("load_average_1min_start_end")
    load = f"; 1-minute load average {start_end[0]:.1f} at start, {start_end[1]:.1f} at end" if start_end else ""
    validation = f"validation mean Dice {v['mean_dice']:.3f} at epoch {v['epoch']}, " if v.get("mean_dice") is not None else ""
    kinds = "\n".join(f"| {k} | {v['count']} | {v['expected']} | {v['statuses']} | {v['right']} |"
                      for k, v in r["by_kind"].items())
    return f"""{DOCS_BEGIN}
## Inference service under load and `kill -9` (loopback)

Run on {r['date']} with `{r['command']}` ({r['machine']}{load}).

Server: `medseg serve` (uvicorn, 1 worker thread, device {r['device']}) on 127.0.0.1 with model
`{r['model_name']}` ({validation}weights SHA-256 `{(r['model_weights_sha256'] or '')[:12]}`); {r['requests']} uploads from {r['clients']} concurrent clients, a seeded mix of {r['valid_scans']}
real hippocampus MR scans and bad requests; then {r['kill_jobs']} more uploads, `kill -9` of the server while
job(s) ran, a restart on the same data folder.

| figure | value |
|---|---|
| upload throughput (all {r['requests']} requests) | {r['upload_throughput_rps']:.1f} requests/s |
| upload latency, accepted scans p50 / p95 | {lat['accepted_p50']:.0f} / {lat['accepted_p95']:.0f} ms |
| latency of refused requests p50 / p95 | {lat['refused_p50']:.0f} / {lat['refused_p95']:.0f} ms |
| jobs finished per second, first upload to last job (kill and restart included) | {r['job_throughput_per_s']:.3f} jobs/s |
| time a worker spent per job (read, predict, write), mean | {r['mean_job_s']:.2f} s |
| bad requests answered with the right status | {r['bad_right']} of {r['bad_total']} |
| jobs accepted / finished done / failed | {r['accepted']} / {r['done']} / {r['failed']} |
| jobs running when killed, retried after restart | {r['running_at_kill']} ({r['retried']} finished on attempt 2) |
| **jobs lost** | **{r['lost']}** |
| job rows / job folders / staged uploads left | {r['rows']} / {r['job_folders']} / {r['staged_left']} (accepted: {r['accepted']}) |
| server start to ready / restart to ready | {r['ready_s']:.1f} s / {r['restart_ready_s']:.1f} s |
| service masks equal to `medseg predict`'s | {r['masks_equal']} of {r['masks_compared']} (voxels and affine) |

| request kind | sent | must get | statuses seen | right |
|---|---|---|---|---|
{kinds}

All figures: [`benchmarks/serve_load.json`](benchmarks/serve_load.json).

Data attribution: MSD Task04 Hippocampus, CC BY-SA 4.0. Antonelli et al., "The Medical Segmentation Decathlon", Nature Communications 13, 4128 (2022); Simpson et al., arXiv:1902.09063 (2019).
{DOCS_END}
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="run folder to serve")
    parser.add_argument("--scans", type=Path, default=REPO.parent / "shared" / "data" / "hippocampus" / "images")
    parser.add_argument("--valid-scans", type=int, default=20, help="distinct real scans among the uploads")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--kill-jobs", type=int, default=8, help="uploads before the kill -9")
    parser.add_argument("--max-upload-mb", type=float, default=1.0)
    parser.add_argument("--compare", type=int, default=5, help="masks compared with medseg predict's")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds to wait for the jobs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=REPO / "docs" / "benchmarks" / "serve_load.json")
    parser.add_argument("--docs", action="store_true", help="rewrite the section in docs/benchmarks.md")
    args = parser.parse_args()

    scans = sorted(args.scans.glob("*.nii.gz"))[: args.valid_scans]
    if not scans:
        print(f"no scans in {args.scans}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="medseg_serve_load_"))
    from medseg.models.bundle import resolve_bundle_path

    # A snapshot: a training run may replace best.pt meanwhile, and both sides must use one model.
    model = work / "model.pt"
    shutil.copyfile(resolve_bundle_path(args.model), model)
    data_dir = work / "data"
    token = secrets.token_urlsafe(32)
    token_file = work / "tokens"
    token_file.write_text(token + "\n")
    max_upload = int(args.max_upload_mb * 1024 * 1024)
    server = Server(model, data_dir, token_file, free_port(), args.max_upload_mb, work / "server.log")
    payloads = make_payloads(scans, max_upload)
    rng = random.Random(args.seed)
    kinds = rng.choices(list(MIX), weights=[w for w, _ in MIX.values()], k=args.requests)
    load_start = os.getloadavg()[0]  # how busy the machine was: quoted with the figures
    print(f"work folder {work}; starting the server", flush=True)
    ready_s = server.start()

    # --- 1. load: requests from concurrent clients ---------------------------------------------------
    results: list[tuple[str, int, float]] = []
    accepted: list[tuple[str, int]] = []
    lock = threading.Lock()
    order = iter(enumerate(kinds))

    def client_loop() -> None:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            while True:
                with lock:
                    item = next(order, None)
                if item is None:
                    return
                i, kind = item
                t0 = time.perf_counter()
                if kind == "valid":
                    try:
                        r = client.post("/v1/segmentations", content=multipart(payloads["valid"][i % len(scans)]),
                                        headers={"Authorization": f"Bearer {token}",
                                                 "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
                        status = r.status_code
                        if status == 202:
                            with lock:
                                accepted.append((r.json()["job_id"], i % len(scans)))
                    except httpx.HTTPError:
                        status = -1
                else:
                    status = send(client, kind, payloads, token, i)
                with lock:
                    results.append((kind, status, (time.perf_counter() - t0) * 1000))

    t_load = time.perf_counter()
    threads = [threading.Thread(target=client_loop) for _ in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    load_s = time.perf_counter() - t_load
    print(f"{len(results)} requests in {load_s:.1f} s", flush=True)

    # --- 2. fault: more jobs, kill -9 while one runs, restart ------------------------------------------
    with httpx.Client(base_url=server.url, timeout=120, headers={"Authorization": f"Bearer {token}"}) as client:
        for k in range(args.kill_jobs):
            r = client.post("/v1/segmentations", files={"scan": ("upload", payloads["valid"][k % len(scans)])})
            if r.status_code == 202:
                accepted.append((r.json()["job_id"], k % len(scans)))
    db = data_dir / "jobs.sqlite"
    running_at_kill = 0
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        with sqlite3.connect(db, timeout=30) as con:
            running_at_kill = con.execute("SELECT COUNT(*) FROM jobs WHERE status='running'").fetchone()[0]
            queued = con.execute("SELECT COUNT(*) FROM jobs WHERE status='queued'").fetchone()[0]
        if running_at_kill or not queued:
            break
        time.sleep(0.05)
    server.kill9()
    print(f"killed the server with {running_at_kill} job(s) running, {queued} queued; restarting", flush=True)
    restart_ready_s = server.start()
    t_jobs_end = time.perf_counter()
    states = wait_jobs(server.url, token, [j for j, _ in accepted], args.timeout)
    jobs_wall = time.perf_counter() - t_load

    # --- 3. checks -----------------------------------------------------------------------------------
    done = [j for j, _ in accepted if states.get(j, {}).get("status") == "done"]
    failed = [j for j, _ in accepted if states.get(j, {}).get("status") == "failed"]
    lost = len(accepted) - len(done) - len(failed)
    retried = sum(1 for j in done if states[j].get("attempts") == 2)
    with sqlite3.connect(db, timeout=30) as con:
        rows = con.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
        durations = [r[0] for r in con.execute("SELECT finished - started FROM jobs WHERE status='done'")]
    job_folders = len(list((data_dir / "jobs").iterdir())) if (data_dir / "jobs").exists() else 0
    staged = len(list((data_dir / "incoming").iterdir())) if (data_dir / "incoming").exists() else 0

    masks_equal, compared = 0, 0
    if args.compare:
        from medseg.inference.runner import predict_paths

        picks = {}
        for job_id, scan_index in accepted:
            if job_id in done and scan_index not in picks:
                picks[scan_index] = job_id
            if len(picks) >= args.compare:
                break
        pred_dir = work / "predicted"
        predict_paths(model, [scans[i] for i in picks], pred_dir, device="auto")
        with httpx.Client(base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {token}"}) as client:
            for scan_index, job_id in picks.items():
                path = work / f"{job_id}.nii.gz"
                path.write_bytes(client.get(f"/v1/jobs/{job_id}/mask").content)
                got = nib.load(path)
                want = nib.load(pred_dir / scans[scan_index].name)
                compared += 1
                masks_equal += int(np.array_equal(np.asarray(got.dataobj), np.asarray(want.dataobj))
                                   and np.array_equal(got.affine, want.affine))
    server.stop()

    by_kind = {}
    for kind, (_, expected) in MIX.items():
        statuses = [s for k, s, _ in results if k == kind]
        by_kind[kind] = {"count": len(statuses), "expected": expected,
                         "statuses": dict(sorted({str(s): statuses.count(s) for s in set(statuses)}.items())),
                         "right": sum(1 for s in statuses if s == expected)}
    bad = [(k, s) for k, s, _ in results if k != "valid"]
    accepted_ms = [ms for k, s, ms in results if k == "valid" and s == 202]
    refused_ms = [ms for k, s, ms in results if k != "valid"]
    import torch

    from medseg.models.bundle import load_bundle

    report = {
        "date": time.strftime("%Y-%m-%d"),
        "command": "PYTHONPATH=$PWD python bench/serve_load.py --model " + str(args.model)
                   + (" --docs" if args.docs else ""),
        "load_average_1min_start_end": [load_start, os.getloadavg()[0]],
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "model_name": load_bundle(model, verify=False).spec.name,
        "model_weights_sha256": load_bundle(model, verify=False).spec.provenance.weights_sha256,
        "model_validation": load_bundle(model, verify=False).spec.provenance.validation.model_dump(),
        "requests": args.requests, "clients": args.clients, "valid_scans": len(scans), "kill_jobs": args.kill_jobs,
        "upload_throughput_rps": len(results) / load_s,
        "latency_ms": {"accepted_p50": percentile(accepted_ms, 50), "accepted_p95": percentile(accepted_ms, 95),
                       "refused_p50": percentile(refused_ms, 50), "refused_p95": percentile(refused_ms, 95),
                       "all_p50": percentile([ms for *_, ms in results], 50),
                       "all_p95": percentile([ms for *_, ms in results], 95)},
        "job_throughput_per_s": len(done) / jobs_wall, "mean_job_s": statistics.fmean(durations) if durations else 0.0,
        "bad_total": len(bad), "bad_right": sum(1 for k, s in bad if s == MIX[k][1]),
        "accepted": len(accepted), "done": len(done), "failed": len(failed), "lost": lost,
        "running_at_kill": running_at_kill, "retried": retried, "rows": rows, "job_folders": job_folders,
        "staged_left": staged, "ready_s": ready_s, "restart_ready_s": restart_ready_s,
        "wait_after_restart_s": time.perf_counter() - t_jobs_end,
        "masks_equal": masks_equal, "masks_compared": compared, "by_kind": by_kind,
        "failed_errors": sorted({states[j].get("error", {}).get("class", "?") for j in failed}),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "by_kind"}, indent=1))
    for kind, v in by_kind.items():
        print(f"  {kind:20s} sent {v['count']:3d}  must get {v['expected']}  got {v['statuses']}")
    if args.docs:
        replace_section(REPO / "docs" / "benchmarks.md", docs_section(report), DOCS_BEGIN, DOCS_END)
    ok = lost == 0 and report["bad_right"] == report["bad_total"] and rows == len(accepted) == job_folders \
        and staged == 0 and masks_equal == compared
    print("OK" if ok else f"CHECKS FAILED (server log and data kept in {work})")
    if ok:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
