"""Benchmark: the planned recipe (configs/mr_hippocampus.yaml) against a plain MONAI UNet baseline on
the MSD hippocampus set, each with the same wall-clock budget, in one run.

Both train on fold 0 of data_manifests/hippocampus.json (134 train / 34 val cases) and are tested on the
40 held-out test cases, on the scans' own grids (prediction inverts the preprocessing). Validation Dice
during training gives the Dice-vs-time curve. Writes, under ``--output``: ``hippocampus.json`` (all
figures) and ``hippocampus_dice_vs_time.png``; the run folders go under ``--runs``. With ``--docs`` it
also rewrites the hippocampus section of docs/benchmarks.md.

    PYTHONPATH=$PWD nohup python bench/hippocampus_train.py --minutes 20 --docs > bench_hippocampus.log 2>&1 &
    PYTHONPATH=$PWD nohup python bench/hippocampus_train.py --only planned > bench_hippocampus.log 2>&1 &

The planned run is the shipped config as `medseg train configs/mr_hippocampus.yaml` runs it: a CPU plan
trains for ``train.max_minutes`` (120) with the poly decay spread over that wall-clock budget
(``train.schedule_over: time``); ``--minutes`` sets both runs' budget instead. The record gives
the load average: CPU training speed depends on it.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import harness  # bench/ is this script's folder, first on sys.path
import nibabel as nib
import numpy as np
import torch
from docs_section import replace_section
from monai.metrics import compute_dice
from monai.networks.utils import one_hot
from training_step import time_steps  # bench/ is this script's folder, first on sys.path

from medseg.atomic import write_text_atomic
from medseg.config import ExperimentConfig, config_from_dict, load_config
from medseg.data.manifest import load_manifest
from medseg.inference.predictor import Predictor
from medseg.models import build_model
from medseg.models.registry import count_parameters
from medseg.training.trainer import step_memory_format, train

REPO = Path(__file__).resolve().parents[1]
NNUNET_REFERENCE = {"anterior": 0.90, "posterior": 0.89}
ITERATIONS_PER_EPOCH = 60
DOCS_BEGIN, DOCS_END = "<!-- hippocampus:begin -->", "<!-- hippocampus:end -->"
log = logging.getLogger("bench")


def baseline_config(manifest: Path, output_dir: Path, minutes: float) -> ExperimentConfig:
    """A plain MONAI UNet as a MONAI tutorial would set it up: channels 16..256, Adam 1e-4, flips only."""
    raw = {
        "name": "baseline_unet", "seed": 0,
        "data": {"manifest": str(manifest), "cache_rate": 1.0, "num_workers": 0},
        "model": {"name": "unet", "spatial_dims": 3, "channels": [16, 32, 64, 128, 256], "strides": [2, 2, 2, 2],
                  "num_res_units": 2, "norm": "instance", "deep_supervision": False},
        "preprocessing": {"orientation": "RAS", "spacing": [1.0, 1.0, 1.0], "intensity": {"kind": "zscore"}},
        "augmentation": {"flip_prob": 0.5, "noise_prob": 0.0, "intensity_shift_prob": 0.0},
        "loss": {"name": "dice_ce", "include_background": False},
        "optim": {"name": "adam", "lr": 1e-4, "weight_decay": 0.0, "schedule": "constant"},
        # 4 strided levels need sides divisible by 16: the smallest such patch covering a median case.
        "train": {"epochs": 100_000, "iterations_per_epoch": ITERATIONS_PER_EPOCH, "patch_size": [48, 64, 48],
                  "batch_size": 2, "samples_per_volume": 2, "foreground_fraction": 0.5, "val_interval": 1,
                  "device": "cpu", "output_dir": str(output_dir), "max_minutes": minutes,
                  "choose_postprocessing": False},
        "infer": {"sw_batch_size": 4, "overlap": 0.5, "mode": "gaussian"},
    }
    return config_from_dict(raw, "baseline config")


def seconds_per_step(config: ExperimentConfig, num_classes: int, steps: int = 3) -> float:
    """Median wall time (s) of a CPU training step of ``config``'s network, in the trainer's memory layout."""
    fmt = step_memory_format(config, torch.device("cpu")) or torch.contiguous_format
    return time_steps(config, fmt, compiled=False, steps=steps, num_classes=num_classes)["seconds_per_step"]


def test_dice(run_dir: Path, manifest_path: Path, mirror: bool | None) -> dict:
    """Dice per class on the held-out test cases, on each scan's own grid; mean, sd and seconds per case."""
    manifest = load_manifest(manifest_path)
    predictor = Predictor.from_checkpoint(run_dir, "cpu", mirror=mirror)
    num_classes = manifest.num_classes
    per_case, t0 = [], time.monotonic()
    for case in manifest.split("test"):
        label = np.asarray(nib.load(manifest.label_path(case)).dataobj).astype(np.int64)
        pred = np.asarray(predictor.predict_scan(manifest.image_path(case)).dataobj).astype(np.int64)
        y_pred = one_hot(torch.as_tensor(pred)[None, None], num_classes)
        y = one_hot(torch.as_tensor(label)[None, None], num_classes)
        per_case.append(compute_dice(y_pred, y, include_background=False)[0].tolist())
    seconds = (time.monotonic() - t0) / max(1, len(per_case))
    arr = np.array(per_case)
    names = [manifest.labels[k] for k in range(1, num_classes)]
    return {
        "cases": len(per_case), "seconds_per_case": round(seconds, 3),
        "keep_largest_component": predictor.settings.keep_largest_component,
        "mirror_axes": predictor.mirror_axes,
        "dice_mean": {n: round(float(np.nanmean(arr[:, i])), 4) for i, n in enumerate(names)},
        "dice_sd": {n: round(float(np.nanstd(arr[:, i])), 4) for i, n in enumerate(names)},
        "dice_mean_of_classes": round(float(np.nanmean(arr)), 4),
    }


