"""What each experiment tracker costs a training: seconds in its hooks at fit start, per epoch and at fit end.

Trains the tests' tiny 3D U-Net on synthetic phantoms (1 iteration per epoch, so the trackers' share is
as large as it gets) once per tracker set, in one process after a warm-up fit, timing every callback hook of the trackers
(:mod:`medseg.training.tracking`, TensorBoard's callback) and the whole fit. W&B runs offline (its
default here), MLflow in its SQLite store in the run folder. Fit start includes importing the tracker's
package (done once per process). Prints a Markdown table; ``--json`` stores it.

    PYTHONPATH=$PWD python bench/tracker_overhead.py --epochs 5 --json docs/benchmarks/tracker_overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from medseg.training.trainer import Trainer, TrainerCallback, default_callbacks
from tests.conftest import TINY_SPEC, tiny_config, write_phantom_dataset

TRACKER_SETS = ([], ["tensorboard"], ["mlflow"], ["wandb"])


class Timed(TrainerCallback):
    """Wraps a callback, adding the seconds of each of its hooks to ``times``."""

    def __init__(self, inner: TrainerCallback, times: dict[str, list[float]]) -> None:
        self.inner, self.times = inner, times

    def _timed(self, hook: str, *args) -> None:
        start = time.perf_counter()
        getattr(self.inner, hook)(*args)
        self.times.setdefault(hook, []).append(time.perf_counter() - start)

    def on_fit_start(self, trainer):
        self._timed("on_fit_start", trainer)

    def on_epoch_end(self, trainer, record):
        self._timed("on_epoch_end", trainer, record)

    def on_fit_end(self, trainer, result):
        self._timed("on_fit_end", trainer, result)


def run(manifest: Path, out: Path, trackers: list[str], epochs: int) -> dict:
    """One tiny fit with ``trackers``; seconds in their hooks and of the whole fit."""
    config = tiny_config(manifest, out / ("_".join(trackers) or "none"), epochs=epochs, iterations_per_epoch=1,
                         choose_postprocessing=False, trackers=trackers)
    times: dict[str, list[float]] = {}
    plain = default_callbacks(config.model_copy(update={"train": config.train.model_copy(update={"trackers": []})}))
    tracked = [Timed(cb, times) for cb in default_callbacks(config)[len(plain):]]
    start = time.perf_counter()
    Trainer(config, "cpu", callbacks=plain + tracked).fit()
    return {"trackers": trackers, "fit_s": round(time.perf_counter() - start, 3),
            "fit_start_s": round(sum(times.get("on_fit_start", [0.0])), 4),
            "per_epoch_s": round(statistics.median(times["on_epoch_end"]), 5) if "on_epoch_end" in times else 0.0,
            "fit_end_s": round(sum(times.get("on_fit_end", [0.0])), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    os.environ.pop("WANDB_MODE", None)  # the default: offline
    with tempfile.TemporaryDirectory() as tmp:
        manifest = write_phantom_dataset(Path(tmp) / "phantoms", num_cases=6, seed=1, spec=TINY_SPEC)
        run(manifest, Path(tmp) / "warm-up", [], 1)  # first-fit costs (imports, data cache) out of the figures
        rows = [run(manifest, Path(tmp), trackers, args.epochs) for trackers in TRACKER_SETS]
    print("| trackers | fit start (s) | per epoch (s, median) | fit end (s) | whole fit (s) |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {', '.join(r['trackers']) or 'none'} | {r['fit_start_s']} | {r['per_epoch_s']} | {r['fit_end_s']} | {r['fit_s']} |")
    if args.json:
        args.json.write_text(json.dumps({"epochs": args.epochs, "machine": platform.processor() or platform.machine(),
                                         "cpus": os.cpu_count(), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
