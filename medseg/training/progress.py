"""Honest progress in plain logs: a start summary, the measured time per step and epoch, an ETA for the
run (epochs or time budget, whichever ends it first), a warning when the configured run would take more
than a day on this device, and whether a run folder's run already reached its end.

The first estimate comes after a few training steps (the first step, which pays for caches and
compilation, is not counted); the ETA is updated after every epoch from the measured epoch times,
validation included.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from medseg.config import ExperimentConfig
from medseg.training.loop import LoopState, TrainerCallback, TrainingRun
from medseg.training.sampling import steps_per_epoch

log = logging.getLogger("medseg.training.trainer")  # the same logger as the epoch lines

DAY_S = 24 * 3600.0
STEPS_FOR_ESTIMATE = 10
"""Steps after the first one timed for the early estimate (or fewer when they take over a minute)."""


def finished_reason(config: ExperimentConfig, state: LoopState) -> str | None:
    """Why a run with loop ``state`` is over under ``config`` (epochs done, early stopping, time budget
    spent), or None when it would train on."""
    train = config.train
    if state.epoch + 1 >= train.epochs:
        return f"train.epochs {train.epochs} reached"
    if train.early_stopping_patience is not None and state.since_best >= train.early_stopping_patience:
        return f"early stopping after {state.since_best} validations without improvement"
    if train.max_minutes is not None and state.elapsed_s >= 60 * train.max_minutes:
        return f"time budget of {train.max_minutes:g} min spent"
    return None


def format_duration(seconds: float) -> str:
    """``42 s``, ``3.5 min``, ``2 h 05 min``, ``3 d 4 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < DAY_S:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"
    return f"{int(seconds // DAY_S)} d {int(seconds % DAY_S // 3600)} h"


def start_summary(trainer: TrainingRun) -> str:
    """One line: what is trained on what, and how long an epoch is in steps."""
    c = trainer.config
    steps = steps_per_epoch(len(trainer.train_split), c.train.batch_size, c.train.iterations_per_epoch)
    where = str(trainer.device) + (f" x {trainer.dist.world_size} processes" if trainer.dist.enabled else "")
    budget = f", at most {c.train.max_minutes:g} min" if c.train.max_minutes else ""
    start = f", from {c.train.init_from}" if c.train.init_from is not None and trainer.state.epoch < 0 else ""
    return (f"training {c.name} ({c.model.name} {c.model.spatial_dims}D) on {where}: {len(trainer.train_split)} train / "
            f"{len(trainer.val_split)} val cases, patch {c.train.patch_size}, batch {c.train.batch_size}, "
            f"{steps} steps per epoch, {c.train.epochs} epochs{budget}{start}; run folder {trainer.run_dir}")


class ProgressCallback(TrainerCallback):
    """Start summary, measured step and epoch times, ETA and the more-than-a-day warning (rank 0 only)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.warned = False
        self.estimated = False
        self.first_step_t: float | None = None
        self.epoch_t = 0.0
        self.epoch_times: list[float] = []

    def on_fit_start(self, trainer: TrainingRun) -> None:
        log.info("%s", start_summary(trainer))
        self.epoch_t = self.clock()

    def _remaining(self, trainer: TrainingRun, per_epoch_s: float, epochs_left: int, elapsed_s: float) -> tuple[float, str]:
        """Seconds to the end of the run, and what ends it."""
        c = trainer.config.train
        by_epochs = per_epoch_s * epochs_left
        if c.max_minutes is not None and 60 * c.max_minutes - elapsed_s < by_epochs:
            return max(0.0, 60 * c.max_minutes - elapsed_s), f"time budget of {c.max_minutes:g} min"
        return by_epochs, f"epoch {c.epochs}"

    def _warn_if_long(self, trainer: TrainingRun, total_s: float, per_epoch_s: float, ends: str) -> None:
        if total_s > DAY_S and not self.warned:
            self.warned = True
            log.warning("the configured run would take about %s on %s (%s per epoch, until %s); lower train.epochs, "
                        "train.iterations_per_epoch or the patch size, or set train.max_minutes",
                        format_duration(total_s), trainer.device, format_duration(per_epoch_s), ends)

    def on_step_end(self, trainer: TrainingRun, epoch: int, step: int, steps: int) -> None:
        if self.estimated:
            return
        now = self.clock()
        if step == 1:
            self.first_step_t = now
            return
        assert self.first_step_t is not None
        timed = step - 1
        if timed < min(STEPS_FOR_ESTIMATE, steps - 1) and now - self.first_step_t < 60:
            return
        self.estimated = True
        per_step = (now - self.first_step_t) / timed
        per_epoch = per_step * steps
        elapsed = trainer.state.elapsed_s + now - self.epoch_t
        left, ends = self._remaining(trainer, per_epoch, trainer.config.train.epochs - epoch, elapsed)
        log.info("measured %.2f s/step over %d steps: about %s per epoch before validation; run ETA %s (until %s)",
                 per_step, timed, format_duration(per_epoch), format_duration(left), ends)
        self._warn_if_long(trainer, elapsed + left, per_epoch, ends)

    def on_epoch_end(self, trainer: TrainingRun, record: dict) -> None:
        now = self.clock()
        self.epoch_times.append(now - self.epoch_t)
        self.epoch_t = now
        recent = self.epoch_times[-5:]
        per_epoch = sum(recent) / len(recent)
        left, ends = self._remaining(trainer, per_epoch, trainer.config.train.epochs - record["epoch"], record["elapsed_s"])
        finish = (datetime.now(UTC) + timedelta(seconds=left)).strftime("%Y-%m-%d %H:%M UTC")
        log.info("epoch %d/%d took %s%s; ETA %s, about %s (until %s)", record["epoch"], trainer.config.train.epochs,
                 format_duration(self.epoch_times[-1]), " with validation" if "val_dice" in record else "",
                 format_duration(left), finish, ends)
        self._warn_if_long(trainer, record["elapsed_s"] + left, per_epoch, ends)

