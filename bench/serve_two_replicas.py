"""Two ``medseg serve`` processes on different ports sharing one PostgreSQL job store and one data folder
(a two-machine stand-in, loopback only), one of them killed with ``kill -9`` while it runs a job.

Checks: every accepted job done exactly once (one ``job_finished done`` per job in the audit log), none
lost, the killed replica's job finished by the other after its lease ran out, and every mask equal, voxel
for voxel with the same affine, to ``medseg predict``'s for the same scan. PostgreSQL is started as the
tests start it (tests/postgres_server.py), once; each of the ``--repeats`` runs (bench/harness.py) gets a
fresh database, data folder and pair of servers. Figures go to ``--json`` (a harness record: wall time
as median and min-max, counts summed over the runs)::

    PYTHONPATH=$PWD python bench/serve_two_replicas.py --model RUN --uploads 50
    PYTHONPATH=$PWD python bench/serve_two_replicas.py --model MODEL --uploads 4 --json /tmp/two.json   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
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
sys.path.insert(0, str(REPO / "bench"))

import harness  # noqa: E402

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


def scenario(args: argparse.Namespace, scans: list[Path], predicted: Path, server_url: str) -> dict:
    """One run: a fresh database and data folder, two servers, the uploads, ``kill -9`` of the second replica
    while it runs a job, the checks. Its figures (numbers) and the killed job's fate."""
    work = Path(tempfile.mkdtemp(prefix="medseg-two-replicas-"))
    token_file = work / "tokens"
    token_file.write_text(TOKEN + "\n")
    data_dir = work / "data"
    headers = {"Authorization": f"Bearer {TOKEN}"}
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
            want = nib.load(predicted / scan.name)
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
    return {
        "seconds": wall_s, "accepted": len(accepted),
        "jobs_lost": sum(1 for i in accepted if jobs[i].status != "done"),
        "jobs_done_more_than_once": sum(1 for n in finished.values() if n > 1),
        "jobs_done_once": sum(1 for i in accepted if finished[i] == 1),
        "killed_job_attempts": jobs[killed_job].attempts if killed_job else 0,
        "killed_job_done": int(bool(killed_job) and str(jobs[killed_job].status) == "done"),
        "killed_at_s": t_kill - t_upload, "masks_equal_to_predict": equal, "masks_differing": len(differing),
        "statuses": dict(status),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="run folder or model file")
    parser.add_argument("--scans", type=Path, default=REPO.parent / "shared" / "data" / "hippocampus" / "images")
    parser.add_argument("--uploads", type=int, default=50)
    parser.add_argument("--lease", type=float, default=5.0, help="seconds: how soon a dead replica's job is taken back")
    parser.add_argument("--timeout", type=float, default=480)
    parser.add_argument("--repeats", type=int, default=harness.MIN_REPEATS, help="full runs (fresh database and servers)")
    parser.add_argument("--json", type=Path, default=REPO / "docs" / "benchmarks" / "serve_two_replicas.json",
                        help="write the record here (a relative path goes under docs/benchmarks/)")
    args = parser.parse_args()

    scans = sorted(p for p in args.scans.iterdir() if p.name.endswith((".nii", ".nii.gz")) and not p.name.startswith("."))
    scans = scans[: args.uploads]
    predicted = Path(tempfile.mkdtemp(prefix="medseg-two-replicas-predicted-"))
    predict_paths(args.model, scans, predicted, device="cpu")  # the reference masks, once
    runs: list[dict] = []
    with postgres() as server_url:
        def run(repeat: int) -> dict:
            runs.append(scenario(args, scans, predicted, server_url))
            return runs[-1]

        measured = harness.run_interleaved({"two replicas, one killed": run}, args.repeats)
    totals = {k: sum(r[k] for r in runs) for k in ("accepted", "jobs_lost", "jobs_done_more_than_once", "jobs_done_once",
                                                     "killed_job_done", "masks_equal_to_predict", "masks_differing")}
    record = harness.record(
        "serve_two_replicas", measured, scans=len(scans), lease_s=args.lease, totals_over_repeats=totals,
        statuses=[r["statuses"] for r in runs],
        what="two medseg serve processes, one PostgreSQL store, one data folder; kill -9 of one mid-job",
        notes="seconds: first upload to every job finished, per repeat; each repeat a fresh database, data folder "
              "and pair of servers")
    print("written:", harness.write_record(record, args.json))
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
