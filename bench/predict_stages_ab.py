"""Work around the network, A/B between two checkouts of medseg: CPU seconds, peak memory, identical masks.

For a noisy shared machine: each run is a process of its own with ONE torch thread (process CPU time then
counts work done, not OpenMP threads spinning while the machine is contended), the two checkouts run
interleaved A B A B ..., and the figures to quote are ratios of medians. Per run: the network's forward
calls are timed (wall and CPU) inside the process, so "non-network CPU" = process CPU - forward CPU; the
default path (statistics and QC on, NIfTI out, float32); peak RSS; the stage times where the checkout
has them (medseg.inference.timing). Masks of the last runs are compared voxel by voxel.

    PYTHONPATH=$PWD python bench/predict_stages_ab.py --a /work/main --b $PWD --channels 4 8 16 32 64 --repeats 3

The bundle is written by checkout A (so an older checkout can read it); the scans are
bench/predict_speed.py's (``--scan`` picks one by name).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

HERE = Path(__file__).resolve()


def run_default(model: Path, scan: Path, out: Path) -> dict:
    """One default-path prediction with the checkout on sys.path; CPU seconds split at the network."""
    import torch
    from torch import nn

    from medseg.inference.predictor import Predictor
    from medseg.inference.runner import predict_paths

    torch.set_num_threads(1)

    class Timed(nn.Module):
        def __init__(self, net: nn.Module):
            super().__init__()
            self.net, self.seconds, self.cpu = net, 0.0, 0.0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            wall, cpu = time.perf_counter(), time.process_time()
            y = self.net(x)
            self.seconds += time.perf_counter() - wall
            self.cpu += time.process_time() - cpu
            return y

    predictor = Predictor.from_checkpoint(model, "cpu", precision="float32")
    timed = [Timed(m) for m in predictor.models]
    predictor.models, predictor.model = timed, timed[0]
    load = os.getloadavg()[0]
    cpu0, wall0 = time.process_time(), time.perf_counter()
    summary = predict_paths(model, [scan], out, overwrite=True, predictor=predictor)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    times = getattr(summary, "times", None)
    forward_cpu = sum(t.cpu for t in timed)
    return {"wall": wall, "cpu": cpu, "forward_wall": sum(t.seconds for t in timed), "forward_cpu": forward_cpu,
            "non_network_cpu": cpu - forward_cpu, "load": [load, os.getloadavg()[0]],
            "stages": times.as_record() if times is not None else None,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", type=Path, required=True, help="checkout A (the baseline)")
    parser.add_argument("--b", type=Path, required=True, help="checkout B")
    parser.add_argument("--work", type=Path, default=Path("/tmp/medseg_stages_ab"))
    parser.add_argument("--scan", default="512x512x48", help="part of the scan's name (predict_speed.py's scans)")
    parser.add_argument("--channels", type=int, nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_default(*map(Path, args.worker))))
        return
    channels = " ".join(map(str, args.channels)) if args.channels else ""
    setup = ("import sys, json; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
             "import predict_speed as ps; m, s = ps.prepare(Path(sys.argv[2]), [int(c) for c in sys.argv[3].split()] or None); "
             "print(json.dumps([str(m), [str(x) for x in s]]))")
    done = subprocess.run([sys.executable, "-c", setup, str(HERE.parent), str(args.work), channels], check=True,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(args.a)})
    model, scans = json.loads(done.stdout.strip().splitlines()[-1])
    scan = next(Path(s) for s in scans if args.scan in Path(s).name)
    runs: dict[str, list[dict]] = {"a": [], "b": []}
    for _ in range(args.repeats):
        for name, tree in (("a", args.a), ("b", args.b)):
            out = args.work / f"out_{name}"
            done = subprocess.run([sys.executable, str(HERE), "--a", str(args.a), "--b", str(args.b), "--worker",
                                   model, str(scan), str(out)], check=True, capture_output=True, text=True,
                                  cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)})
            runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(name, json.dumps(runs[name][-1]), flush=True)
    stem = scan.name[: -len(".nii.gz")]
    a = np.asarray(nib.load(args.work / "out_a" / f"{stem}.nii.gz").dataobj)
    b = np.asarray(nib.load(args.work / "out_b" / f"{stem}.nii.gz").dataobj)

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    report = {"command": "python " + " ".join(sys.argv), "scan": scan.name, "voxels": int(a.size),
              "network_channels": args.channels or "ct_lung default", "runs": runs,
              "non_network_cpu_ratio_b_over_a": median("b", "non_network_cpu") / median("a", "non_network_cpu"),
              "forward_cpu_ratio_b_over_a": median("b", "forward_cpu") / median("a", "forward_cpu"),
              "peak_rss_difference_bytes_b_minus_a": median("b", "peak_rss") - median("a", "peak_rss"),
              "mask_voxels_equal": float((a == b).mean()), "mask_voxels_differing": int((a != b).sum())}
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