def run_one(label: str, config: ExperimentConfig, manifest_path: Path) -> dict:
    """Train one config within its budget; its curve, timing and test Dice (with and without mirroring)."""
    manifest = load_manifest(manifest_path)
    t0 = time.monotonic()
    result = train(config, device="cpu")
    train_s = time.monotonic() - t0
    history = result.history
    curve = [{"minutes": round(h["elapsed_s"] / 60, 3), "epoch": h["epoch"], "val_dice": round(h["val_dice"], 4),
              **{k: round(v, 4) for k, v in h.items() if k.startswith("val_dice_")}} for h in history if "val_dice" in h]
    out = {
        "label": label, "config": config.model_dump(mode="json"),
        "parameters": count_parameters(build_model(config.model, 1, manifest.num_classes)),
        "train_wall_s": round(train_s, 1), "epochs": result.epochs_run,
        "iterations": result.epochs_run * (config.train.iterations_per_epoch or 0),
        "best_val_dice": round(result.best_dice, 4), "best_epoch": result.best_epoch,
        "postprocessing": result.keep_largest_component, "curve": curve,
        "test": test_dice(result.run_dir, manifest_path, mirror=False),
    }
    if label == "planned":
        out["test_mirrored"] = test_dice(result.run_dir, manifest_path, mirror=True)
    log.info("%s: %s", label, json.dumps(out["test"]))
    return out


