"""Work around the network, A/B between two checkouts of medseg: CPU seconds, peak memory, identical masks.

Each run is a process of its own with ONE torch thread (process CPU time then counts work done, not
OpenMP threads spinning while other processes hold the cores); the two checkouts are the variants of
bench/harness.py (interleaved A B A B ..., ``--repeats`` rounds, median and min-max), and the figures to
quote are ratios of medians. Per run: the network's forward calls are timed (wall and CPU) inside the
process, so "non-network CPU" = process CPU - forward CPU; the default path (statistics and QC on, NIfTI
out, float32); peak RSS; the stage times where the checkout has them (medseg.inference.timing, as
``stage_<name>_s``). Masks of the last runs are compared voxel by voxel.

    PYTHONPATH=$PWD python bench/predict_stages_ab.py --a CHECKOUT_A --b $PWD --channels 4 8 16 32 64 \
        --json predict_stages_ab.json
    PYTHONPATH=$PWD python bench/predict_stages_ab.py --a $PWD --b $PWD --smoke --json /tmp/ab.json   # smoke

The bundle is written by checkout A (so an older checkout can read it); the scans are
bench/predict_speed.py's (``--scan`` picks one by name; ``--smoke``: its DICOM series and a tiny network).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import harness  # bench/ is this script's folder, first on sys.path
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


def _stem(scan: Path) -> str:
    return scan.name[: -len(".nii.gz")] if scan.name.endswith(".nii.gz") else scan.name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", type=Path, required=True, help="checkout A (the baseline)")
    parser.add_argument("--b", type=Path, required=True, help="checkout B")
    parser.add_argument("--work", type=Path, default=Path("/tmp/medseg_stages_ab"))
    parser.add_argument("--scan", default="512x512x48", help="part of the scan's name (predict_speed.py's scans)")
    parser.add_argument("--channels", type=int, nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=harness.MIN_REPEATS)
    parser.add_argument("--smoke", action="store_true",
                        help="the DICOM series torchio_ct_17 and channels 4..64: checks the script, measures nothing")
    parser.add_argument("--json", type=Path, default=None,
                        help="write the record here (a relative path goes under docs/benchmarks/)")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_default(*map(Path, args.worker))))
        return
    if args.smoke:
        args.scan, args.channels = "torchio_ct_17", args.channels or [4, 8, 16, 32, 64]
    channels = " ".join(map(str, args.channels)) if args.channels else ""
    setup = ("import sys, json; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
             "import predict_speed as ps; m, s = ps.prepare(Path(sys.argv[2]), [int(c) for c in sys.argv[3].split()] or None, "
             "sys.argv[4] == '1'); print(json.dumps([str(m), [str(x) for x in s]]))")
    done = subprocess.run([sys.executable, "-c", setup, str(HERE.parent), str(args.work), channels,
                           "0" if args.smoke else "1"], check=True, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(args.a)})
    model, scans = json.loads(done.stdout.strip().splitlines()[-1])
    scan = next(Path(s) for s in scans if args.scan in Path(s).name)

    def variant(name: str, tree: Path):
        def run(repeat: int) -> dict:
            out = args.work / f"out_{name}"
            done = subprocess.run([sys.executable, str(HERE), "--a", str(args.a), "--b", str(args.b), "--worker",
                                   model, str(scan), str(out)], check=True, capture_output=True, text=True,
                                  cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)})
            r = json.loads(done.stdout.strip().splitlines()[-1])
            stages = {f"stage_{k}_s": v for k, v in (r.pop("stages") or {}).items() if isinstance(v, int | float)}
            r.pop("load", None)
            return {**r, "seconds": r["wall"], **stages}
        return run

    measured = harness.run_interleaved({"a": variant("a", args.a), "b": variant("b", args.b)}, args.repeats)
    a = np.asarray(nib.load(args.work / "out_a" / f"{_stem(scan)}.nii.gz").dataobj)
    b = np.asarray(nib.load(args.work / "out_b" / f"{_stem(scan)}.nii.gz").dataobj)
    v = measured["variants"]
    report = harness.record(
        "predict_stages_ab", measured, checkouts={"a": harness.portable(str(args.a.resolve())),
                                                  "b": harness.portable(str(args.b.resolve()))},
        scan=scan.name, voxels=int(a.size), network_channels=args.channels or "ct_lung default", smoke=args.smoke,
        non_network_cpu_ratio_b_over_a=harness.ratio(measured, "b", "a", "non_network_cpu"),
        forward_cpu_ratio_b_over_a=harness.ratio(measured, "b", "a", "forward_cpu"),
        peak_rss_difference_bytes_b_minus_a=v["b"]["peak_rss"]["median"] - v["a"]["peak_rss"]["median"],
        mask_voxels_equal=float((a == b).mean()), mask_voxels_differing=int((a != b).sum()))
    print(json.dumps(report, indent=2))
    print(harness.conditions(report))
    if args.json:
        print("written:", harness.write_record(report, args.json))


if __name__ == "__main__":
    main()
