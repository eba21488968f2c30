"""A burst of uploads to ``medseg serve --ray auto`` (loopback, a local Ray cluster): the replica count over
time with ``--min-replicas 1 --max-replicas 2`` against one fixed replica (``--max-replicas 1``), time to
result (p50/p95), throughput, the idle extra replica's removal, and ``kill -9`` of the replica process
running the first job (its job finishes on a replica, none lost, none done twice per the audit log). Masks
are compared with ``medseg predict``'s. The two variants run through bench/harness.py: interleaved (elastic,
fixed, elastic, ...), ``--repeats`` rounds, median and min-max of the timings, counts summed::

    PYTHONPATH=$PWD python bench/serve_ray_burst.py --model RUN --uploads 8
    PYTHONPATH=$PWD python bench/serve_ray_burst.py --model MODEL --uploads 2 --shape 16 16 8 --idle-wait 0 \\
        --json /tmp/ray_burst.json   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
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

from bench.serve_two_replicas import TOKEN, start_server  # noqa: E402
from medseg.data.phantom import PhantomSpec, make_phantom  # noqa: E402
from medseg.inference.runner import predict_paths  # noqa: E402
from medseg.serving.jobs import JobStore  # noqa: E402
from tests.postgres_server import free_port  # noqa: E402

HEADERS = {"Authorization": f"Bearer {TOKEN}"}


def replicas(port: int) -> int | None:
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    except httpx.HTTPError:
        return None
    found = re.search(r"^medseg_replicas (\S+)$", text, re.M)
    return int(float(found.group(1))) if found else None


def run_variant(name: str, model: Path, scans: list[Path], predicted: Path, work: Path, max_replicas: int,
                kill: bool, idle_wait_s: float) -> dict:
    port, data_dir, token_file = free_port(), work / name / "data", work / "tokens"
    extra = ["--ray", "auto", "--min-replicas", "1", "--max-replicas", str(max_replicas)]
    t_start = time.perf_counter()
    server = start_server(model, port, data_dir, None, token_file, 30.0, work / f"{name}.log", extra)
    ready_s = time.perf_counter() - t_start
    timeline, accepted, killed = [], {}, None
    t0 = time.perf_counter()
    with httpx.Client(timeout=120, headers=HEADERS) as client:
        for scan in scans:
            r = client.post(f"http://127.0.0.1:{port}/v1/segmentations", files={"scan": ("upload", scan.read_bytes())})
            r.raise_for_status()
            accepted[r.json()["job_id"]] = scan
        store = JobStore(data_dir / "jobs.sqlite")
        first = next(iter(accepted))
        while True:
            now = time.perf_counter() - t0
            timeline.append((round(now, 1), replicas(port)))
            jobs = {j.id: j for j in store.all()}
            if kill and killed is None and jobs[first].status == "running" and jobs[first].lease_owner:
                pid = int(jobs[first].lease_owner.split(":")[1])
                os.kill(pid, signal.SIGKILL)  # the Ray Serve replica process running the first job
                killed = {"job": first, "pid": pid, "at_s": round(now, 1)}
            if all(jobs[i].status in ("done", "failed") for i in accepted) or now > 420:
                break
            time.sleep(1)
        t_done = time.perf_counter() - t0
        idle_until = time.perf_counter() + idle_wait_s
        back_to_one_s = None
        while time.perf_counter() < idle_until:
            n = replicas(port)
            timeline.append((round(time.perf_counter() - t0, 1), n))
            if n == 1 and back_to_one_s is None and max_replicas > 1:
                back_to_one_s = round(time.perf_counter() - t0 - t_done, 1)
                break
            time.sleep(2)
        equal = 0
        for job_id, scan in accepted.items():
            got_path = work / name / f"{job_id}.nii.gz"
            got_path.write_bytes(client.get(f"http://127.0.0.1:{port}/v1/jobs/{job_id}/mask").content)
            got, want = nib.load(got_path), nib.load(predicted / scan.name)
            equal += bool(np.array_equal(np.asarray(got.dataobj), np.asarray(want.dataobj))
                          and np.array_equal(got.affine, want.affine))
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(60)
    except subprocess.TimeoutExpired:
        server.kill()
    audit = [json.loads(x) for x in (data_dir / "audit.log").read_text().splitlines() if x.strip()]
    done_events = Counter(e["job_id"] for e in audit if e["action"] == "job_finished" and e["outcome"] == "done")
    to_result = sorted(jobs[i].finished - jobs[i].created for i in accepted if jobs[i].finished)
    return {
        "variant": name, "max_replicas": max_replicas, "startup_to_ready_s": round(ready_s, 1),
        "uploads": len(accepted), "done": sum(jobs[i].status == "done" for i in accepted),
        "lost": sum(jobs[i].status != "done" for i in accepted),
        "done_more_than_once": sum(n > 1 for n in done_events.values()),
        "burst_to_all_done_s": round(t_done, 1), "throughput_jobs_per_min": round(60 * len(accepted) / t_done, 2),
        "time_to_result_p50_s": round(float(np.percentile(to_result, 50)), 1),
        "time_to_result_p95_s": round(float(np.percentile(to_result, 95)), 1),
        "max_replicas_seen": max((n or 0) for _, n in timeline), "idle_back_to_one_replica_s": back_to_one_s,
        "killed": killed, "killed_job_attempts": jobs[killed["job"]].attempts if killed else None,
        "masks_equal_to_predict": equal, "replicas_timeline": timeline,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--uploads", type=int, default=8)
    parser.add_argument("--shape", type=int, nargs=3, default=[64, 64, 40], help="phantom scans' voxels")
    parser.add_argument("--variants", nargs="+", default=["elastic", "fixed"], choices=["elastic", "fixed"])
    parser.add_argument("--repeats", type=int, default=harness.MIN_REPEATS, help="interleaved rounds over the variants")
    parser.add_argument("--idle-wait", type=float, default=180.0,
                        help="seconds the elastic variant waits, after the burst, for the extra replica to go")
    parser.add_argument("--json", type=Path, default=REPO / "docs" / "benchmarks" / "serve_ray_burst.json",
                        help="write the record here (a relative path goes under docs/benchmarks/)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="medseg-ray-burst-"))
    spec = PhantomSpec(shape=tuple(args.shape), spacing=(4.0, 4.0, 5.0), noise_hu=15.0)
    scans = []
    for seed in range(args.uploads):
        image, _, affine, _ = make_phantom(np.random.default_rng(100 + seed), spec)
        path = work / "scans" / f"scan{seed}.nii.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(image.astype(np.float32), affine), path)
        scans.append(path)
    predict_paths(args.model, scans, work / "predicted", device="cpu")
    settings = {"elastic": (2, True, args.idle_wait), "fixed": (1, False, 0.0)}
    runs: dict[str, list[dict]] = {name: [] for name in args.variants}

    def variant(name: str):
        def run(repeat: int) -> dict:
            folder = work / f"repeat{repeat}"  # a data folder of its own per run
            folder.mkdir(exist_ok=True)
            (folder / "tokens").write_text(TOKEN + "\n")
            r = run_variant(name, args.model, scans, work / "predicted", folder, *settings[name])
            runs[name].append(r)
            return {**{k: v for k, v in r.items() if isinstance(v, int | float)}, "seconds": r["burst_to_all_done_s"]}
        return run

    measured = harness.run_interleaved({name: variant(name) for name in args.variants}, args.repeats)
    totals = {name: {k: sum(r[k] for r in rs) for k in ("uploads", "done", "lost", "done_more_than_once",
                                                         "masks_equal_to_predict")} for name, rs in runs.items()}
    record = harness.record(
        "serve_ray_burst", measured, uploads=args.uploads, shape=args.shape, totals_over_repeats=totals,
        runs={name: [{"killed": r["killed"], "killed_job_attempts": r["killed_job_attempts"],
                      "replicas_timeline": r["replicas_timeline"]} for r in rs] for name, rs in runs.items()},
        what="burst of uploads to medseg serve --ray auto (local cluster), elastic 1..2 replicas vs 1 fixed",
        notes="seconds: the burst's first upload to every job done, per repeat")
    print("written:", harness.write_record(record, args.json))
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
