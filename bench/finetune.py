"""Benchmark: fine-tuning (``train.init_from``) against training from scratch on a small subset of the MSD
hippocampus set, with the same wall-clock budget each, in one run.

1. A source model trained on cases outside the small subset: trained here on the train cases outside
   the subset (``--source-minutes``), or an existing run trained on the train split (``--source-run``;
   the subset is then drawn from the val split, which that run never trained on).
2. On the small subset (``--subset`` cases, drawn with a fixed seed) two runs get the same budget
   (``--minutes``): from scratch, and fine-tuned from the source (its weights, encoder frozen for the
   first epochs, a learning-rate warm-up). They train at the same time (two processes), so both see the
   same load.
3. All three are tested on the held-out test cases (no fold holds them), Dice on each scan's own grid.

Both small-subset runs validate on the same few validation cases outside the subset (the curves).
The recipe is configs/mr_hippocampus.yaml's network and preprocessing with Adam and light augmentation
(``--recipe fast``, which learns within minutes; ``--recipe shipped`` keeps the config as it is),
budgeted by time, eager (no compile). Writes,
under ``--output``, ``finetune.json`` (all figures) and ``finetune_curves.png``; run folders go under
``--runs``.

    PYTHONPATH=$PWD nice python bench/finetune.py --source-run runs/mr_hippocampus --minutes 10 > bench_finetune.log 2>&1 &
    PYTHONPATH=$PWD nice python bench/finetune.py --source-minutes 14 --minutes 10 > bench_finetune.log 2>&1 &

Wall time depends on the machine's load (recorded before and after): the steps each run managed are
recorded beside it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import platform
import random
import shlex
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import harness  # bench/ is this script's folder, first on sys.path
import nibabel as nib
import numpy as np
import torch
from docs_section import replace_section  # bench/ is this script's folder, first on sys.path
from monai.metrics import compute_dice
from monai.networks.utils import one_hot

from medseg.atomic import write_text_atomic
from medseg.config import ExperimentConfig, load_config, with_overrides
from medseg.data.manifest import load_manifest, save_manifest
from medseg.inference.predictor import Predictor
from medseg.models.bundle import load_bundle
from medseg.training.trainer import train

REPO = Path(__file__).resolve().parents[1]
ITERATIONS_PER_EPOCH = 15
log = logging.getLogger("bench")


def test_dice(run_dir: Path, manifest_path: Path) -> dict:
    """Dice per class on the manifest's test cases, on each scan's own grid (prediction inverts the
    preprocessing): mean, sd, and the mean of the classes."""
    manifest = load_manifest(manifest_path)
    predictor = Predictor.from_checkpoint(run_dir, "cpu")
    num_classes, rows = manifest.num_classes, []
    for case in manifest.split("test"):
        label = np.asarray(nib.load(manifest.label_path(case)).dataobj).astype(np.int64)
        pred = np.asarray(predictor.predict_scan(manifest.image_path(case)).dataobj).astype(np.int64)
        rows.append(compute_dice(one_hot(torch.as_tensor(pred)[None, None], num_classes),
                                 one_hot(torch.as_tensor(label)[None, None], num_classes),
                                 include_background=False)[0].tolist())
    arr = np.array(rows)
    names = [manifest.labels[k] for k in range(1, num_classes)]
    return {"cases": len(rows),
            "dice_mean": {n: round(float(np.nanmean(arr[:, i])), 4) for i, n in enumerate(names)},
            "dice_sd": {n: round(float(np.nanstd(arr[:, i])), 4) for i, n in enumerate(names)},
            "dice_mean_of_classes": round(float(np.nanmean(arr)), 4)}


def write_manifests(source: Path, folder: Path, subset: int, val: int, test: int | None, seed: int,
                    subset_from: str) -> dict[str, Path]:
    """Manifests (absolute case paths) for the source run, the small-subset runs and scoring the source on
    the validation cases. The small subset is drawn from ``subset_from`` ("train": the source trains on the
    other train cases; "val": an existing source run trained on the train split) and never seen by the
    source in training; validation uses ``val`` other validation cases, test the original test split."""
    m = load_manifest(source)
    cases = [c.model_copy(update={"image": str(m.image_path(c)),
                                  "label": str(m.label_path(c)) if c.label else None}) for c in m.cases]
    pool = list(m.splits[subset_from])
    random.Random(seed).shuffle(pool)
    small = sorted(pool[:subset])
    rest = sorted(pool[subset:]) if subset_from == "train" else list(m.splits["train"])
    val_ids = [c for c in m.splits["val"] if c not in small][:val]
    test_ids = list(m.splits["test"])[:test]
    out = {}
    for name, splits in (("source", {"train": rest, "val": val_ids, "test": test_ids}),
                         ("subset", {"train": small, "val": val_ids, "test": test_ids}),
                         ("source_on_val", {"train": rest, "val": val_ids, "test": val_ids})):
        manifest = m.model_copy(update={"cases": cases, "folds": [], "allow_paths_outside_root": True, "splits": splits})
        out[name] = save_manifest(manifest, folder / f"hippocampus_{name}.json")
    return out


def check_source_run(run: Path, manifest: Path) -> None:
    """An existing source run must have trained on the plain train split of ``manifest`` (so not on the
    subset drawn from its val split)."""
    prov = load_bundle(run).spec.provenance.data
    digest = hashlib.sha256(manifest.read_bytes()).hexdigest()
    if prov.manifest_sha256 != digest or prov.fold is not None:
        raise SystemExit(f"{run}: not trained on the train split of {manifest} (manifest or fold differ)")


# A recipe that learns within minutes on a CPU: the shipped plan's network at half the width, without
# deep supervision, on a smaller patch, Adam at a constant 1e-3 and light augmentation (the shipped SGD/poly recipe with nnU-Net's augmentation
# needs several hundred steps before its Dice leaves 0, see the hippocampus section of benchmarks.md).
FAST = {
    "model": {"deep_supervision": False, "channels": [8, 16, 32, 64]},
    "train": {"patch_size": [32, 48, 32]},
    "optim": {"name": "adam", "lr": 1e-3, "weight_decay": 1e-5, "schedule": "constant"},
    "augmentation": {"flip_prob": 0.5, "rotate_prob": 0.0, "scale_prob": 0.0, "noise_prob": 0.1, "blur_prob": 0.0,
                     "contrast_prob": 0.0, "gamma_prob": 0.0, "low_resolution_prob": 0.0},
}


def run_config(base: ExperimentConfig, name: str, manifest: Path, output_dir: Path, minutes: float,
               iterations: int, **train: object) -> ExperimentConfig:
    """The recipe (``base``), budgeted by wall time, eager (no compile: its minute of compiling would eat
    into short budgets unevenly), validating every 2 short epochs."""
    optim = train.pop("optim", {})
    return with_overrides(base, {
        "name": name, "data": {"manifest": str(manifest), "fold": None},
        "optim": optim,
        "train": {"epochs": 100_000, "iterations_per_epoch": iterations, "max_minutes": minutes,
                  "schedule_over": "time", "compile": False, "device": "cpu", "val_interval": 2,
                  "choose_postprocessing": False, "output_dir": str(output_dir), **train},
    })


def summarise(label: str, config: ExperimentConfig, result, manifest: Path, wall_s: float) -> dict:
    curve = [{"minutes": round(h["elapsed_s"] / 60, 3), "epoch": h["epoch"], "val_dice": round(h["val_dice"], 4)}
             for h in result.history if "val_dice" in h]
    losses = [{"minutes": round(h["elapsed_s"] / 60, 3), "loss": round(h["loss"], 4)} for h in result.history]
    out = {"label": label, "train_cases": len(load_manifest(manifest).split("train")),
           "train_wall_s": round(wall_s, 1), "epochs": result.epochs_run,
           "steps": result.epochs_run * (config.train.iterations_per_epoch or 0), "best_val_dice": round(result.best_dice, 4),
           "best_epoch": result.best_epoch, "curve": curve, "loss_curve": losses,
           "optim": config.optim.model_dump(mode="json"),
           "init_from": str(config.train.init_from) if config.train.init_from else None,
           "freeze_encoder_epochs": config.train.freeze_encoder_epochs,
           "test": test_dice(result.run_dir, manifest)}
    log.info("%s: %s", label, json.dumps(out["test"]))
    return out


def plot(results: dict, path: Path) -> None:
    """Validation Dice and training loss against training minutes for scratch and fine-tuning."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {r["label"]: r for r in results["runs"]}
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label in ("scratch", "finetune"):
        r = runs[label]
        pts = r["curve"]
        xs, ys = [p["minutes"] for p in pts], [p["val_dice"] for p in pts]
        if label == "finetune":  # the starting point: the source model on the same validation cases
            xs, ys = [0.0, *xs], [runs["source"]["best_val_dice"], *ys]
        ax.plot(xs, ys, marker=".", label=f"{label} ({r['train_cases']} cases)")
        bx.plot([p["minutes"] for p in r["loss_curve"]], [p["loss"] for p in r["loss_curve"]], marker=".", label=label)
    ax.axhline(runs["source"]["best_val_dice"], ls="--", c="gray",
               label=f"source model ({runs['source']['train_cases']} other cases)")
    ax.set_xlabel("training wall time on a shared 2-core CPU (min)")
    ax.set_ylabel("validation Dice (mean of anterior, posterior)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    ax.set_title(f"{results['subset']} training cases, same budget")
    bx.set_xlabel("training wall time (min)")
    bx.set_ylabel("training loss (Dice + CE" + (", deep supervision)" if results.get("recipe") == "shipped" else ")"))
    bx.grid(alpha=0.3)
    bx.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


DOCS_BEGIN, DOCS_END = "<!-- finetune:begin -->", "<!-- finetune:end -->"


def docs_section(results: dict) -> str:
    """Markdown for docs/benchmarks.md from ``finetune.json``'s figures."""
    runs = {r["label"]: r for r in results["runs"]}
    src, sc, ft = runs["source"], runs["scratch"], runs["finetune"]

    def dice(r: dict, cls: str) -> str:
        return f"{r['test']['dice_mean'][cls]:.3f} ± {r['test']['dice_sd'][cls]:.3f}"

    def first(r: dict) -> str:
        p = r["curve"][0] if r["curve"] else None
        return f"{p['val_dice']:.3f} after {p['minutes']:.1f} min" if p else "—"

    ratio = ft["test"]["dice_mean_of_classes"] / max(1e-9, sc["test"]["dice_mean_of_classes"])
    source_how = (f"trained here for {results['source_minutes']:g} min on the {src['train_cases']} train cases "
                  "outside the subset" if results["subset_from"] == "train" else
                  f"the existing run `{src.get('run')}` ({src['train_cases']} train cases; the subset comes "
                  "from the val split, which it never trained on)")
    lines = [
        DOCS_BEGIN,
        "## Fine-tuning vs training from scratch (hippocampus)",
        "",
        f"Run on {results['date']} with `{results['command']}` ({results['platform']}, torch {results['torch']}, "
        f"{results['threads']} threads). Machine: {results['machine']}; load average "
        f"{results.get('load_average_before', 'not recorded')} at the start. Steps per run are listed beside the "
        "wall time (the load may change during a run).",
        "",
        f"Data: MSD Task04 hippocampus (`data_manifests/hippocampus.json`). Small subset: {results['subset']} "
        f"cases drawn with a fixed seed from the {results['subset_from']} split. Source model: {source_how}. "
        f"Both subset runs validate on the same {results['val_cases']} validation cases outside the subset and "
        f"are tested on the {ft['test']['cases']} held-out test cases (Dice on each scan's own grid). Recipe "
        f"`{results['recipe']}`: configs/mr_hippocampus.yaml's DynUNet and preprocessing"
        + (" at half width (8-64 channels), no deep supervision, patch [32, 48, 32], Adam 1e-3 constant, flips "
           "and noise only" if results["recipe"] == "fast" else "")
        + f". Budget: {results['minutes_each']:g} min of training each, the two runs side by side "
        "(same load). Fine-tuning: `train.init_from` the source run, "
        f"`optim.lr` {ft['optim']['lr']:g}, `optim.warmup_epochs` {ft['optim']['warmup_epochs']}, "
        f"`train.freeze_encoder_epochs` {ft['freeze_encoder_epochs']} (epochs of {results['iterations_per_epoch']} steps).",
        "",
        "| | scratch | fine-tuned | source model |",
        "|---|---|---|---|",
        f"| training cases | {sc['train_cases']} | {ft['train_cases']} | {src['train_cases']} (other cases) |",
        *(f"| test Dice {cls} (mean ± sd) | {dice(sc, cls)} | {dice(ft, cls)} | {dice(src, cls)} |"
          for cls in ("anterior", "posterior")),
        f"| test Dice, mean of classes | {sc['test']['dice_mean_of_classes']:.3f} | "
        f"{ft['test']['dice_mean_of_classes']:.3f} | {src['test']['dice_mean_of_classes']:.3f} |",
        f"| best validation Dice | {sc['best_val_dice']:.3f} | {ft['best_val_dice']:.3f} | {src['best_val_dice']:.3f} |",
        f"| first validation Dice | {first(sc)} | {first(ft)} | |",
        f"| training wall time (min) | {sc['train_wall_s'] / 60:.1f} | {ft['train_wall_s'] / 60:.1f} | "
        f"{src['train_wall_s'] / 60:.1f} |",
        f"| steps of batch 2 | {sc['steps']} | {ft['steps']} | {src['steps']} |",
        "",
        f"Mean test Dice ratio fine-tuned / scratch: **{ratio:.2f}** in the same budget on {results['subset']} cases.",
        "Wall time includes caching, validation and the last epoch's overrun of the budget (not testing).",
        f"The fine-tuned model has taken {src['steps'] + ft['steps']} steps in all ({src['steps']} of them on other "
        "cases before this budget): fine-tuning buys the source's training, which is the point of it; scratch "
        f"starts from nothing. All three are far from converged (nnU-Net reports 0.90 / 0.89): the machine ran "
        f"at about {sc['train_wall_s'] / max(1, sc['steps']):.0f} s per step (two runs side by side, niced), "
        "so a budget of minutes is a few dozen steps. One run each, one seed: the ratio is indicative, the levels are not what longer training reaches.",
        "",
        "![validation Dice and training loss against minutes](benchmarks/finetune_curves.png)",
        "",
        "The fine-tuned curve starts (minute 0) at the source model's validation Dice on the same cases.",
        "",
        "Figures: [benchmarks/finetune.json](benchmarks/finetune.json).",
        DOCS_END,
    ]
    return "\n".join(lines) + "\n"


def configs_for(args: argparse.Namespace, manifests: dict[str, Path]) -> dict[str, ExperimentConfig]:
    base, it = load_config(args.config), args.iterations
    if args.recipe == "fast":
        base = with_overrides(base, FAST)
    return {
        "source": run_config(base, "hippo_source", manifests["source"], source_dir(args), args.source_minutes, it),
        "scratch": run_config(base, "hippo_scratch", manifests["subset"], args.runs / "scratch", args.minutes, it),
        "finetune": run_config(base, "hippo_finetune", manifests["subset"], args.runs / "finetune", args.minutes, it,
                               init_from=str(source_dir(args)), freeze_encoder_epochs=args.freeze_epochs,
                               optim={"lr": args.finetune_lr, "warmup_epochs": args.warmup_epochs}),
    }


def source_dir(args: argparse.Namespace) -> Path:
    return args.source_run or args.runs / "source"


def source_summary(args: argparse.Namespace, manifests: dict[str, Path]) -> dict:
    """The existing source run: what it trained on, for how long, and its Dice on the validation and test cases."""
    run = source_dir(args)
    history = json.loads((run / "history.json").read_text())
    bundle = load_bundle(run)
    on_val = test_dice(run, manifests["source_on_val"])
    return {"label": "source", "run": str(run), "train_cases": bundle.spec.provenance.data.train_cases,
            "train_wall_s": round(history[-1]["elapsed_s"], 1), "epochs": len(history),
            "steps": len(history) * (bundle.config.train.iterations_per_epoch or 0),
            "best_val_dice": on_val["dice_mean_of_classes"], "val_dice_note": "on this benchmark's validation cases",
            "curve": [], "loss_curve": [], "test": test_dice(run, manifests["source"])}


def run_one(label: str, args: argparse.Namespace, manifests: dict[str, Path]) -> dict:
    """Train and test one of the three runs; its summary is also written to ``<runs>/<label>.json``."""
    config = configs_for(args, manifests)[label]
    manifest = manifests["source" if label == "source" else "subset"]
    t0 = time.monotonic()
    result = train(config, device="cpu")
    out = summarise(label, config, result, manifest, time.monotonic() - t0)
    write_text_atomic(args.runs / f"{label}.json", json.dumps(out, indent=1))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "mr_hippocampus.yaml")
    parser.add_argument("--manifest", type=Path, default=REPO / "data_manifests" / "hippocampus.json")
    parser.add_argument("--subset", type=int, default=10, help="training cases of the small subset")
    parser.add_argument("--val", type=int, default=8, help="validation cases (the curve)")
    parser.add_argument("--source-minutes", type=float, default=14.0)
    parser.add_argument("--minutes", type=float, default=10.0, help="budget of each small-subset run")
    parser.add_argument("--iterations", type=int, default=ITERATIONS_PER_EPOCH, help="steps per (short) epoch")
    parser.add_argument("--recipe", choices=["fast", "shipped"], default="fast",
                        help="fast: Adam 1e-3, light augmentation (see FAST); shipped: --config as it is")
    parser.add_argument("--finetune-lr", type=float, default=5e-4)
    parser.add_argument("--freeze-epochs", type=int, default=1)
    parser.add_argument("--warmup-epochs", type=int, default=1)
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "bench_finetune")
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "benchmarks")
    parser.add_argument("--source-run", type=Path, help="an existing run trained on the train split (then the "
                        "subset comes from the val split and no source is trained)")
    parser.add_argument("--test", type=int, help="test cases (default: all of the test split)")
    parser.add_argument("--docs", action="store_true", help="write the section of docs/benchmarks.md")
    parser.add_argument("--docs-only", action="store_true",
                        help="only redraw the curves and rewrite that section from --output's finetune.json")
    parser.add_argument("--one", choices=["scratch", "finetune"], help=argparse.SUPPRESS)  # a child process
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {args.one or 'main'} %(levelname)s %(message)s")
    if args.docs_only:
        results = json.loads((args.output / "finetune.json").read_text())
        plot(results, args.output / "finetune_curves.png")
        replace_section(REPO / "docs" / "benchmarks.md", docs_section(results), DOCS_BEGIN, DOCS_END)
        return 0
    args.runs.mkdir(parents=True, exist_ok=True)
    subset_from = "val" if args.source_run else "train"
    manifests = write_manifests(args.manifest, args.runs, args.subset, args.val, args.test, 0, subset_from)
    if args.one:
        run_one(args.one, args, manifests)
        return 0
    results = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "PYTHONPATH=$PWD nice python bench/finetune.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": harness.describe_machine(), "load_average_before": harness.load_average(),
        "subset": args.subset, "val_cases": args.val, "minutes_each": args.minutes,
        "source_minutes": args.source_minutes, "recipe": args.recipe, "iterations_per_epoch": args.iterations, "subset_from": subset_from,
        "runs": [],
    }
    if args.source_run:
        check_source_run(args.source_run, args.manifest)
        results["runs"].append(source_summary(args, manifests))
    else:
        results["runs"].append(run_one("source", args, manifests))
    # Scratch and fine-tuning train side by side, so both see the same load.
    argv_rest = sys.argv[1:] if argv is None else argv
    children = [subprocess.Popen([sys.executable, __file__, *argv_rest, "--one", label]) for label in ("scratch", "finetune")]
    if any(child.wait() for child in children):
        raise SystemExit("a small-subset run failed (see the log above)")
    results["runs"] += [json.loads((args.runs / f"{label}.json").read_text()) for label in ("scratch", "finetune")]
    args.output.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.output / "finetune.json", json.dumps(results, indent=1))
    plot(results, args.output / "finetune_curves.png")
    if args.docs:
        replace_section(REPO / "docs" / "benchmarks.md", docs_section(results), DOCS_BEGIN, DOCS_END)
    runs = {r["label"]: r for r in results["runs"]}
    log.info("test Dice (mean of classes): source %.4f, scratch %.4f, finetune %.4f",
             *(runs[k]["test"]["dice_mean_of_classes"] for k in ("source", "scratch", "finetune")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
