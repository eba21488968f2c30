"""What each experiment tracker costs a training: seconds in its hooks at fit start, per epoch and at fit end.

Trains the tests' tiny 3D U-Net on synthetic phantoms (1 iteration per epoch, so the trackers' share is
as large as it gets) once per tracker set and repeat, in one process after a warm-up fit, timing every
callback hook of the trackers (:mod:`medseg.training.tracking`, TensorBoard's callback) and the whole fit.
The tracker sets are the variants of bench/harness.py: interleaved, ``--repeats`` rounds, median and
min-max. W&B runs offline (its default here), MLflow in its SQLite store in the run folder. Fit start of
a tracker's first repeat includes importing its package (done once per process): the max of fit start
shows it, the median does not. Prints a Markdown table; ``--json`` stores the record (a relative path goes
under docs/benchmarks/).

    PYTHONPATH=$PWD python bench/tracker_overhead.py --epochs 5 --json tracker_overhead.json
    PYTHONPATH=$PWD python bench/tracker_overhead.py --epochs 1 --trackers none tensorboard --json /tmp/t.json  # smoke
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import harness  # bench/ is this script's folder, first on sys.path

from medseg.training.trainer import Trainer, TrainerCallback, default_callbacks
from tests.conftest import TINY_SPEC, tiny_config, write_phantom_dataset

TRACKER_SETS = {"none": [], "tensorboard": ["tensorboard"], "mlflow": ["mlflow"], "wandb": ["wandb"]}


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
    """One tiny fit with ``trackers`` into a new folder under ``out``; seconds in their hooks and of the whole fit."""
    out = Path(tempfile.mkdtemp(prefix=("_".join(trackers) or "none") + "_", dir=out))
    config = tiny_config(manifest, out, epochs=epochs, iterations_per_epoch=1,
                         choose_postprocessing=False, trackers=trackers)
    times: dict[str, list[float]] = {}
    plain = default_callbacks(config.model_copy(update={"train": config.train.model_copy(update={"trackers": []})}))
    tracked = [Timed(cb, times) for cb in default_callbacks(config)[len(plain):]]
    start = time.perf_counter()
    Trainer(config, "cpu", callbacks=plain + tracked).fit()
    return {"seconds": time.perf_counter() - start, "fit_start_s": sum(times.get("on_fit_start", [0.0])),
            "per_epoch_s": statistics.median(times["on_epoch_end"]) if "on_epoch_end" in times else 0.0,
            "fit_end_s": sum(times.get("on_fit_end", [0.0]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=harness.MIN_REPEATS)
    parser.add_argument("--trackers", nargs="+", choices=list(TRACKER_SETS), default=list(TRACKER_SETS))
    parser.add_argument("--json", type=Path, help="write the record here (a relative path goes under docs/benchmarks/)")
    args = parser.parse_args()
    os.environ.pop("WANDB_MODE", None)  # the default: offline
    with tempfile.TemporaryDirectory() as tmp:
        manifest = write_phantom_dataset(Path(tmp) / "phantoms", num_cases=6, seed=1, spec=TINY_SPEC)
        run(manifest, Path(tmp), [], 1)  # first-fit costs (imports, data cache) out of the figures
        measured = harness.run_interleaved(
            {name: (lambda r, t=TRACKER_SETS[name]: run(manifest, Path(tmp), t, args.epochs)) for name in args.trackers},
            args.repeats)
    data = harness.record("tracker_overhead", measured, epochs=args.epochs,
                          notes="seconds: the whole fit; fit_start_s, per_epoch_s (median over the epochs of one fit), "
                                "fit_end_s: inside the trackers' callback hooks")
    print(harness.conditions(data))
    print("| trackers | fit start (s) | per epoch (s) | fit end (s) | whole fit (s) |\n|---|---|---|---|---|")
    for name, v in measured["variants"].items():
        print(f"| {name} | {harness.cell(v['fit_start_s'], 4)} | {harness.cell(v['per_epoch_s'], 5)} | "
              f"{harness.cell(v['fit_end_s'], 4)} | {harness.cell(v['seconds'])} |")
    if args.json:
        print("written:", harness.write_record(data, args.json))


if __name__ == "__main__":
    main()
