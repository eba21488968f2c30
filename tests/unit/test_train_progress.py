"""Honest progress: a start summary, measured step/epoch times and an ETA in plain logs, a warning when
the run would take more than a day, and ``--resume`` on a finished run trains nothing and says so."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest

from medseg.training.progress import ProgressCallback, format_duration
from medseg.training.trainer import LoopState, train
from tests.conftest import tiny_config


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def logged_run(phantom_manifest, tmp_path_factory):
    """A 2-epoch tiny run, its config and what it logged (shared: training is the slow part)."""
    config = tiny_config(phantom_manifest, tmp_path_factory.mktemp("progress") / "run", epochs=2,
                         iterations_per_epoch=2, choose_postprocessing=False)
    handler, logger = _Records(), logging.getLogger("medseg")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        result = train(config, device="cpu")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return config, result, handler.records


def test_start_summary_epoch_time_and_eta_are_logged(logged_run):
    _, _, records = logged_run
    text = "\n".join(r.getMessage() for r in records)
    assert "training tiny3d (unet 3D) on cpu: 3 train / 1 val cases, patch [32, 32, 16], batch 2, " \
           "2 steps per epoch, 2 epochs" in text
    assert "s/step over 1 steps" in text and "run ETA" in text
    assert "epoch 1/2 took" in text and "epoch 2/2 took" in text and "(until epoch 2)" in text
    assert not [r for r in records if r.levelno >= logging.WARNING and "would take" in r.getMessage()]


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _fake_trainer(epochs: int, max_minutes: float | None = None):
    train_cfg = SimpleNamespace(epochs=epochs, max_minutes=max_minutes)
    return SimpleNamespace(config=SimpleNamespace(train=train_cfg), state=LoopState(), device="cpu")


def test_a_run_longer_than_a_day_is_warned_about_after_the_first_steps(caplog):
    clock = _Clock()
    progress, trainer = ProgressCallback(clock), _fake_trainer(epochs=300)
    progress.epoch_t = clock()
    with caplog.at_level(logging.INFO):
        for step in range(1, 12):  # 3 s per step, 220 steps an epoch: 11 min per epoch, 300 epochs
            clock.t += 3.0
            progress.on_step_end(trainer, epoch=0, step=step, steps=220)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "would take about 2 d 7 h" in warnings[0] and "11.0 min per epoch" in warnings[0]
    assert "3.00 s/step over 10 steps" in caplog.text


def test_a_time_budget_caps_the_eta_and_silences_the_warning(caplog):
    clock = _Clock()
    progress, trainer = ProgressCallback(clock), _fake_trainer(epochs=300, max_minutes=120)
    with caplog.at_level(logging.INFO):
        clock.t = 660.0
        progress.on_epoch_end(trainer, {"epoch": 1, "elapsed_s": 600.0})
    assert "ETA 1 h 50 min" in caplog.text and "until time budget of 120 min" in caplog.text
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


@pytest.mark.parametrize(("seconds", "text"), [(42, "42 s"), (210, "3.5 min"), (7500, "2 h 05 min"),
                                               (3 * 86400 + 4 * 3600, "3 d 4 h")])
def test_durations_read_plainly(seconds, text):
    assert format_duration(seconds) == text


def test_resume_on_a_finished_run_trains_nothing_and_says_so(logged_run, caplog):
    config, first, _ = logged_run
    run = config.train.output_dir
    before = (run / "last.pt").stat().st_mtime_ns
    with caplog.at_level(logging.INFO):
        again = train(config, resume=True, device="cpu")
    assert "already finished (2 epochs, train.epochs 2 reached), nothing to do" in caplog.text
    assert "resuming" not in caplog.text and "training tiny3d" not in caplog.text
    assert again.already_finished and again.epochs_run == 2 and again.best_dice == pytest.approx(first.best_dice)
    assert again.best_checkpoint == run / "best.pt"
    assert (run / "last.pt").stat().st_mtime_ns == before
    assert len(json.loads((run / "history.json").read_text())) == 2
