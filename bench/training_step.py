"""Benchmark: one training step of a planned network, three ways, interleaved (bench/harness.py).

The plain PyTorch way (default memory layout, eager), channels-last 3D (what the trainer does on CPU),
and channels-last plus ``torch.compile`` (``train.compile: true``). Forward, deep-supervised loss,
backward and an SGD step on random data of the config's batch shape. One repeat of a way builds the
network, takes two warm-up steps (the first one, compiling, is recorded as ``first_step_s``) and gives the
median of ``--steps`` timed steps; the ways run interleaved for ``--repeats`` rounds, each figure the
median (min-max) over the rounds. Prints the JSON record; ``--output`` also writes it (a relative path
goes under docs/benchmarks/).

    PYTHONPATH=$PWD python bench/training_step.py --config configs/mr_hippocampus.yaml --output training_step_hippocampus.json
    PYTHONPATH=$PWD python bench/training_step.py --smoke --output /tmp/training_step.json   # checks the script
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import harness  # bench/ is this script's folder, first on sys.path
import torch
from monai.losses import DeepSupervisionLoss, DiceCELoss

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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "mr_hippocampus.yaml")
    parser.add_argument("--classes", type=int, default=3, help="output classes incl. background")
    parser.add_argument("--steps", type=int, default=9, help="timed steps per repeat (after 2 warm-up steps)")
    parser.add_argument("--repeats", type=int, default=harness.MIN_REPEATS, help="interleaved rounds over the ways")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile way")
    parser.add_argument("--smoke", action="store_true",
                        help="a 16x16x16 patch, 1 step, no compile: checks the script, measures nothing")
    parser.add_argument("--output", type=Path, default=None,
                        help="write the record here (a relative path goes under docs/benchmarks/)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(args.config)
    if config.model.spatial_dims != 3:
        raise SystemExit("channels-last 3D applies to 3D networks; pick a 3D config")
    if args.smoke:
        args.steps, args.no_compile = 1, True
        config = config.model_copy(update={"train": config.train.model_copy(update={"patch_size": [16, 16, 16]})})
    ways = {
        "default layout, eager": (torch.contiguous_format, False),
        "channels-last 3D, eager (trainer on CPU)": (torch.channels_last_3d, False),
        "channels-last 3D, torch.compile": (torch.channels_last_3d, True),
    }
    if args.no_compile:
        ways.pop("channels-last 3D, torch.compile")

    def way(fmt: torch.memory_format, compiled: bool):
        def run(repeat: int) -> dict:
            r = time_steps(config, fmt, compiled, args.steps, args.classes)
            return {"seconds": r["seconds_per_step"], "first_step_s": r["first_step_s"]}
        return run

    measured = harness.run_interleaved({name: way(*w) for name, w in ways.items()}, args.repeats)
    speedups = {name: harness.ratio(measured, "default layout, eager", name) for name in ways}
    record = harness.record(
        "training_step", measured, config=str(args.config.name), device="cpu", smoke=args.smoke,
        batch=config.train.batch_size, patch_size=list(config.train.patch_size), steps_per_repeat=args.steps,
        speedup_vs_default=speedups,
        notes="seconds: per training step, the median of steps_per_repeat steps after 2 warm-up steps, one value "
              "per repeat; first_step_s: the first step of each repeat (compiling, for torch.compile)")
    print(json.dumps(record, indent=1))
    if args.output:
        print("written:", harness.write_record(record, args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
