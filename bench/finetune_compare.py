"""Benchmark: fine-tuning vs training from scratch on 20 new hippocampus cases, 3 seeds each, judged by
``medseg compare`` (paired per-case statistics, and the forgetting check on the source model's split).

1. A **source model** is trained on one part of the MSD hippocampus training cases (``--source-cases``,
   drawn with a fixed seed from the manifest's train split) for ``--source-steps`` steps.
2. On ``--subset`` **other** training cases ("the new data"), for each seed of ``--seeds``:
   - **fine-tuned**: ``train.init_from`` the source, ``--finetune-steps`` steps;
   - **scratch**: a fresh network, ``--source-steps + --finetune-steps`` steps: the same total number of
     optimizer steps as source + fine-tuning.
3. Per seed, ``medseg compare SCRATCH FINETUNED --manifest subset.json --split test`` on the manifest's
   held-out test split (the same cases for every run; no run trained or validated on them). The
   fine-tuned bundle records ``init_from``, so compare also runs the forgetting check: source and
   fine-tuned model on the source manifest's test split.

The recipe is configs/mr_hippocampus.yaml's network and preprocessing with bench/finetune.py's ``FAST``
overrides (half width, Adam 1e-3, light augmentation: learns within hundreds of steps on a CPU);
``--recipe shipped`` keeps the config as it is. Training length is in steps (not wall time), so the
results repeat on any machine up to floating-point nondeterminism; seconds per step are recorded.
Runs resume: a finished run is not trained again, a killed one continues from its ``last.pt``.

Writes ``--output``/finetune_compare.json (every figure, the commands) and, per seed,
``--output``/compare_seed<S>/ (``comparison.csv``, ``comparison.json``, ``report.html``; the masks and
per-model evaluations stay in ``--runs``/compare_seed<S>/); ``--docs``
rewrites the section of docs/benchmarks.md from them. The full run (5 800 steps of batch 2 in all: 1 000 source,
3 x 1 300 scratch, 3 x 300 fine-tuning; about 0.2 s a step on an idle 2-core CPU, so about half an hour):

    PYTHONPATH=$PWD nice python bench/finetune_compare.py --docs > bench_finetune_compare.log 2>&1 &

A smoke run (a minute of CPU, proves the plumbing, figures meaningless):

    PYTHONPATH=$PWD python bench/finetune_compare.py --source-cases 4 --subset 2 --val 1 --test 2 \\
        --source-steps 2 --finetune-steps 2 --iterations 1 --seeds 0 --runs /tmp/fc_runs --output /tmp/fc_out
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import random
import shlex
import time
from pathlib import Path

import harness  # bench/ is this script's folder, first on sys.path
import torch
from docs_section import replace_section
from finetune import FAST  # the recipe of the earlier fine-tuning benchmark (bench/finetune.py)

from medseg.atomic import write_text_atomic
from medseg.cli import main as medseg_main
from medseg.config import ExperimentConfig, load_config, with_overrides
from medseg.data.manifest import load_manifest, save_manifest
from medseg.training.trainer import train

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench")
DOCS_BEGIN, DOCS_END = "<!-- finetune-compare:begin -->", "<!-- finetune-compare:end -->"


def write_manifests(source: Path, folder: Path, source_cases: int, subset: int, val: int, test: int | None,
                    seed: int) -> dict[str, Path]:
    """Manifests with absolute case paths: ``source`` (its training cases), ``subset`` (the new cases), both with
    the same validation cases (from the val split) and the same test split. The two training sets are disjoint."""
    m = load_manifest(source)
    cases = [c.model_copy(update={"image": [str(p) for p in m.image_paths(c)] if isinstance(c.image, list)
                                  else str(m.image_path(c)), "label": str(m.label_path(c)) if c.label else None})
             for c in m.cases]
    pool = list(m.splits["train"])
    random.Random(seed).shuffle(pool)
    if source_cases + subset > len(pool):
        raise SystemExit(f"{source}: {len(pool)} train cases, asked {source_cases} + {subset}")
    source_ids, subset_ids = sorted(pool[:source_cases]), sorted(pool[source_cases:source_cases + subset])
    val_ids, test_ids = list(m.splits["val"])[:val], list(m.splits["test"])[:test]
    out = {}
    for name, train_ids in (("source", source_ids), ("subset", subset_ids)):
        manifest = m.model_copy(update={"name": f"{m.name}_{name}", "cases": cases, "folds": [],
                                        "allow_paths_outside_root": True,
                                        "splits": {"train": train_ids, "val": val_ids, "test": test_ids}})
        out[name] = save_manifest(manifest, folder / f"hippocampus_{name}.json")
    return out


def run_config(base: ExperimentConfig, name: str, manifest: Path, output_dir: Path, steps: int, iterations: int,
               seed: int, device: str, **train: object) -> ExperimentConfig:
    """``base`` trained for ``steps`` optimizer steps (epochs of ``iterations`` steps, lr schedule over them), eager,
    validating every 2 epochs, no post-processing choice (the models are compared as trained)."""
    optim = train.pop("optim", {})
    epochs = max(1, round(steps / iterations))
    return with_overrides(base, {
        "name": name, "seed": seed, "data": {"manifest": str(manifest), "fold": None}, "optim": optim,
        "train": {"epochs": epochs, "iterations_per_epoch": iterations, "max_minutes": None, "schedule_over": "epochs",
                  "compile": False, "device": device, "val_interval": min(2, epochs), "choose_postprocessing": False,
                  "output_dir": str(output_dir), **train},
    })


def train_run(config: ExperimentConfig, device: str) -> dict:
    """Train (or resume, or find finished) one run; its steps and seconds per step."""
    run_dir = Path(config.train.output_dir)
    t0 = time.monotonic()
    result = train(config, resume=(run_dir / "last.pt").is_file(), device=device)
    wall = time.monotonic() - t0
    steps = config.train.epochs * (config.train.iterations_per_epoch or 0)
    out = {"run": harness.portable(str(run_dir)), "name": config.name, "steps": steps, "epochs": config.train.epochs,
           "best_val_dice": round(result.best_dice, 4), "best_epoch": result.best_epoch,
           "train_wall_s_this_call": round(wall, 1), "already_finished": bool(result.already_finished),
           "s_per_step": None if result.already_finished else round(wall / max(1, steps), 2),
           "init_from": str(config.train.init_from) if config.train.init_from else None}
    log.info("%s: %s", config.name, json.dumps(out))
    return out


def compare_seed(scratch: Path, finetuned: Path, manifest: Path, output: Path, device: str) -> tuple[list[str], dict]:
    """``medseg compare SCRATCH FINETUNED --manifest M --split test`` (the command, and its comparison.json)."""
    argv = ["compare", str(scratch), str(finetuned), "--manifest", str(manifest), "--split", "test",
            "--output", str(output), "--device", device]
    if medseg_main(argv) != 0:
        raise SystemExit(f"medseg {shlex.join(argv)} failed")
    return argv, json.loads((output / "comparison.json").read_text())


def relative(text: str) -> str:
    """``text`` (a report, a JSON record) with this checkout's absolute paths made relative to it: a record
    names no folder of the machine that ran it."""
    return text.replace(f"{REPO}/", "")


def seed_summary(seed: int, doc: dict) -> dict:
    """The figures of one seed's comparison: mean Dice of both, the paired difference and the forgetting check."""
    comparison = doc["comparisons"][0]
    rows = {(s["class_name"], s["metric"]): s for s in comparison["stats"]}
    mean = rows[("mean foreground", "dice")]
    forgetting = doc["forgetting"][0] if doc["forgetting"] else None
    source_stats = ({(s["class_name"], s["metric"]): s for s in forgetting["stats"]} if forgetting and forgetting["checked"]
                    else {})
    src = source_stats.get(("mean foreground", "dice"))
    return {
        "seed": seed, "cases": len(doc["cases"]),
        "scratch_dice": mean["baseline_mean"], "finetuned_dice": mean["model_mean"],
        "difference": mean["mean_difference"], "ci": [mean["ci_low"], mean["ci_high"]], "p": mean["p_value"],
        "wins_ties_losses": [mean["wins"], mean["ties"], mean["losses"]],
        "per_class": {cls: {"scratch": rows[(cls, "dice")]["baseline_mean"], "finetuned": rows[(cls, "dice")]["model_mean"],
                            "difference": rows[(cls, "dice")]["mean_difference"],
                            "hd95_difference_mm": rows[(cls, "hd95_mm")]["mean_difference"]}
                      for cls in ("anterior", "posterior") if (cls, "dice") in rows},
        "forgetting": None if forgetting is None else {
            "checked": forgetting["checked"], "reason": forgetting["reason"], "drop": forgetting["drop"],
            "flagged": forgetting["flagged"], "tolerance": forgetting["tolerance"],
            "source_dice": src["baseline_mean"] if src else None, "finetuned_dice": src["model_mean"] if src else None,
            "ci": [src["ci_low"], src["ci_high"]] if src else None, "p": src["p_value"] if src else None},
    }


