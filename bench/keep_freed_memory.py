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
import subprocess
import sys
from pathlib import Path

import harness  # bench/ is this script's folder, first on sys.path

SCANS = ("lung1_512x512x200.nii.gz", "lung1_ras_512x512x300.nii.gz")


def worker(model: Path, scans: list[Path], out: Path) -> dict:
    """One default-path run (bench/predict_speed.py's timed worker), with the figures this benchmark reports."""
    from predict_speed import run_medseg

    r = run_medseg(model, scans, out)
    return {"seconds": r["seconds"], "network_seconds": r["network_seconds"],
            "around_network_seconds": r["seconds"] - r["network_seconds"],
            "peak_above_model_bytes": r["peak_rss"] - r["baseline_rss"]}


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
