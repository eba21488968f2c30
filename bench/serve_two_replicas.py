"""Two ``medseg serve`` processes on different ports sharing one PostgreSQL job store and one data folder
(a two-machine stand-in, loopback only), one of them killed with ``kill -9`` while it runs a job.

Checks: every accepted job done exactly once (one ``job_finished done`` per job in the audit log), none
lost, the killed replica's job finished by the other after its lease ran out, and every mask equal, voxel
for voxel with the same affine, to ``medseg predict``'s for the same scan. PostgreSQL is started as the
tests start it (tests/postgres_server.py). Figures go to ``--json``::

    PYTHONPATH=$PWD python bench/serve_two_replicas.py --model RUN --uploads 50
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from medseg.inference.runner import predict_paths  # noqa: E402
from medseg.serving.jobs import PostgresJobStore  # noqa: E402
from tests.postgres_server import free_port, fresh_database, postgres  # noqa: E402

TOKEN = "bench-token-0123456789abcdef"


def start_server(model: Path, port: int, data_dir: Path, store_url: str | None, token_file: Path, lease_s: float,
                 log: Path, extra: list[str] | None = None) -> subprocess.Popen:
    """A ``medseg serve`` process on loopback, returned once /readyz answers 200."""
    cmd = [sys.executable, "-m", "medseg", "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
           "--data-dir", str(data_dir), "--token-file", str(token_file), "--max-queue", "1000", "--rate-limit", "0",
           "--workers", "1", "--device", "cpu", "--lease", str(lease_s),
           *(["--job-store", store_url] if store_url else []), *(extra or [])]
    process = subprocess.Popen(cmd, stdout=log.open("ab"), stderr=subprocess.STDOUT, env={**os.environ})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            raise RuntimeError(f"server on {port} exited: see {log}")
        time.sleep(0.2)
    raise RuntimeError(f"server on {port} not ready in 300 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="run folder or model file")
    parser.add_argument("--scans", type=Path, default=REPO.parent / "shared" / "data" / "hippocampus" / "images")
    parser.add_argument("--uploads", type=int, default=50)
    parser.add_argument("--lease", type=float, default=5.0, help="seconds: how soon a dead replica's job is taken back")
    parser.add_argument("--timeout", type=float, default=480)
    parser.add_argument("--json", type=Path, default=REPO / "docs" / "benchmarks" / "serve_two_replicas.json")
    args = parser.parse_args()

    load_before = os.getloadavg()
    scans = sorted(p for p in args.scans.iterdir() if p.name.endswith((".nii", ".nii.gz")) and not p.name.startswith("."))
    scans = scans[: args.uploads]
    work = Path(tempfile.mkdtemp(prefix="medseg-two-replicas-"))
    t0 = time.perf_counter()
    predict_paths(args.model, scans, work / "predicted", device="cpu")
    predict_s = time.perf_counter() - t0
    token_file = work / "tokens"
    token_file.write_text(TOKEN + "\n")
    data_dir = work / "data"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with postgres() as server_url:
        url = fresh_database(server_url)
        ports = [free_port(), free_port()]
        servers = [start_server(args.model, p, data_dir, url, token_file, args.lease, work / f"server{i}.log")
                   for i, p in enumerate(ports)]
        accepted: dict[str, Path] = {}
        lock = threading.Lock()
        t_upload = time.perf_counter()

        def upload(indices: list[int]) -> None:
            with httpx.Client(timeout=120, headers=headers) as client:
                for i in indices:
                    port = ports[i % 2]  # spread over both replicas; the other once one is killed
                    try:
                        r = client.post(f"http://127.0.0.1:{port}/v1/segmentations",
                                        files={"scan": ("upload", scans[i].read_bytes())})
                    except httpx.TransportError:
                        r = client.post(f"http://127.0.0.1:{ports[0]}/v1/segmentations",
                                        files={"scan": ("upload", scans[i].read_bytes())})
                    r.raise_for_status()
                    with lock:
                        accepted[r.json()["job_id"]] = scans[i]

        threads = [threading.Thread(target=upload, args=(list(range(k, len(scans), 4)),)) for k in range(4)]
        for t in threads:
            t.start()
        # kill -9 the second replica as soon as it runs a job (its worker's lease names its pid).
        store = PostgresJobStore(url)
        victim, killed_job = servers[1], None
        deadline = time.monotonic() + 120
        while killed_job is None and time.monotonic() < deadline:
            for job in store.all():
                if job.status == "running" and job.lease_owner and f":{victim.pid}:" in job.lease_owner:
                    killed_job = job.id
                    break
            else:
                time.sleep(0.02)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        t_kill = time.perf_counter()
        for t in threads:
            t.join()
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            jobs = {j.id: j for j in store.all()}
            if all(jobs[i].status in ("done", "failed") for i in accepted):
                break
            time.sleep(0.5)
        wall_s = time.perf_counter() - t_upload
        equal, differing = 0, []
        with httpx.Client(timeout=120, headers=headers) as client:
            for job_id, scan in accepted.items():
                r = client.get(f"http://127.0.0.1:{ports[0]}/v1/jobs/{job_id}/mask")
                if r.status_code != 200:
                    differing.append(job_id)
                    continue
                got_path = work / f"{job_id}.nii.gz"
                got_path.write_bytes(r.content)
                got = nib.load(got_path)
                want = nib.load(work / "predicted" / scan.name)
                same = (np.array_equal(np.asarray(got.dataobj), np.asarray(want.dataobj))
                        and np.array_equal(got.affine, want.affine))
                equal += same
                if not same:
                    differing.append(job_id)
        servers[0].send_signal(signal.SIGTERM)
        servers[0].wait(30)
    audit = [json.loads(line) for line in (data_dir / "audit.log").read_text().splitlines() if line.strip()]
    finished = Counter(e["job_id"] for e in audit if e["action"] == "job_finished" and e["outcome"] == "done")
    status = Counter(str(j.status) for j in jobs.values())
    record = {
        "what": "two medseg serve processes, one PostgreSQL store, one data folder; kill -9 of one mid-job",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "command": "PYTHONPATH=$PWD python bench/serve_two_replicas.py --model RUN --uploads "
                   f"{args.uploads} --lease {args.lease:g}",
        "commit": subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                                 text=True).stdout.strip(),
        "scans": len(scans), "accepted": len(accepted), "statuses": dict(status),
        "jobs_lost": sum(1 for i in accepted if jobs[i].status != "done"),
        "jobs_done_more_than_once": sum(1 for n in finished.values() if n > 1),
        "jobs_done_once": sum(1 for i in accepted if finished[i] == 1),
        "killed_job": killed_job, "killed_job_attempts": jobs[killed_job].attempts if killed_job else None,
        "killed_job_status": str(jobs[killed_job].status) if killed_job else None,
        "killed_at_s": round(t_kill - t_upload, 2),
        "masks_equal_to_predict": equal, "masks_differing": differing,
        "wall_s": round(wall_s, 1),
        "predict_reference_s": round(predict_s, 1), "lease_s": args.lease,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
