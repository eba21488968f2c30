"""Benchmark: one training step of a planned network, three ways side by side in one run.

The plain PyTorch way (default memory layout, eager), channels-last 3D (what the trainer does on CPU),
and channels-last plus ``torch.compile`` (``train.compile: true``). Forward, deep-supervised loss,
backward and an SGD step on random data of the config's batch shape; median of ``--steps`` timed steps
after warm-up. Prints a JSON record; ``--output`` also writes it to a file.

    PYTHONPATH=$PWD python bench/training_step.py --config configs/mr_hippocampus.yaml

Run it on an idle machine: CPU PyTorch slows down several-fold when other jobs share the cores.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from monai.losses import DeepSupervisionLoss, DiceCELoss

from medseg.atomic import write_text_atomic
from medseg.config import load_config
from medseg.models import build_model

REPO = Path(__file__).resolve().parents[1]


def time_steps(config, fmt: torch.memory_format, compiled: bool, steps: int, num_classes: int) -> dict:
    """Seconds per training step (median) and the one-off cost of the first (compiling) step."""
    torch.manual_seed(0)
    model = build_model(config.model, 1, num_classes).to(memory_format=fmt)
    step_model = torch.compile(model) if compiled else model
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.99, nesterov=True)
    loss_fn = DeepSupervisionLoss(DiceCELoss(to_onehot_y=True, softmax=True, include_background=False))
    batch = config.train.batch_size * config.train.samples_per_volume
    x = torch.randn(batch, 1, *config.train.patch_size).contiguous(memory_format=fmt)
    y = torch.randint(0, num_classes, (batch, 1, *config.train.patch_size))
    times = []
    for _ in range(steps + 2):
        t = time.monotonic()
        out = step_model(x)
        out = list(torch.unbind(out, dim=1)) if out.ndim == x.ndim + 1 else out
        loss = loss_fn(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.monotonic() - t)
    steady = sorted(times[2:])
    return {"first_step_s": round(times[0], 2), "seconds_per_step": round(steady[len(steady) // 2], 4)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "mr_hippocampus.yaml")
    parser.add_argument("--classes", type=int, default=3, help="output classes incl. background")
    parser.add_argument("--steps", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(args.config)
    if config.model.spatial_dims != 3:
        raise SystemExit("channels-last 3D applies to 3D networks; pick a 3D config")
    ways = {
        "default layout, eager": (torch.contiguous_format, False),
        "channels-last 3D, eager (trainer on CPU)": (torch.channels_last_3d, False),
        "channels-last 3D, torch.compile": (torch.channels_last_3d, True),
    }
    results = {name: time_steps(config, fmt, comp, args.steps, args.classes) for name, (fmt, comp) in ways.items()}
    base = results["default layout, eager"]["seconds_per_step"]
    for r in results.values():
        r["speedup_vs_default"] = round(base / r["seconds_per_step"], 2)
    record = {
        "command": "PYTHONPATH=$PWD python bench/training_step.py " + " ".join(sys.argv[1:]),
        "config": str(args.config.name), "platform": platform.machine(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "device": "cpu", "batch": config.train.batch_size,
        "patch_size": list(config.train.patch_size), "results": results,
    }
    text = json.dumps(record, indent=1)
    print(text)
    if args.output:
        write_text_atomic(args.output, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