def plot(results: dict, path: Path) -> None:
    """Validation mean Dice against training minutes for both runs, with nnU-Net's reported level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for run in results["runs"]:
        pts = run["curve"]
        ax.plot([p["minutes"] for p in pts], [p["val_dice"] for p in pts], marker=".", label=run["label"])
    ax.axhline(float(np.mean(list(NNUNET_REFERENCE.values()))), ls="--", c="gray", label="nnU-Net (reported, full training)")
    ax.set_xlabel("training wall time on a shared 2-core CPU (min)")
    ax.set_ylabel("validation Dice (mean of anterior, posterior)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title("MSD Task04 hippocampus, fold 0")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def docs_section(results: dict, png: Path, json_path: Path) -> str:
    """Markdown for docs/benchmarks.md (``png``/``json_path`` relative to it)."""
    runs = {r["label"]: r for r in results["runs"]}
    lines: list[str | None] = [
        DOCS_BEGIN,
        "## Hippocampus (MSD Task04): planned recipe vs a plain MONAI UNet",
        "",
        f"Run on {results['date']} with `{results['command']}` ({results['platform']}, torch "
        f"{results['torch']}, {results['threads']} threads). Machine: {results['machine']}; load average "
        f"{results.get('load_average_before', 'not recorded')} at the start.",
        "",
        f"Data: fold 0 of `data_manifests/hippocampus.json` ({results['train_cases']} train / "
        f"{results['val_cases']} validation cases); test: {results['test_cases']} held-out cases in no fold, "
        "Dice on each scan's own grid. Budget: "
        f"{results['minutes_each']:g} min of training each (then postprocessing choice and testing).",
        "",
        "| | planned (DynUNet, deep sup., SGD poly) | baseline (MONAI UNet, Adam 1e-4) | nnU-Net (reported; 5-fold CV, other cases: not like for like) |",
        "|---|---|---|---|",
    ]
    p, b = runs.get("planned"), runs.get("baseline")

    def cell(run: dict | None, key: str, fmt: str = "{}") -> str:
        return fmt.format(run[key]) if run else "—"

    for cls in ("anterior", "posterior"):
        lines.append(f"| test Dice {cls} (mean ± sd) | "
                     + " | ".join(f"{r['test']['dice_mean'][cls]:.3f} ± {r['test']['dice_sd'][cls]:.3f}" if r else "—"
                                  for r in (p, b))
                     + f" | {NNUNET_REFERENCE[cls]:.2f} |")
    if p and "test_mirrored" in p:
        m = p["test_mirrored"]
        lines.append(f"| test Dice with test-time mirroring (ant. / post.) | {m['dice_mean']['anterior']:.3f} / "
                     f"{m['dice_mean']['posterior']:.3f} | — | |")
    lines += [
        f"| best validation Dice (mean) | {cell(p, 'best_val_dice', '{:.3f}')} | {cell(b, 'best_val_dice', '{:.3f}')} | |",
        f"| training wall time (min) | {p['train_wall_s'] / 60:.1f} | {b['train_wall_s'] / 60:.1f} | |" if p and b else None,
        f"| epochs x iterations | {p['epochs']} x {p['config']['train']['iterations_per_epoch']} | "
        f"{b['epochs']} x {b['config']['train']['iterations_per_epoch']} | 1000 x 250 |"
        if p and b else None,
        f"| parameters | {cell(p, 'parameters', '{:,}')} | {cell(b, 'parameters', '{:,}')} | |",
        f"| test prediction (s/case) | {p['test']['seconds_per_case']:.2f} | {b['test']['seconds_per_case']:.2f} | |"
        if p and b else None,
        f"| keep-largest-component chosen for classes | {cell(p, 'postprocessing')} | not evaluated | |",
        "",
    ]
    if p and b:
        ratio = p["test"]["dice_mean_of_classes"] / max(1e-9, b["test"]["dice_mean_of_classes"])
        lines.append(f"Mean test Dice ratio planned / baseline: **{ratio:.2f}** in the same budget. Not like for like, "
                     "for orientation only: nnU-Net's reported 0.895 mean is a 5-fold cross-validation on the training "
                     "cases, ours the 40 held-out test cases; the ratio of ours to it: planned {p['test']['dice_mean_of_classes'] / 0.895:.2f}, "
                     f"baseline {b['test']['dice_mean_of_classes'] / 0.895:.2f} (nnU-Net trains 1000 x 250 "
                     "iterations of batch 9 on a GPU, figures from 5-fold cross-validation; these runs get minutes on a CPU).")
    lines += ["", f"![Dice vs time]({png.as_posix()})", "",
              f"All figures: [`{json_path.as_posix()}`]({json_path.as_posix()}).", "",
              "Data attribution: MSD Task04 Hippocampus, CC BY-SA 4.0. Antonelli et al., \"The Medical "
              "Segmentation Decathlon\", Nature Communications 13, 4128 (2022); Simpson et al., "
              "arXiv:1902.09063 (2019).",
              DOCS_END]
    return "\n".join(line for line in lines if line is not None) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "mr_hippocampus.yaml")
    parser.add_argument("--minutes", type=float, default=None,
                        help="training budget of each run (min); default the config's train.max_minutes")
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "benchmarks")
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "bench_hippocampus")
    parser.add_argument("--only", choices=["planned", "baseline"], default=None)
    parser.add_argument("--docs", action="store_true", help="rewrite the section in docs/benchmarks.md")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the planned run's network (about 1 min); default the config's")
    parser.add_argument("--val-interval", type=int, default=None, help="validate every N epochs; default the config's")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.set_num_threads(2)

    planned = load_config(args.config)
    manifest_path = planned.data.manifest
    manifest = load_manifest(manifest_path)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    # The planned config as `medseg train` runs it; only the run folder, the device and the options given
    # here change. A CPU plan already trains for a wall-clock budget with the poly decay spread over it.
    planned.train.output_dir = args.runs / f"planned-{stamp}"
    planned.train.device = "cpu"
    args.minutes = args.minutes or planned.train.max_minutes or 120.0
    planned.train.max_minutes = args.minutes
    planned.train.schedule_over = "time"
    planned.train.epochs = 100_000  # the budget ends the run
    if args.val_interval is not None:
        planned.train.val_interval = args.val_interval
    if args.compile is not None:
        planned.train.compile = args.compile
    step_s = seconds_per_step(planned, manifest.num_classes)
    log.info("planned: %.2f s/step measured before training (machine shared: indicative only)", step_s)
    baseline = baseline_config(manifest_path, args.runs / f"baseline-{stamp}", args.minutes)

    runs = []
    for label, config in (("planned", planned), ("baseline", baseline)):
        if args.only in (None, label):
            runs.append(run_one(label, config, manifest_path))
    command = "PYTHONPATH=$PWD python " + " ".join(shlex.quote(a) for a in ["bench/hippocampus_train.py", *sys.argv[1:]])
    results = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"), "command": command,
        "platform": f"{platform.machine()} {platform.processor() or ''}".strip(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "machine": harness.describe_machine(), "load_average_before": harness.load_average(), "minutes_each": args.minutes, "planned_seconds_per_step": step_s,
        "train_cases": len(manifest.split("train")), "val_cases": len(manifest.split("val")),
        "test_cases": len(manifest.split("test")), "nnunet_reference": NNUNET_REFERENCE, "runs": runs,
    }
    args.output.mkdir(parents=True, exist_ok=True)
    json_path = write_text_atomic(args.output / "hippocampus.json", json.dumps(results, indent=1))
    png = args.output / "hippocampus_dice_vs_time.png"
    plot(results, png)
    print(json.dumps({r["label"]: r["test"] for r in runs}, indent=1))
    if args.docs:
        docs = REPO / "docs" / "benchmarks.md"
        replace_section(docs, docs_section(results, png.relative_to(docs.parent), json_path.relative_to(docs.parent)),
                        DOCS_BEGIN, DOCS_END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
