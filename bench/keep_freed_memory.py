"""``medseg predict`` with and without keeping freed memory (medseg.inference.memory.keep_freed_memory):
the default path on the speed benchmark's 200- and 300-slice CTs, one process per run, interleaved
repeats through bench/harness.py.

Variants: the default (glibc told to keep freed blocks) and ``MEDSEG_KEEP_FREED_MEMORY=0`` (glibc's own
behaviour: blocks above 32 MB mapped and unmapped one by one). Per run: wall seconds of ``predict_paths``,
the network's forward seconds (timed inside the process), the rest ("around the network"), and the peak
RSS above the RSS after the model is loaded. A small network of the ct_lung shape (``--channels``, default
4 8 16 32 64) keeps each run short; the work around the network does not depend on its width.

    PYTHONPATH=$PWD python bench/keep_freed_memory.py --json keep_freed_memory.json
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

SCANS = ("lung1_512x512x200.nii.gz", "lung1_ras_512x512x300.nii.gz")


def worker(model: Path, scans: list[Path], out: Path) -> dict:
    import torch
    from torch import nn

    from medseg.inference.predictor import Predictor
    from medseg.inference.runner import predict_paths

    predictor = Predictor.from_checkpoint(model, "cpu")
    forward = [0.0]

    class Timed(nn.Module):
        def __init__(self, net: nn.Module):
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            start = time.perf_counter()
            y = self.net(x)
            forward[0] += time.perf_counter() - start
            return y

    predictor.models = [Timed(m) for m in predictor.models]
    predictor.model = predictor.models[0]
    baseline = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    start = time.perf_counter()
    summary = predict_paths(model, scans, out, overwrite=True, predictor=predictor)
    seconds = time.perf_counter() - start
    if summary.failed:
        raise SystemExit(summary.describe())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": seconds, "network_seconds": forward[0], "around_network_seconds": seconds - forward[0],
            "peak_above_model_bytes": peak - baseline}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/medseg_predict_speed"))
    parser.add_argument("--channels", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    parser.add_argument("--repeats", type=int, default=harness.MIN_REPEATS)
    parser.add_argument("--json", type=Path, default=None, help="record (relative: under docs/benchmarks/)")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        model, out, *scans = args.worker
        print(json.dumps(worker(Path(model), [Path(s) for s in scans], Path(out))))
        return
    from predict_speed import prepare  # the speed benchmark's bundle and stacked CTs

    model, built = prepare(args.work, args.channels)
    scans = [s for s in built if s.name in SCANS]

    def variant(keep: bool):
        def run(_: int) -> dict:
            env = {**os.environ, "MEDSEG_KEEP_FREED_MEMORY": "1" if keep else "0"}
            out = args.work / f"out_keep_{int(keep)}"
            done = subprocess.run([sys.executable, __file__, "--worker", str(model), str(out), *map(str, scans)],
                                  env=env, check=True, capture_output=True, text=True)
            return json.loads(done.stdout.strip().splitlines()[-1])
        return run

    measured = harness.run_interleaved({"freed memory kept (default)": variant(True),
                                        "MEDSEG_KEEP_FREED_MEMORY=0": variant(False)}, args.repeats)
    data = harness.record("keep_freed_memory", measured, network_channels=args.channels,
                          scans=[s.name for s in scans],
                          around_network_ratio=harness.ratio(measured, "MEDSEG_KEEP_FREED_MEMORY=0",
                                                             "freed memory kept (default)", "around_network_seconds"))
    print(harness.conditions(data))
    for name, v in measured["variants"].items():
        print(f"| {name} | {harness.cell(v['seconds'])} | {harness.cell(v['network_seconds'])} | "
              f"{harness.cell(v['around_network_seconds'])} | {v['peak_above_model_bytes']['median'] / 1e9:.2f} |")
    if args.json:
        print("written:", harness.write_record(data, args.json))


if __name__ == "__main__":
    main()
