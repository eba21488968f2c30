"""Distributed training on CPU (gloo, 2 processes under torchrun): one run folder, and the same losses,
validation and weights as one process with the same global batch; exact resume under DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from medseg.config import dump_config
from medseg.models.bundle import load_bundle
from medseg.training.sampling import epoch_draws, rank_keys, steps_per_epoch
from medseg.training.trainer import train
from tests.conftest import REPO_ROOT, tiny_config

# Losses of 2 processes vs 1 agree to float32 reduction order; measured 3e-8 relative on the phantoms.
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-5


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_the_ranks_split_each_global_batch_of_one_shared_order(world_size):
    num_cases, batch, steps = 5, 4, steps_per_epoch(5, 4, None)
    draws = epoch_draws(num_cases, batch, steps, epoch_seed=11)
    assert steps == 2 and len(draws) == 8 and set(draws[:5]) == set(range(5))  # a full pass first
    per_rank = [rank_keys(draws, num_cases, batch, r, world_size) for r in range(world_size)]
    single = rank_keys(draws, num_cases, batch, 0, 1)
    for step in range(steps):
        size = batch // world_size
        merged = [k for keys in per_rank for k in keys[step * size:(step + 1) * size]]
        assert merged == single[step * batch:(step + 1) * batch]
    assert epoch_draws(num_cases, batch, steps, 11) == draws != epoch_draws(num_cases, batch, steps, 12)


def _config_file(phantom_manifest, tmp_path, epochs):
    config = tiny_config(phantom_manifest, tmp_path / "unused", epochs=epochs, iterations_per_epoch=3)
    config.loss.batch_dice = False  # Dice per sample: the mean over ranks is the mean over the global batch
    path = tmp_path / f"tiny_{epochs}.yaml"
    path.write_text(dump_config(config))
    return config, path


def _torchrun(config_path, run_dir, *extra):
    cmd = [sys.executable, "-m", "medseg", "train", str(config_path), "--device", "cpu", "--output-dir", str(run_dir),
           "--nproc", "2", *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _same_run(a, b):
    ha, hb = (json.loads((r / "history.json").read_text()) for r in (a, b))
    assert [h["epoch"] for h in ha] == [h["epoch"] for h in hb]
    assert [h["loss"] for h in ha] == pytest.approx([h["loss"] for h in hb], rel=LOSS_RTOL)
    assert [h["val_dice"] for h in ha] == pytest.approx([h["val_dice"] for h in hb], rel=LOSS_RTOL, abs=1e-6)
    ba, bb = load_bundle(a / "last.pt"), load_bundle(b / "last.pt")
    # Convolution biases right before an instance norm get gradients that are pure rounding noise (the
    # norm cancels them), which AdamW turns into full-size random steps: they differ, without effect.
    # So: every other weight equal, and the networks' outputs equal.
    for key, w in ba.weights.items():
        if not key.endswith(".bias"):
            torch.testing.assert_close(w, bb.weights[key], atol=WEIGHT_ATOL, rtol=0, msg=key)
    x = torch.randn(2, 1, 32, 32, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ba.build_network()(x), bb.build_network()(x), atol=1e-4, rtol=1e-5)


@pytest.mark.slow
def test_two_gloo_processes_train_like_one_with_the_same_global_batch(phantom_manifest, tmp_path):
    config, path = _config_file(phantom_manifest, tmp_path, epochs=2)
    config.train.output_dir = tmp_path / "one"
    train(config, device="cpu")
    done = _torchrun(path, tmp_path / "two")
    assert "best checkpoint:" in done.stdout and done.stdout.count("best checkpoint:") == 1  # rank 0 reports
    run = tmp_path / "two"
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    assert len(list((run / "tensorboard").iterdir())) == 1  # one writer
    _same_run(tmp_path / "one", run)

    # Exact resume under DDP: 1 epoch, then resumed to 2, equals the straight 2-epoch run.
    _, one_epoch = _config_file(phantom_manifest, tmp_path, epochs=1)
    _torchrun(one_epoch, tmp_path / "resumed")
    _torchrun(path, tmp_path / "resumed", "--resume")
    _same_run(run, tmp_path / "resumed")


def test_a_global_batch_that_does_not_split_evenly_is_refused(phantom_manifest, tmp_path, monkeypatch):
    from medseg.errors import ConfigError
    from medseg.training import distributed

    config = tiny_config(phantom_manifest, tmp_path / "run", batch_size=3)
    monkeypatch.setattr(distributed, "init_distributed",
                        lambda device: distributed.DistributedContext(rank=0, world_size=2, device=device))
    monkeypatch.setattr("medseg.training.trainer.init_distributed", distributed.init_distributed)
    with pytest.raises(ConfigError, match="global batch and must divide evenly among 2 processes"):
        train(config, device="cpu")
