"""The training loop's shared vocabulary, apart from the loop itself: its state (:class:`LoopState`), its
result (:class:`TrainResult`) and the callback protocol (:class:`TrainerCallback`) with the view of a run
a callback may read (:class:`TrainingRun`).

Callbacks (progress, trackers) import this module, not :mod:`medseg.training.trainer`, so the Trainer can
build its default callbacks without an import cycle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from medseg.config import ExperimentConfig


@dataclass
class TrainResult:
    """Where the run went and how good its best checkpoint is."""

    run_dir: Path
    best_checkpoint: Path
    best_dice: float
    best_epoch: int
    epochs_run: int
    history: list[dict] = field(default_factory=list)
    keep_largest_component: list[int] | None = None
    """Classes whose keep-largest-component postprocessing helped on validation (None: not evaluated)."""
    already_finished: bool = False
    """``--resume`` found the run finished and trained nothing."""


@dataclass
class LoopState:
    """Where the loop stands; stored in ``last.pt`` so ``--resume`` continues exactly."""

    epoch: int = -1
    """Index (0-based) of the last finished epoch; -1 before the first."""
    best_dice: float = -1.0
    best_epoch: int = -1
    since_best: int = 0
    elapsed_s: float = 0.0
    history: list[dict] = field(default_factory=list)

    def to_checkpoint(self) -> dict:
        return {"epoch": self.epoch, "best_dice": self.best_dice, "best_epoch": self.best_epoch,
                "since_best": self.since_best, "elapsed_s": self.elapsed_s, "history": self.history}

    @classmethod
    def from_checkpoint(cls, state: dict) -> LoopState:
        return cls(int(state["epoch"]), float(state["best_dice"]), int(state["best_epoch"]), int(state["since_best"]),
                   float(state["elapsed_s"]), list(state["history"]))


class TrainingRun(Protocol):
    """What a callback may read of the run (the :class:`~medseg.training.trainer.Trainer` is one)."""

    config: ExperimentConfig
    run_dir: Path
    state: LoopState
    device: Any
    dist: Any
    train_split: list
    val_split: list
    foreground_names: list[str]


class TrainerCallback:
    """Hooks into the loop (logging, trackers, distributed bookkeeping); every method is optional."""

    def on_fit_start(self, trainer: TrainingRun) -> None:
        """Model, data and run folder are ready; ``trainer.state`` holds a resumed run's state."""

    def on_step_end(self, trainer: TrainingRun, epoch: int, step: int, steps: int) -> None:
        """Training step ``step`` (1-based) of ``steps`` in epoch ``epoch`` (0-based) finished."""

    def on_epoch_end(self, trainer: TrainingRun, record: dict) -> None:
        """An epoch finished (and validated, when ``"val_dice"`` is in ``record``); checkpoints are written."""

    def on_fit_end(self, trainer: TrainingRun, result: TrainResult | None) -> None:
        """The loop ended (finished, early-stopped, out of time or interrupted: then ``result`` is None)."""