def _f(v: float | None, digits: int = 3, sign: bool = False) -> str:
    return "–" if v is None else (f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}")


def _p(v: float | None) -> str:
    return "–" if v is None else (f"{v:.3f}" if v >= 0.001 else f"{v:.1e}")


def docs_section(results: dict) -> str:
    """Markdown for docs/benchmarks.md from finetune_compare.json."""
    seeds = results["seeds"]
    lines = [
        DOCS_BEGIN,
        f"## Fine-tuned vs from scratch on {results['subset']} new cases, {len(seeds)} seed(s), judged by `medseg compare` "
        "(hippocampus)",
        "",
        f"Run on {results['date']} at commit `{results['commit'][:12]}` with `{results['command']}` "
        f"({results['machine']['cores']} cores, {results['machine']['cpu_model']}, torch {results['torch']}, device "
        f"{results['device']}; load average {results['load_average_before']} before, {results['load_average_after']} "
        "after; the Dice figures do not depend on the load). Data: MSD Task04 hippocampus (`data_manifests/hippocampus.json`; CC BY-SA 4.0, "
        "Antonelli et al. 2022). Source model: "
        f"{results['source_cases']} train cases, {results['source_steps']} steps. New data: {results['subset']} other "
        f"train cases. Fine-tuned: `train.init_from` the source, {results['finetune_steps']} steps (lr "
        f"{results['finetune_lr']:g}, encoder frozen {results['freeze_epochs']} epoch(s)). Scratch: "
        f"{results['source_steps'] + results['finetune_steps']} steps, the same total. Recipe `{results['recipe']}`; "
        f"epochs of {results['iterations']} steps of batch 2; all runs validate on the same {results['val']} val cases "
        f"and are compared on the {seeds[0]['cases']} test cases. Per seed: "
        "`medseg compare SCRATCH FINETUNED --manifest hippocampus_subset.json --split test`.",
        "",
        "| seed | scratch Dice | fine-tuned Dice | difference [95% CI] | Wilcoxon p | wins/ties/losses | "
        "forgetting: source → fine-tuned on the source's test split (drop) |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in seeds:
        f = s["forgetting"]
        forgot = ("not checked: " + f["reason"] if f and not f["checked"] else
                  f"{_f(f['source_dice'])} → {_f(f['finetuned_dice'])} ({_f(f['drop'], sign=True)}"
                  f"{', FLAGGED' if f['flagged'] else ', ok'})" if f else "–")
        lines.append(f"| {s['seed']} | {_f(s['scratch_dice'])} | {_f(s['finetuned_dice'])} | "
                     f"{_f(s['difference'], sign=True)} [{_f(s['ci'][0], sign=True)}, {_f(s['ci'][1], sign=True)}] | "
                     f"{_p(s['p'])} | "
                     f"{'/'.join(map(str, s['wins_ties_losses']))} | {forgot} |")
    diffs = [s["difference"] for s in seeds if s["difference"] is not None]
    mean_diff = sum(diffs) / len(diffs) if diffs else None
    lines += [
        "",
        f"Mean over seeds of the paired mean Dice difference (fine-tuned − scratch): **{_f(mean_diff, sign=True)}**. "
        "Dice is the per-case mean over anterior and posterior; the interval is the seeded bootstrap of the mean "
        "paired difference, p the Wilcoxon signed-rank test (docs/evaluation.md, \"Comparing models\"). The "
        f"forgetting tolerance is {seeds[0]['forgetting']['tolerance'] if seeds[0]['forgetting'] else 0.02:g} mean Dice.",
        "",
        "Reports (paired plot, gained/lost cases side by side, provenance chain): "
        + ", ".join(f"[seed {s['seed']}](benchmarks/finetune_compare/compare_seed{s['seed']}/report.html)" for s in seeds)
        + "; figures: [benchmarks/finetune_compare/finetune_compare.json](benchmarks/finetune_compare/finetune_compare.json).",
        DOCS_END,
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "mr_hippocampus.yaml")
    parser.add_argument("--manifest", type=Path, default=REPO / "data_manifests" / "hippocampus.json")
    parser.add_argument("--source-cases", type=int, default=80, help="train cases of the source model")
    parser.add_argument("--subset", type=int, default=20, help="other train cases: the new data")
    parser.add_argument("--val", type=int, default=8, help="validation cases (from the val split)")
    parser.add_argument("--test", type=int, default=None, help="test cases (default: the whole test split, 40)")
    parser.add_argument("--source-steps", type=int, default=1000)
    parser.add_argument("--finetune-steps", type=int, default=300)
    parser.add_argument("--iterations", type=int, default=15, help="steps per epoch")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--recipe", choices=["fast", "shipped"], default="fast")
    parser.add_argument("--finetune-lr", type=float, default=5e-4)
    parser.add_argument("--freeze-epochs", type=int, default=1)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "bench_finetune_compare")
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "benchmarks" / "finetune_compare")
    parser.add_argument("--docs", action="store_true", help="write the section of docs/benchmarks.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args.runs.mkdir(parents=True, exist_ok=True)
    args.output.mkdir(parents=True, exist_ok=True)
    load_before = harness.load_average()
    manifests = write_manifests(args.manifest, args.runs, args.source_cases, args.subset, args.val, args.test, 0)
    base = load_config(args.config)
    if args.recipe == "fast":
        base = with_overrides(base, FAST)
    it, dev = args.iterations, args.device
    source_dir = args.runs / "source"
    runs = {"source": train_run(run_config(base, "hippo_source", manifests["source"], source_dir, args.source_steps,
                                           it, 0, dev), dev)}
    seeds = []
    for seed in args.seeds:
        scratch = run_config(base, f"hippo_scratch_s{seed}", manifests["subset"], args.runs / f"scratch_s{seed}",
                             args.source_steps + args.finetune_steps, it, seed, dev)
        tuned = run_config(base, f"hippo_finetune_s{seed}", manifests["subset"], args.runs / f"finetune_s{seed}",
                           args.finetune_steps, it, seed, dev, init_from=str(source_dir),
                           freeze_encoder_epochs=args.freeze_epochs, optim={"lr": args.finetune_lr})
        runs[f"scratch_s{seed}"] = train_run(scratch, dev)
        runs[f"finetune_s{seed}"] = train_run(tuned, dev)
        compare_dir = args.runs / f"compare_seed{seed}"  # with the predictions and per-model evaluations
        compare_argv, doc = compare_seed(args.runs / f"scratch_s{seed}", args.runs / f"finetune_s{seed}",
                                         manifests["subset"], compare_dir, dev)
        for name in ("comparison.csv", "comparison.json", "report.html"):  # the results, without the masks
            write_text_atomic(args.output / f"compare_seed{seed}" / name, relative((compare_dir / name).read_text()))
        seeds.append({**seed_summary(seed, doc),
                      "compare_command": "medseg " + shlex.join(harness.portable(a) for a in compare_argv)})
    results = harness.record(
        "finetune_compare", {"load_average_before": load_before, "load_average_after": harness.load_average()},
        platform=platform.platform(), torch=torch.__version__, threads=torch.get_num_threads(),
        device=dev, recipe=args.recipe, source_cases=args.source_cases, subset=args.subset, val=args.val,
        source_steps=args.source_steps, finetune_steps=args.finetune_steps, iterations=it,
        finetune_lr=args.finetune_lr, freeze_epochs=args.freeze_epochs, runs=runs, seeds=seeds)
    write_text_atomic(args.output / "finetune_compare.json", relative(json.dumps(results, indent=1)))
    if args.docs:
        replace_section(REPO / "docs" / "benchmarks.md", docs_section(results), DOCS_BEGIN, DOCS_END)
    for s in seeds:
        log.info("seed %d: scratch %s, fine-tuned %s, difference %s [%s, %s], p %s, forgetting %s", s["seed"],
                 _f(s["scratch_dice"]), _f(s["finetuned_dice"]), _f(s["difference"], sign=True),
                 _f(s["ci"][0], sign=True), _f(s["ci"][1], sign=True), _f(s["p"]),
                 json.dumps(s["forgetting"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
