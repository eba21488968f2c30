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

The whole run is repeated ``--repeats`` times through bench/harness.py (fresh server and data folder each
time): timings are given as median (min-max), counts summed. Figures go to ``--json`` (a harness record)
and, with ``--docs``, to the serving section of docs/benchmarks.md:

    PYTHONPATH=$PWD python bench/serve_load.py --model RUN --docs
    PYTHONPATH=$PWD python bench/serve_load.py --model MODEL --requests 12 --clients 2 --kill-jobs 2 --valid-scans 2 \\
        --compare 1 --json /tmp/serve_load.json   # smoke
"""

from __future__ import annotations

import argparse
import io
import json
import os
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

import harness  # bench/ is this script's folder, first on sys.path
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
    """The serving section of docs/benchmarks.md: timings as median (min–max) over the repeats, counts summed."""
    v, t = r["variants"]["serve"], r["totals_over_repeats"]
    n = r["repeats"]
    val = r["model_validation"]
    validation = f"validation mean Dice {val['mean_dice']:.3f} at epoch {val['epoch']}, " if val.get("mean_dice") is not None else ""
    kinds = "\n".join(f"| {k} | {k_['count']} | {k_['expected']} | {k_['statuses']} | {k_['right']} |"
                      for k, k_ in r["by_kind"].items())
    return f"""{DOCS_BEGIN}
## Inference service under load and `kill -9` (loopback)

{harness.conditions(r)}

Server: `medseg serve` (uvicorn, 1 worker thread, device {r['device']}) on 127.0.0.1 with model
`{r['model_name']}` ({validation}weights SHA-256 `{(r['model_weights_sha256'] or '')[:12]}`). Each of the {n} repeats: a fresh
server and data folder, {r['requests']} uploads from {r['clients']} concurrent clients, a seeded mix of {r['valid_scans']}
real hippocampus MR scans and bad requests; then {r['kill_jobs']} more uploads, `kill -9` of the server while
job(s) ran, a restart on the same data folder. Timings: median (min–max) over the repeats; counts: summed over them.

| figure | value |
|---|---|
| upload throughput (all {r['requests']} requests), requests/s | {harness.cell(v['upload_throughput_rps'], 1)} |
| upload latency, accepted scans p50 / p95, ms | {harness.cell(v['accepted_p50_ms'], 0)} / {harness.cell(v['accepted_p95_ms'], 0)} |
| latency of refused requests p50 / p95, ms | {harness.cell(v['refused_p50_ms'], 0)} / {harness.cell(v['refused_p95_ms'], 0)} |
| jobs finished per second, first upload to last job (kill and restart included) | {harness.cell(v['job_throughput_per_s'], 3)} |
| time a worker spent per job (read, predict, write), mean, s | {harness.cell(v['mean_job_s'])} |
| server start to ready / restart to ready, s | {harness.cell(v['ready_s'], 1)} / {harness.cell(v['restart_ready_s'], 1)} |
| bad requests answered with the right status | {t['bad_right']} of {t['bad_total']} |
| jobs accepted / finished done / failed | {t['accepted']} / {t['done']} / {t['failed']} |
| jobs running when killed, retried after restart | {t['running_at_kill']} ({t['retried']} finished on attempt 2) |
| **jobs lost** | **{t['lost']}** |
| job rows / job folders / staged uploads left | {t['rows']} / {t['job_folders']} / {t['staged_left']} (accepted: {t['accepted']}) |
| service masks equal to `medseg predict`'s (voxels and affine) | {t['masks_equal']} of {t['masks_compared']} |

| request kind (all repeats) | sent | must get | statuses seen | right |
|---|---|---|---|---|
{kinds}

All figures: [`benchmarks/serve_load.json`](benchmarks/serve_load.json).

