"""The training loop: patches from cached MONAI datasets, Dice+CE, AMP on CUDA, sliding-window
validation, atomic ``last``/``best`` checkpoints, TensorBoard scalars and exact ``--resume``.

Exact resume: every epoch reseeds all random number generators from ``(seed, epoch)``, so an
interrupted run resumed from its ``last.pt`` draws the same patches and augmentations as an
uninterrupted one; model, optimizer, scheduler and AMP scaler states come from the checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from itertools import cycle, islice
from pathlib import Path

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader, MetaTensor, list_data_collate
from monai.losses import DeepSupervisionLoss, DiceCELoss
from monai.metrics import DiceMetric
from monai.transforms import KeepLargestConnectedComponent
from monai.utils import set_determinism
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from medseg.atomic import write_text_atomic
from medseg.config import ExperimentConfig, dump_config
from medseg.data.manifest import Manifest, ManifestCase, check_case_geometry, load_manifest
from medseg.data.transforms import IMAGE, LABEL, training_transforms, validation_transforms
from medseg.errors import CheckpointError, ConfigError
from medseg.inference.predictor import Predictor, resolve_device
from medseg.models import build_model
from medseg.models.checkpoint import load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)


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


def _labelled_cases(manifest: Manifest, split: str, fold: int | None) -> list[ManifestCase]:
    return [c for c in manifest.split(split, fold) if c.label]


def _case_dicts(manifest: Manifest, cases: list[ManifestCase]) -> list[dict[str, str]]:
    return [{IMAGE: str(manifest.image_path(c)), LABEL: str(manifest.label_path(c))} for c in cases]


def _schedule_factor(config: ExperimentConfig, progress: float) -> float:
    """Learning-rate factor after ``progress`` (0..1) of the schedule."""
    if config.optim.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    if config.optim.schedule == "poly":
        return max(0.0, 1 - progress) ** 0.9
    return 1.0


def _lr_lambda(config: ExperimentConfig):
    total, warm = config.train.epochs, config.optim.warmup_epochs

    def factor(epoch: int) -> float:
        if epoch < warm:
            return (epoch + 1) / (warm + 1)
        return _schedule_factor(config, (epoch - warm) / max(1, total - warm))

    return factor


def _optimizer(config: ExperimentConfig, params) -> torch.optim.Optimizer:
    o = config.optim
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay)
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)


def prepare_run_dir(config: ExperimentConfig, resume: bool) -> Path:
    """The run folder; an existing run is never overwritten unless resumed."""
    run_dir = config.train.output_dir
    if resume:
        if not (run_dir / "last.pt").is_file():
            raise CheckpointError(f"{run_dir}: nothing to resume (no last.pt); start without --resume")
    elif (run_dir / "last.pt").exists() or (run_dir / "best.pt").exists():
        raise ConfigError(f"{run_dir}: a run already exists here; pass --resume to continue it or choose "
                          "another train.output_dir / --output-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def validate(predictor: Predictor, loader: DataLoader, num_classes: int) -> list[float]:
    """Per-class (foreground) mean Dice over the validation cases; NaN for a class absent everywhere."""
    metric = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=True, num_classes=num_classes)
    for batch in loader:
        probs = predictor.probabilities(batch[IMAGE])
        pred = torch.argmax(probs, dim=1, keepdim=True).cpu()
        metric(y_pred=pred, y=batch[LABEL].cpu())
    per_class = metric.aggregate()
    return [float(v) for v in per_class]


def postprocessing_effect(predictor: Predictor, loader: DataLoader, num_classes: int) -> dict[int, tuple[float, float]]:
    """Per foreground class: (mean validation Dice as predicted, with only its largest component kept).

    Components are kept per class independently, so each class's Dice depends only on its own choice and
    one pass serves all classes. Evaluated on the preprocessed grid, like :func:`validate`.
    """
    plain = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=True, num_classes=num_classes)
    kept = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=True, num_classes=num_classes)
    keep = KeepLargestConnectedComponent(applied_labels=list(range(1, num_classes)), is_onehot=False, independent=True)
    for batch in loader:
        pred = torch.argmax(predictor.probabilities(batch[IMAGE]), dim=1, keepdim=True).cpu()
        label = batch[LABEL].cpu()
        plain(y_pred=pred, y=label)
        kept(y_pred=torch.stack([torch.as_tensor(keep(p)) for p in pred]), y=label)
    before, after = plain.aggregate(), kept.aggregate()
    return {k + 1: (float(before[k]), float(after[k])) for k in range(num_classes - 1)}


def _choose_postprocessing(config: ExperimentConfig, run_dir: Path, model: torch.nn.Module, predictor: Predictor,
                           loader: DataLoader, num_classes: int) -> list[int]:
    """Enable keep-largest-component for the classes where it raised validation Dice (strictly), in the
    best checkpoint's config and the run's ``config.yaml``; the numbers go to ``postprocessing.json``."""
    best = load_checkpoint(run_dir / "best.pt")
    model.load_state_dict(best.model_state)
    model.eval()
    effect = postprocessing_effect(predictor, loader, num_classes)
    chosen = [k for k, (before, after) in effect.items() if after > before]
    decided = config.model_copy(deep=True)
    decided.infer.keep_largest_component = chosen
    fields = {k: v for k, v in best.raw.items() if k not in ("format", "config", "label_names", "in_channels", "model_state")}
    save_checkpoint(best.path, config=decided, label_names=best.label_names, model_state=best.model_state, **fields)
    write_text_atomic(run_dir / "config.yaml", dump_config(decided))
    record = {
        "rule": "keep the largest connected component of a class when that raises its mean validation Dice",
        "evaluated_on": "validation cases, preprocessed grid, best checkpoint",
        "checkpoint_epoch": best.raw.get("best_epoch"),
        "classes": {str(k): {"dice": b, "dice_largest_component": a, "enabled": k in chosen} for k, (b, a) in effect.items()},
        "keep_largest_component": chosen,
    }
    write_text_atomic(run_dir / "postprocessing.json", json.dumps(record, indent=1))
    log.info("postprocessing: keep largest component for classes %s (%s)", chosen or "none",
             ", ".join(f"{k}: {b:.4f} -> {a:.4f}" for k, (b, a) in effect.items()))
    return chosen


def _plain(t: torch.Tensor) -> torch.Tensor:
    """The tensor without MONAI's metadata (a MetaTensor's data as a plain ``torch.Tensor``)."""
    return t.as_tensor() if isinstance(t, MetaTensor) else t


def step_memory_format(config: ExperimentConfig, dev: torch.device) -> torch.memory_format | None:
    """The memory layout of the network and its batches during training; None: PyTorch's default.

    3D convolutions on CPU run faster channels-last (oneDNN): with DynUNet on the hippocampus plan
    (batch 2 of 40x56x40, 2 cores) 0.975 -> 0.798 s per step (bench/training_step.py, docs/benchmarks.md).
    """
    return torch.channels_last_3d if dev.type == "cpu" and config.model.spatial_dims == 3 else None


def _compiled(model: torch.nn.Module, dev: torch.device) -> torch.nn.Module:
    """``torch.compile`` the training step's network. On CPU Inductor needs a C++ compiler; without one
    training runs eagerly (with a warning) rather than failing at the first step."""
    if dev.type == "cpu" and not (shutil.which("c++") or shutil.which("g++") or shutil.which("cc")):
        log.warning("train.compile: no C++ compiler on PATH, which torch.compile needs on CPU; training runs eagerly")
        return model
    return torch.compile(model)


def train(config: ExperimentConfig, resume: bool = False, device: str | None = None) -> TrainResult:
    """Train the configured network; returns the best checkpoint (by mean foreground validation Dice)."""
    manifest = load_manifest(config.data.manifest)
    fold = config.data.fold
    train_split, val_split = _labelled_cases(manifest, "train", fold), _labelled_cases(manifest, "val", fold)
    if not train_split:
        raise ConfigError(f"{config.data.manifest}: no labelled cases in the train split"
                          + (f" of fold {fold}" if fold is not None else ""))
    # A label off its image's grid would silently train on the wrong voxels: refuse it before any work.
    for case in tqdm({c.id: c for c in train_split + val_split}.values(), desc="checking cases", unit="case",
                     leave=False, disable=None):
        check_case_geometry(manifest, case)
    train_cases, val_cases = _case_dicts(manifest, train_split), _case_dicts(manifest, val_split)
    run_dir = prepare_run_dir(config, resume)
    write_text_atomic(run_dir / "config.yaml", dump_config(config))
    dev = resolve_device(device or config.train.device)
    use_amp = dev.type == "cuda" and config.train.amp
    num_classes = manifest.num_classes

    set_determinism(seed=config.seed)  # seeds Python, NumPy and torch together
    model = build_model(config.model, 1, num_classes).to(dev)
    memory_format = step_memory_format(config, dev)
    if memory_format is not None:
        model = model.to(memory_format=memory_format)
    step_model = _compiled(model, dev) if config.train.compile else model
    loss_fn: torch.nn.Module = DiceCELoss(
        to_onehot_y=True, softmax=True, include_background=config.loss.include_background, batch=config.loss.batch_dice,
        lambda_dice=config.loss.lambda_dice, lambda_ce=config.loss.lambda_ce,
    )
    if config.model.deep_supervision:
        loss_fn = DeepSupervisionLoss(loss_fn)
    optimizer = _optimizer(config, model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config))
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    start_epoch, best_dice, best_epoch, history, since_best = 0, -1.0, -1, [], 0
    elapsed_before = 0.0
    if resume:
        state = load_checkpoint(run_dir / "last.pt").raw
        model.load_state_dict(state["model_state"])
        optimizer.load_state_dict(state["optimizer_state"])
        scheduler.load_state_dict(state["scheduler_state"])
        scaler.load_state_dict(state["scaler_state"])
        start_epoch = int(state["epoch"]) + 1
        best_dice, best_epoch = float(state["best_dice"]), int(state["best_epoch"])
        since_best, elapsed_before = int(state["since_best"]), float(state["elapsed_s"])
        history = list(state["history"])
        log.info("resuming %s at epoch %d", run_dir, start_epoch + 1)

    train_tf = training_transforms(config)
    train_ds = CacheDataset(train_cases, train_tf, cache_rate=config.data.cache_rate, num_workers=None, progress=False)
    val_loader = None
    if val_cases:
        val_ds = CacheDataset(val_cases, validation_transforms(config), cache_rate=config.data.cache_rate, progress=False)
        val_loader = DataLoader(val_ds, batch_size=1, num_workers=config.data.num_workers)
    predictor = Predictor(model, config, manifest.labels, dev)
    writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
    label_names = manifest.labels
    fg_names = [label_names[k] for k in range(1, num_classes)]

    t0 = time.monotonic()
    epoch = start_epoch - 1
    try:
        for epoch in range(start_epoch, config.train.epochs):
            epoch_seed = (config.seed * 100_003 + epoch) % 2**32
            set_determinism(seed=epoch_seed)
            train_tf.set_random_state(seed=epoch_seed)
            loader = DataLoader(train_ds, batch_size=config.train.batch_size, shuffle=True, drop_last=False,
                                num_workers=config.data.num_workers, collate_fn=list_data_collate)
            steps = config.train.iterations_per_epoch or len(loader)
            if config.train.schedule_over == "time" and epoch >= config.optim.warmup_epochs:
                # A wall-clock budget: the decay ends when the budget does, however fast this machine is.
                # (Exact resume still holds for everything but the lr, which follows the clock.)
                progress = (elapsed_before + time.monotonic() - t0) / (60 * (config.train.max_minutes or 1.0))
                for group in optimizer.param_groups:
                    group["lr"] = group["initial_lr"] * _schedule_factor(config, progress)
            model.train()
            losses = []
            bar = tqdm(islice(cycle(loader), steps) if config.train.iterations_per_epoch else loader, total=steps,
                       desc=f"epoch {epoch + 1}/{config.train.epochs}", unit="batch", leave=False, disable=None)
            for batch in bar:
                # Plain tensors: the step needs no metadata, and torch.compile cannot trace MONAI's MetaTensor.
                x, y = _plain(batch[IMAGE]).to(dev), _plain(batch[LABEL]).to(dev)
                if memory_format is not None:
                    x = x.contiguous(memory_format=memory_format)
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast(dev.type, enabled=use_amp):
                    out = step_model(x)
                    if config.model.deep_supervision and out.ndim == x.ndim + 1:
                        out = list(torch.unbind(out, dim=1))  # DynUNet stacks its supervision heads on dim 1
                    loss = loss_fn(out, y)
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 12.0)
                scaler.step(optimizer)
                scaler.update()
                losses.append(float(loss.detach()))
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if config.train.schedule_over == "epochs" or epoch + 1 < config.optim.warmup_epochs:
                scheduler.step()
            record = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "lr": optimizer.param_groups[0]["lr"],
                      "elapsed_s": elapsed_before + time.monotonic() - t0}
            writer.add_scalar("train/loss", record["loss"], epoch + 1)
            writer.add_scalar("train/lr", record["lr"], epoch + 1)

            improved = False
            if val_loader is not None and ((epoch + 1) % config.train.val_interval == 0 or epoch + 1 == config.train.epochs):
                model.eval()
                per_class = validate(predictor, val_loader, num_classes)
                mean_dice = float(np.nanmean(per_class)) if not all(np.isnan(per_class)) else 0.0
                record["val_dice"] = mean_dice
                record.update({f"val_dice_{n}": d for n, d in zip(fg_names, per_class, strict=True)})
                writer.add_scalar("val/mean_dice", mean_dice, epoch + 1)
                for name, d in zip(fg_names, per_class, strict=True):
                    writer.add_scalar(f"val/dice_{name}", d, epoch + 1)
                improved = mean_dice > best_dice
                since_best = 0 if improved else since_best + 1
                log.info("epoch %d: loss %.4f, val Dice %.4f (%s)", epoch + 1, record["loss"], mean_dice,
                         ", ".join(f"{n} {d:.3f}" for n, d in zip(fg_names, per_class, strict=True)))
            else:
                improved = val_loader is None  # without validation cases the latest epoch counts as best
                log.info("epoch %d: loss %.4f", epoch + 1, record["loss"])
            if improved:
                best_dice, best_epoch = record.get("val_dice", -1.0), epoch + 1
            history.append(record)

            common = dict(config=config, label_names=label_names, model_state=model.state_dict())
            if improved:
                save_checkpoint(run_dir / "best.pt", **common, epoch=epoch, best_dice=best_dice, best_epoch=best_epoch)
            save_checkpoint(
                run_dir / "last.pt", **common, epoch=epoch, best_dice=best_dice, best_epoch=best_epoch,
                optimizer_state=optimizer.state_dict(), scheduler_state=scheduler.state_dict(),
                scaler_state=scaler.state_dict(), since_best=since_best, elapsed_s=record["elapsed_s"], history=history,
            )
            write_text_atomic(run_dir / "history.json", json.dumps(history, indent=1))

            patience = config.train.early_stopping_patience
            if patience is not None and since_best >= patience:
                log.info("early stopping: no improvement in %d validations", patience)
                break
            if config.train.max_minutes is not None and record["elapsed_s"] >= 60 * config.train.max_minutes:
                log.info("time budget of %.1f min reached after epoch %d", config.train.max_minutes, epoch + 1)
                break
    finally:
        writer.close()
    chosen = None
    if config.train.choose_postprocessing and val_loader is not None and (run_dir / "best.pt").is_file():
        chosen = _choose_postprocessing(config, run_dir, model, predictor, val_loader, num_classes)
    return TrainResult(run_dir, run_dir / "best.pt", best_dice, best_epoch, epoch + 1, history, chosen)
