"""Cost of the default ``medseg predict`` as the scan grows: the same real CT stacked to more slices.

The real chest CT ../shared/data/lung_ct/lung1_ct.nii.gz (512x512x48, 5 mm slices) is stacked along z
(copies one after the other, every second one mirrored in z so the seams are continuous) to 100, 300, 600
and 1000 slices, keeping its spacing and orientation. Each size is predicted on the default path
(``predict_paths`` as ``medseg predict`` calls it: statistics and QC on, NIfTI out, ``--precision auto``)
with the ct_lung network, untrained and seeded (``bench/predict_speed.py``'s bundle; speed does not
depend on the weights), in a process of its own so that its peak RSS is its own.

Each size is a variant of bench/harness.py: the sizes run interleaved (100 300 600 1000 100 300 ...) for
``--repeats`` rounds, each figure the median (min-max) over the rounds. Per size: wall seconds, the
network's forward seconds, the per-stage seconds (medseg.inference.timing, as ``stage_<name>_s``), peak RSS
above the process's RSS after the model is loaded, bytes per input voxel. The goal (issue 22): time
linear in voxels, bytes per voxel flat.

    PYTHONPATH=$PWD python bench/predict_growth.py --json predict_growth.json \\
        --plot docs/benchmarks/predict_growth.png
    PYTHONPATH=$PWD python bench/predict_growth.py --slices 12 24 --channels 4 8 16 32 64 --json /tmp/g.json  # smoke
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

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import harness  # noqa: E402
from predict_speed import LUNG, Timed, benchmark_bundle  # noqa: E402

DEFAULT_SLICES = (100, 300, 600, 1000)


def _rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def stacked_ct(source: Path, slices: int, folder: Path) -> Path:
    """``source`` stacked along z to ``slices`` slices (int16 HU, same affine), written once into ``folder``."""
    path = folder / f"lung1_stacked_{slices}.nii.gz"
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    img = nib.load(source)
    data = np.asarray(img.dataobj)
    copies = -(-slices // data.shape[2])
    stack = np.concatenate([data if i % 2 == 0 else data[:, :, ::-1] for i in range(copies)], axis=2)
    out = nib.Nifti1Image(np.ascontiguousarray(stack[:, :, :slices]), img.affine)
    out.set_qform(img.affine, code=1)
    nib.save(out, path)
    return path


def run_default(model: Path, scan: Path, out: Path) -> dict:
    """One default-path prediction of ``scan`` (the CLI's defaults), timed per stage, with its memory."""
    from medseg.inference.predictor import Predictor
    from medseg.inference.runner import predict_paths

    predictor = Predictor.from_checkpoint(model, "cpu", precision="auto")
    timed = [Timed(m) for m in predictor.models]
    predictor.models, predictor.model = timed, timed[0]
    baseline = _rss()
    load_before = os.getloadavg()
    start = time.perf_counter()
    summary = predict_paths(model, [scan], out, overwrite=True, predictor=predictor)
    seconds = time.perf_counter() - start
    if summary.failed:
        raise SystemExit(summary.describe())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    voxels = int(np.prod(nib.load(scan).shape))
    return {"scan": scan.name, "voxels": voxels, "seconds": seconds, "network_seconds": sum(t.seconds for t in timed),
            "stages": summary.times.as_record(), "precision": predictor.precision.runtime,
            "peak_bytes_above_model": peak - baseline, "bytes_per_voxel": (peak - baseline) / voxels,
            "load_before": load_before, "load_after": os.getloadavg()}


def plot(rows: list[dict], path: Path) -> None:
    """Seconds and bytes per voxel (medians over the repeats) against voxels (millions)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mvox = [r["voxels"] / 1e6 for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    left.plot(mvox, [r["seconds"] for r in rows], "o-", label="end to end")
    left.plot(mvox, [r["network_seconds"] for r in rows], "s--", label="network forward")
    left.set_xlabel("input voxels (millions)")
    left.set_ylabel("seconds")
    left.legend()
    right.plot(mvox, [r["bytes_per_voxel"] for r in rows], "o-")
    right.set_xlabel("input voxels (millions)")
    right.set_ylabel("peak RSS above model / voxel (B)")
    right.set_ylim(bottom=0)
    fig.suptitle("medseg predict (default path) on lung1 stacked along z")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def table(rows: list[dict]) -> str:
    """The markdown table of docs/benchmarks.md: medians over the repeats, seconds also with min-max."""
    lines = ["| slices | voxels (M) | seconds, median (min–max) | network s | around the network / network | s per M voxels | "
             "peak above model (GB) | B / voxel | B / added voxel |", "|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows):
        around = sum(v for k, v in r["stages"].items() if k != "network")
        # Marginal bytes per voxel against the previous size: fixed costs (first-call buffers, thread pools)
        # fall out, so this is the figure that must stay flat.
        prev = rows[i - 1] if i else None
        added = "" if prev is None else \
            f"{(r['peak_bytes_above_model'] - prev['peak_bytes_above_model']) / (r['voxels'] - prev['voxels']):.1f}"
        lines.append(f"| {r['slices']} | {r['voxels'] / 1e6:.1f} | {harness.cell(r['seconds_summary'], 1)} | {r['network_seconds']:.1f} | "
                     f"{around / max(r['stages'].get('network', 0), 1e-9):.2f} | {r['seconds'] / (r['voxels'] / 1e6):.2f} | "
                     f"{r['peak_bytes_above_model'] / 1e9:.2f} | {r['bytes_per_voxel']:.1f} | {added} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/medseg_predict_growth"))
    parser.add_argument("--slices", type=int, nargs="+", default=list(DEFAULT_SLICES))
    parser.add_argument("--channels", type=int, nargs="+", default=None, help="network channels (default: ct_lung's)")
    parser.add_argument("--repeats", type=int, default=harness.MIN_REPEATS, help="interleaved rounds over the sizes")
    parser.add_argument("--json", type=Path, default=None,
                        help="write the record here (a relative path goes under docs/benchmarks/)")
    parser.add_argument("--plot", type=Path, default=None, help="write the plot here (PNG)")
    parser.add_argument("--worker", nargs=3, metavar=("MODEL", "SCAN", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_default(*map(Path, args.worker))))
        return
    if not LUNG.is_file():
        raise SystemExit(f"real data not found: {LUNG}")
    model = benchmark_bundle(args.work, args.channels)
    scans = {slices: stacked_ct(LUNG, slices, args.work / "scans") for slices in args.slices}

    def size(slices: int):
        def run(repeat: int) -> dict:
            cmd = [sys.executable, __file__, "--worker", str(model), str(scans[slices]), str(args.work / f"out_{slices}")]
            done = subprocess.run(cmd, check=True, capture_output=True, text=True,
                                  env={**os.environ, "PYTHONPATH": str(REPO)})
            r = json.loads(done.stdout.strip().splitlines()[-1])
            return {k: v for k, v in r.items() if isinstance(v, int | float)} | \
                {f"stage_{k}_s": v for k, v in r["stages"].items() if isinstance(v, int | float)}
        return run

    measured = harness.run_interleaved({f"{n} slices": size(n) for n in args.slices}, args.repeats)
    rows = []
    for n in args.slices:
        v = measured["variants"][f"{n} slices"]
        row = {"slices": n, "voxels": int(v["voxels"]["median"]), "seconds_summary": v["seconds"],
               **{k: s["median"] for k, s in v.items() if not k.startswith("stage_")},
               "stages": {k[len("stage_"):-len("_s")]: s["median"] for k, s in v.items() if k.startswith("stage_")}}
        rows.append(row)
    report = harness.record("predict_growth", measured, network_channels=args.channels or "ct_lung default",
                            rows=rows, notes="rows: medians over the repeats; peak_bytes_above_model: ru_maxrss - "
                                             "RSS after the model is loaded")
    print(harness.conditions(report))
    print(table(rows))
    if args.json:
        print("written:", harness.write_record(report, args.json))
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