Data attribution: MSD Task04 Hippocampus, CC BY-SA 4.0. Antonelli et al., "The Medical Segmentation Decathlon", Nature Communications 13, 4128 (2022); Simpson et al., arXiv:1902.09063 (2019).
{DOCS_END}
"""


def scenario(args: argparse.Namespace, scans: list[Path], snapshot: Path) -> dict:
    """One full run (load, kill -9, restart, checks) in a fresh work folder with its own server and data folder:
    its figures (numbers), its per-kind statuses and whether every check passed. The folder is removed when
    they all did (kept, with the server log, when one failed)."""
    work = Path(tempfile.mkdtemp(prefix="medseg_serve_load_"))
    model = work / "model.pt"
    shutil.copyfile(snapshot, model)
    data_dir = work / "data"
    token = secrets.token_urlsafe(32)
    token_file = work / "tokens"
    token_file.write_text(token + "\n")
    max_upload = int(args.max_upload_mb * 1024 * 1024)
    server = Server(model, data_dir, token_file, free_port(), args.max_upload_mb, work / "server.log")
    payloads = make_payloads(scans, max_upload)
    rng = random.Random(args.seed)
    kinds = rng.choices(list(MIX), weights=[w for w, _ in MIX.values()], k=args.requests)
    print("starting the server", flush=True)
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
    ok = lost == 0 and len(bad) == sum(1 for k, s in bad if s == MIX[k][1]) and rows == len(accepted) == job_folders \
        and staged == 0 and masks_equal == compared
    if ok:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"CHECKS FAILED (server log and data kept in {work})", flush=True)
    return {
        "seconds": jobs_wall, "upload_throughput_rps": len(results) / load_s,
        "accepted_p50_ms": percentile(accepted_ms, 50), "accepted_p95_ms": percentile(accepted_ms, 95),
        "refused_p50_ms": percentile(refused_ms, 50), "refused_p95_ms": percentile(refused_ms, 95),
        "job_throughput_per_s": len(done) / jobs_wall, "mean_job_s": statistics.fmean(durations) if durations else 0.0,
        "bad_total": len(bad), "bad_right": sum(1 for k, s in bad if s == MIX[k][1]),
        "accepted": len(accepted), "done": len(done), "failed": len(failed), "lost": lost,
        "running_at_kill": running_at_kill, "retried": retried, "rows": rows, "job_folders": job_folders,
        "staged_left": staged, "ready_s": ready_s, "restart_ready_s": restart_ready_s,
        "wait_after_restart_s": time.perf_counter() - t_jobs_end, "masks_equal": masks_equal, "masks_compared": compared,
        "ok": int(ok), "by_kind": by_kind,
        "failed_errors": sorted({states[j].get("error", {}).get("class", "?") for j in failed}),
    }


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
    parser.add_argument("--repeats", type=int, default=harness.MIN_REPEATS, help="full runs (fresh server and data each)")
    parser.add_argument("--json", type=Path, default=REPO / "docs" / "benchmarks" / "serve_load.json",
                        help="write the record here (a relative path goes under docs/benchmarks/)")
    parser.add_argument("--docs", action="store_true", help="rewrite the section in docs/benchmarks.md")
    args = parser.parse_args()

    scans = sorted(args.scans.glob("*.nii.gz"))[: args.valid_scans]
    if not scans:
        print(f"no scans in {args.scans}", file=sys.stderr)
        return 2
    from medseg.models.bundle import load_bundle, resolve_bundle_path

    # A snapshot: a training run may replace best.pt meanwhile, and every repeat and both sides must use one model.
    snapshot_dir = Path(tempfile.mkdtemp(prefix="medseg_serve_load_model_"))
    snapshot = snapshot_dir / "model.pt"
    shutil.copyfile(resolve_bundle_path(args.model), snapshot)
    runs: list[dict] = []

    def run(repeat: int) -> dict:
        runs.append(scenario(args, scans, snapshot))
        return runs[-1]

    measured = harness.run_interleaved({"serve": run}, args.repeats)
    import torch

    spec = load_bundle(snapshot, verify=False).spec
    shutil.rmtree(snapshot_dir, ignore_errors=True)
    by_kind: dict[str, dict] = {}
    for kind, (_, expected) in MIX.items():  # summed over the repeats
        statuses: dict[str, int] = {}
        for r in runs:
            for status, n in r["by_kind"][kind]["statuses"].items():
                statuses[status] = statuses.get(status, 0) + n
        by_kind[kind] = {"count": sum(r["by_kind"][kind]["count"] for r in runs), "expected": expected,
                         "statuses": dict(sorted(statuses.items())),
                         "right": sum(r["by_kind"][kind]["right"] for r in runs)}
    totals = {k: sum(r[k] for r in runs) for k in ("bad_total", "bad_right", "accepted", "done", "failed", "lost",
                                                     "running_at_kill", "retried", "rows", "job_folders", "staged_left",
                                                     "masks_equal", "masks_compared")}
    report = harness.record(
        "serve_load", measured, device="cuda" if torch.cuda.is_available() else "cpu", model_name=spec.name,
        model_weights_sha256=spec.provenance.weights_sha256, model_validation=spec.provenance.validation.model_dump(),
        requests=args.requests, clients=args.clients, valid_scans=len(scans), kill_jobs=args.kill_jobs,
        totals_over_repeats=totals, by_kind=by_kind,
        failed_errors=sorted({e for r in runs for e in r["failed_errors"]}),
        notes="seconds: first upload to the last job finished (kill and restart included), per repeat; each repeat "
              "is a fresh server, data folder and request mix (same seed)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    print("written:", harness.write_record(report, args.json))
    print(json.dumps({k: v for k, v in report.items() if k not in ("by_kind", "variants")}, indent=1))
    for kind, v in by_kind.items():
        print(f"  {kind:20s} sent {v['count']:3d}  must get {v['expected']}  got {v['statuses']}")
    if args.docs:
        replace_section(REPO / "docs" / "benchmarks.md", docs_section(report), DOCS_BEGIN, DOCS_END)
    ok = all(r["ok"] for r in runs)
    print("OK" if ok else "CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
