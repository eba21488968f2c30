"""The training loop (:class:`Trainer`): patches from cached MONAI datasets, Dice+CE, AMP on CUDA,
sliding-window validation, atomic ``last``/``best`` model bundles, callbacks for logging and trackers
(TensorBoard by default) and exact ``--resume``.

Exact resume: every epoch reseeds all random number generators from ``(seed, epoch)``, so an
interrupted run resumed from its ``last.pt`` draws the same patches and augmentations as an
uninterrupted one; model, optimizer, scheduler and AMP scaler states come from the checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader, MetaTensor, list_data_collate
from monai.losses import DeepSupervisionLoss, DiceCELoss
from monai.metrics import compute_dice
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
from medseg.models.bundle import DataProvenance, InitFromRecord, ModelBundle, ValidationSummary, load_bundle
from medseg.models.registry import encoder_parameters
from medseg.training.distributed import DistributedContext, init_distributed
from medseg.training.init_from import load_matching_weights
from medseg.training.loop import LoopState, TrainerCallback, TrainResult
from medseg.training.qc_calibration import calibrate_bundle_file
from medseg.training.sampling import DrawSeededDataset, epoch_draws, rank_keys, steps_per_epoch

log = logging.getLogger(__name__)


def _labelled_cases(manifest: Manifest, split: str, fold: int | None) -> list[ManifestCase]:
    return [c for c in manifest.split(split, fold) if c.label]


def _case_dicts(manifest: Manifest, cases: list[ManifestCase]) -> list[dict[str, str | list[str]]]:
    # Several channel files load as one stacked image (ScanReader): a list for multi-channel cases.
    def image(c: ManifestCase) -> str | list[str]:
        paths = [str(p) for p in manifest.image_paths(c)]
        return paths if len(paths) > 1 else paths[0]

    return [{IMAGE: image(c), LABEL: str(manifest.label_path(c))} for c in cases]


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


def case_dice(pred: torch.Tensor, label: torch.Tensor, num_classes: int) -> np.ndarray:
    """Dice per case and foreground class, shape (B, K-1), of label maps (B, 1, ...); NaN where a case's
    reference lacks the class (that case does not count for the class)."""
    dice = compute_dice(pred, label, include_background=False, ignore_empty=True, num_classes=num_classes)
    return dice.cpu().numpy().reshape(len(pred), num_classes - 1)


def class_means(rows: list[np.ndarray], num_classes: int) -> list[float]:
    """Mean Dice per foreground class over the cases of ``rows``; NaN for a class absent everywhere."""
    table = np.concatenate(rows) if rows else np.full((0, num_classes - 1), np.nan)
    counted = ~np.isnan(table)
    sums = np.where(counted, table, 0.0).sum(axis=0)
    return [float(t / n) if n else float("nan") for t, n in zip(sums, counted.sum(axis=0), strict=True)]


def validate(predictor: Predictor, loader: DataLoader, num_classes: int,
             dist: DistributedContext | None = None) -> list[float]:
    """Per-class (foreground) mean Dice over the validation cases; NaN for a class absent everywhere.

    In a distributed run each process scores its share of the cases and the rows are gathered, so every
    process gets the mean over all of them.
    """
    rows = []
    for batch in loader:
        pred = torch.argmax(predictor.probabilities(batch[IMAGE]), dim=1, keepdim=True).cpu()
        rows.append(case_dice(pred, batch[LABEL].cpu(), num_classes))
    return class_means((dist or DistributedContext()).gather(rows), num_classes)


def postprocessing_effect(predictor: Predictor, loader: DataLoader, num_classes: int,
                          dist: DistributedContext | None = None) -> dict[int, tuple[float, float]]:
    """Per foreground class: (mean validation Dice as predicted, with only its largest component kept).

    Components are kept per class independently, so each class's Dice depends only on its own choice and
    one pass serves all classes. Evaluated on the preprocessed grid, like :func:`validate`.
    """
    keep = KeepLargestConnectedComponent(applied_labels=list(range(1, num_classes)), is_onehot=False, independent=True)
    plain, kept = [], []
    for batch in loader:
        pred = torch.argmax(predictor.probabilities(batch[IMAGE]), dim=1, keepdim=True).cpu()
        label = batch[LABEL].cpu()
        plain.append(case_dice(pred, label, num_classes))
        kept.append(case_dice(torch.stack([torch.as_tensor(keep(p)) for p in pred]), label, num_classes))
    dist = dist or DistributedContext()
    before, after = class_means(dist.gather(plain), num_classes), class_means(dist.gather(kept), num_classes)
    return {k + 1: (before[k], after[k]) for k in range(num_classes - 1)}


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



class TensorBoardCallback(TrainerCallback):
    """Loss, learning rate and validation Dice per class as TensorBoard scalars in ``<run>/tensorboard``."""

    def __init__(self) -> None:
        self.writer: SummaryWriter | None = None

    def on_fit_start(self, trainer: Trainer) -> None:
        self.writer = SummaryWriter(log_dir=str(trainer.run_dir / "tensorboard"))

    def on_epoch_end(self, trainer: Trainer, record: dict) -> None:
        assert self.writer is not None
        epoch = record["epoch"]
        self.writer.add_scalar("train/loss", record["loss"], epoch)
        self.writer.add_scalar("train/lr", record["lr"], epoch)
        if "val_dice" in record:
            self.writer.add_scalar("val/mean_dice", record["val_dice"], epoch)
            for name in trainer.foreground_names:
                self.writer.add_scalar(f"val/dice_{name}", record[f"val_dice_{name}"], epoch)

    def on_fit_end(self, trainer: Trainer, result: TrainResult | None) -> None:
        if self.writer is not None:
            self.writer.close()


class LogCallback(TrainerCallback):
    """One log line per epoch: loss, and validation Dice per class when validated."""

    def on_fit_start(self, trainer: Trainer) -> None:
        if trainer.state.epoch >= 0:
            log.info("resuming %s at epoch %d of %d", trainer.run_dir, trainer.state.epoch + 2, trainer.config.train.epochs)

    def on_epoch_end(self, trainer: Trainer, record: dict) -> None:
        if "val_dice" in record:
            log.info("epoch %d: loss %.4f, val Dice %.4f (%s)", record["epoch"], record["loss"], record["val_dice"],
                     ", ".join(f"{n} {record[f'val_dice_{n}']:.3f}" for n in trainer.foreground_names))
        else:
            log.info("epoch %d: loss %.4f", record["epoch"], record["loss"])


class Trainer:
    """The training loop in parts: :meth:`train_step`, :meth:`train_epoch`, :meth:`validate_epoch`,
    :meth:`save_checkpoints`, and :meth:`fit`, which runs them and calls the callbacks.

    Patches come from cached MONAI datasets; Dice + cross-entropy; AMP on CUDA; sliding-window
    validation through the same :class:`Predictor` that ``medseg predict`` uses. Checkpoints are model
    bundles (:mod:`medseg.models.bundle`); ``last.pt`` adds what exact resume needs.
    """

    def __init__(self, config: ExperimentConfig, device: str | None = None,
                 callbacks: list[TrainerCallback] | None = None):
        self.config = config
        self.callbacks = default_callbacks(config) if callbacks is None else list(callbacks)
        self.manifest = load_manifest(config.data.manifest)
        fold = config.data.fold
        self.train_split = _labelled_cases(self.manifest, "train", fold)
        self.val_split = _labelled_cases(self.manifest, "val", fold)
        if not self.train_split:
            raise ConfigError(f"{config.data.manifest}: no labelled cases in the train split"
                              + (f" of fold {fold}" if fold is not None else ""))
        self.dist: DistributedContext = init_distributed(resolve_device(device or config.train.device))
        self.device = self.dist.device
        if config.train.batch_size % self.dist.world_size:
            raise ConfigError(f"train.batch_size {config.train.batch_size} is the global batch and must divide evenly "
                              f"among {self.dist.world_size} processes")
        self.rank_batch = config.train.batch_size // self.dist.world_size
        if not self.dist.is_main:
            self.callbacks = []  # one writer: rank 0 logs, tracks and checkpoints
        self.num_classes = self.manifest.num_classes
        self.in_channels = self.manifest.num_channels
        self.label_names = dict(self.manifest.labels)
        self.foreground_names = [self.label_names[k] for k in range(1, self.num_classes)]
        self.use_amp = self.device.type == "cuda" and config.train.amp
        self.state = LoopState()
        self.run_dir = config.train.output_dir
        self.frozen: list[torch.nn.Parameter] = []
        """Parameters whose gradients are dropped before each optimizer step (``train.freeze_encoder_epochs``)."""

    # --- set-up ------------------------------------------------------------------------------------
    def _check_cases(self) -> None:
        # A label off its image's grid would silently train on the wrong voxels: refuse it before any work.
        cases = {c.id: c for c in self.train_split + self.val_split}.values()
        for case in tqdm(cases, desc="checking cases", unit="case", leave=False, disable=self._quiet):
            check_case_geometry(self.manifest, case)

    def _data_provenance(self) -> DataProvenance:
        digest = hashlib.sha256(Path(self.config.data.manifest).read_bytes()).hexdigest()
        return DataProvenance(manifest_name=self.manifest.name, manifest_sha256=digest, fold=self.config.data.fold,
                              train_cases=len(self.train_split), val_cases=len(self.val_split))

    def setup(self, resume: bool) -> None:
        """Check the cases, prepare the run folder, build network, optimizer, data and predictor."""
        config, dev = self.config, self.device
        self._check_cases()
        self.run_dir = prepare_run_dir(config, resume)
        if self.dist.is_main:
            write_text_atomic(self.run_dir / "config.yaml", dump_config(config))
        self.bundle = ModelBundle.from_config(config, self.label_names, self.in_channels, data=self._data_provenance(),
                                              label_codes=self.manifest.label_codes, modality=self.manifest.modality)

        set_determinism(seed=config.seed)  # seeds Python, NumPy and torch together
        self.model = build_model(config.model, self.in_channels, self.num_classes)
        if config.train.init_from is not None and not resume:
            self._init_from(config.train.init_from)
        self.model = self.model.to(dev)
        self.memory_format = step_memory_format(config, dev)
        if self.memory_format is not None:
            self.model = self.model.to(memory_format=self.memory_format)
        self.step_model: torch.nn.Module = self.model
        if self.dist.enabled:
            # Gradients are averaged over the processes in backward; each process keeps an identical model.
            self.step_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[dev] if dev.type == "cuda" else None)
        if config.train.compile:
            self.step_model = _compiled(self.step_model, dev)
        loss_fn: torch.nn.Module = DiceCELoss(
            to_onehot_y=True, softmax=True, include_background=config.loss.include_background,
            batch=config.loss.batch_dice, lambda_dice=config.loss.lambda_dice, lambda_ce=config.loss.lambda_ce,
        )
        self.loss_fn = DeepSupervisionLoss(loss_fn) if config.model.deep_supervision else loss_fn
        self.optimizer = _optimizer(config, self.model.parameters())
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(config))
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        if resume:
            self._restore(load_bundle(self.run_dir / "last.pt"))

        self.train_transforms = training_transforms(config)
        self.train_dataset = DrawSeededDataset(_case_dicts(self.manifest, self.train_split), self.train_transforms,
                                               cache_rate=config.data.cache_rate, num_workers=None, progress=False)
        self.val_loader = None
        if self.val_split:
            # Each process validates its share of the cases (a process may have none); scores are gathered.
            shard = self.val_split[self.dist.rank::self.dist.world_size]
            val_ds = CacheDataset(_case_dicts(self.manifest, shard), validation_transforms(config),
                                  cache_rate=config.data.cache_rate, progress=False)
            self.val_loader = DataLoader(val_ds, batch_size=1, num_workers=config.data.num_workers)
        self.predictor = Predictor(self.model, self.bundle, dev)

    def _init_from(self, source: Path) -> None:
        """Fine-tuning: the matching weights of ``source``, recorded in the bundle's provenance."""
        report = load_matching_weights(self.model, self.config.model, self.in_channels, self.label_names, source)
        if self.dist.is_main:
            log.info("%s", report.describe())
        self._set_init_from_record(report.record())

    def _set_init_from_record(self, record: InitFromRecord) -> None:
        provenance = self.bundle.spec.provenance.model_copy(update={"init_from": record})
        self.bundle = ModelBundle(self.bundle.spec.model_copy(update={"provenance": provenance}), self.bundle.weights)

    def _restore(self, last: ModelBundle) -> None:
        state = last.training_state
        if last.spec.provenance.init_from is not None:  # a resumed fine-tuning run keeps its origin
            self._set_init_from_record(last.spec.provenance.init_from)
        self.model.load_state_dict(last.weights)
        self.optimizer.load_state_dict(state["optimizer_state"])
        self.scheduler.load_state_dict(state["scheduler_state"])
        self.scaler.load_state_dict(state["scaler_state"])
        self.state = LoopState.from_checkpoint(state)

    # --- the loop's parts --------------------------------------------------------------------------
    def train_step(self, batch: dict) -> float:
        """One optimisation step on a batch of patches; returns its loss."""
        dev = self.device
        # Plain tensors: the step needs no metadata, and torch.compile cannot trace MONAI's MetaTensor.
        x, y = _plain(batch[IMAGE]).to(dev), _plain(batch[LABEL]).to(dev)
        if self.memory_format is not None:
            x = x.contiguous(memory_format=self.memory_format)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, enabled=self.use_amp):
            out = self.step_model(x)
            if self.config.model.deep_supervision and out.ndim == x.ndim + 1:
                out = list(torch.unbind(out, dim=1))  # DynUNet stacks its supervision heads on dim 1
            loss = self.loss_fn(out, y)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        for p in self.frozen:
            p.grad = None  # optimizers skip a parameter without gradient: no step, decay or momentum
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 12.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return float(loss.detach())

    def _set_time_schedule_lr(self, epoch: int, elapsed_s: float) -> None:
        config = self.config
        if config.train.schedule_over == "time" and epoch >= config.optim.warmup_epochs:
            # A wall-clock budget: the decay ends when the budget does, however fast this machine is.
            # (Exact resume still holds for everything but the lr, which follows the clock.)
            progress = elapsed_s / (60 * (config.train.max_minutes or 1.0))
            for group in self.optimizer.param_groups:
                group["lr"] = group["initial_lr"] * _schedule_factor(config, progress)

    @property
    def _quiet(self) -> bool | None:
        """tqdm's ``disable``: bars on rank 0 only (None: shown on a terminal)."""
        return None if self.dist.is_main else True

    def train_epoch(self, epoch: int) -> float:
        """One epoch of steps; returns the mean loss over the steps (and the processes).

        The draws, their patches and augmentation follow from ``(seed, epoch)`` alone
        (:mod:`medseg.training.sampling`), so a resumed run continues exactly and a distributed run
        sees, batch by batch, what one process with the same global batch would.
        """
        config = self.config
        epoch_seed = (config.seed * 100_003 + epoch) % 2**32
        set_determinism(seed=epoch_seed + self.dist.rank)  # dropout etc.: each process its own stream
        num_cases, global_batch = len(self.train_dataset), config.train.batch_size
        steps = steps_per_epoch(num_cases, global_batch, config.train.iterations_per_epoch)
        draws = epoch_draws(num_cases, global_batch, steps, epoch_seed)
        self.train_dataset.epoch_seed = epoch_seed
        keys = rank_keys(draws, num_cases, global_batch, self.dist.rank, self.dist.world_size)
        loader = DataLoader(self.train_dataset, batch_size=self.rank_batch, sampler=keys,
                            num_workers=config.data.num_workers, collate_fn=list_data_collate)
        self._freeze_encoder(epoch)
        self.model.train()
        bar = tqdm(loader, total=steps, desc=f"epoch {epoch + 1}/{config.train.epochs}", unit="batch", leave=False,
                   disable=self._quiet)
        losses = []
        for step, batch in enumerate(bar, start=1):
            losses.append(self.train_step(batch))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            for cb in self.callbacks:
                cb.on_step_end(self, epoch, step, steps)
        if config.train.schedule_over == "epochs" or epoch + 1 < config.optim.warmup_epochs:
            self.scheduler.step()
        return self.dist.mean(float(np.mean(losses)))

    def _freeze_encoder(self, epoch: int) -> None:
        """The encoder is frozen for the first ``train.freeze_encoder_epochs`` epochs (see
        ``the network's registry entry, medseg.models.registry``); gradients are dropped, not switched off, because
        DistributedDataParallel and ``torch.compile`` fix ``requires_grad`` when they wrap the model."""
        frozen = epoch < self.config.train.freeze_encoder_epochs
        if frozen == bool(self.frozen):
            return
        self.frozen = [p for _, p in encoder_parameters(self.model, self.config.model.name)] if frozen else []
        if self.dist.is_main:
            log.info("epoch %d: encoder %s", epoch + 1, f"frozen ({len(self.frozen)} tensors) until epoch "
                     f"{self.config.train.freeze_encoder_epochs}" if frozen else "unfrozen")

    def validate_epoch(self) -> list[float]:
        """Per foreground class mean validation Dice (NaN for a class absent from every case)."""
        assert self.val_loader is not None
        self.model.eval()
        return validate(self.predictor, self.val_loader, self.num_classes, self.dist)

    def _due_for_validation(self, epoch: int) -> bool:
        every = self.config.train.val_interval
        return self.val_loader is not None and ((epoch + 1) % every == 0 or epoch + 1 == self.config.train.epochs)

    def save_checkpoints(self, improved: bool) -> None:
        """``best.pt`` when this epoch improved, ``last.pt`` always (with the optimizer state), history.json."""
        s = self.state
        weights = self.model.state_dict()
        last_record = s.history[-1] if s.history else {}
        loop = {"epoch": s.epoch, "best_dice": s.best_dice, "best_epoch": s.best_epoch}
        if improved:
            validation = ValidationSummary(
                mean_dice=last_record.get("val_dice"), epoch=s.epoch + 1,
                per_class_dice={n: last_record[f"val_dice_{n}"] for n in self.foreground_names
                                if f"val_dice_{n}" in last_record})
            self.bundle.with_weights(weights, validation).save(self.run_dir / "best.pt", **loop)
        self.bundle.with_weights(weights).save(
            self.run_dir / "last.pt", **s.to_checkpoint(), optimizer_state=self.optimizer.state_dict(),
            scheduler_state=self.scheduler.state_dict(), scaler_state=self.scaler.state_dict())
        write_text_atomic(self.run_dir / "history.json", json.dumps(s.history, indent=1))

    def _should_stop(self, record: dict) -> bool:
        patience = self.config.train.early_stopping_patience
        if patience is not None and self.state.since_best >= patience:
            log.info("early stopping: no improvement in %d validations", patience)
            return True
        budget = self.config.train.max_minutes
        if budget is not None and record["elapsed_s"] >= 60 * budget:
            log.info("time budget of %.1f min reached after epoch %d", budget, record["epoch"])
            return True
        return False

    # --- the whole run -------------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> TrainResult:
        """Train to the configured end (epochs, early stopping or time budget); returns the best checkpoint.

        Resuming a run that already reached its end trains nothing and returns its result.
        """
        if resume:
            done = self._finished_run()
            if done is not None:
                return done
        self.setup(resume)
        s = self.state
        for cb in self.callbacks:
            cb.on_fit_start(self)
        elapsed_before, t0 = s.elapsed_s, time.monotonic()
        result: TrainResult | None = None
        try:
            for epoch in range(s.epoch + 1, self.config.train.epochs):
                # Rank 0's clock for every process: the lr and the time budget must agree among them.
                self._set_time_schedule_lr(epoch, self.dist.broadcast(elapsed_before + time.monotonic() - t0))
                loss = self.train_epoch(epoch)
                record = {"epoch": epoch + 1, "loss": loss, "lr": self.optimizer.param_groups[0]["lr"],
                          "elapsed_s": elapsed_before + time.monotonic() - t0}
                if self._due_for_validation(epoch):
                    per_class = self.validate_epoch()
                    record["val_dice"] = float(np.nanmean(per_class)) if not all(np.isnan(per_class)) else 0.0
                    record.update({f"val_dice_{n}": d for n, d in zip(self.foreground_names, per_class, strict=True)})
                    improved = record["val_dice"] > s.best_dice
                    s.since_best = 0 if improved else s.since_best + 1
                else:
                    improved = not self.val_split  # without validation cases the latest epoch counts as best
                # Rank 0 validated; the others wait here for its record, so every process decides alike.
                record, improved, s.since_best = self.dist.broadcast((record, improved, s.since_best))
                if improved:
                    s.best_dice, s.best_epoch = record.get("val_dice", -1.0), epoch + 1
                s.epoch, s.elapsed_s = epoch, record["elapsed_s"]
                s.history.append(record)
                if self.dist.is_main:
                    self.save_checkpoints(improved)
                for cb in self.callbacks:
                    cb.on_epoch_end(self, record)
                if self._should_stop(record):
                    break
            chosen = None
            self.dist.barrier()  # rank 0's last checkpoints are on disk before anyone reads best.pt
            if self.config.train.choose_postprocessing and self.val_loader is not None \
                    and (self.run_dir / "best.pt").is_file():
                chosen = self.choose_postprocessing()
            if self.dist.is_main and (self.run_dir / "best.pt").is_file():
                # QC limits (docs/qc.md) go into the final best bundle, after the postprocessing choice.
                calibrate_bundle_file(self.run_dir / "best.pt", self.manifest, self.train_split, self.val_split,
                                      str(self.device), progress=not self._quiet)
            result = TrainResult(self.run_dir, self.run_dir / "best.pt", s.best_dice, s.best_epoch, s.epoch + 1,
                                 s.history, chosen)
        finally:
            for cb in self.callbacks:
                cb.on_fit_end(self, result)
            if result is not None:
                self.dist.barrier()  # the others wait for rank 0's last writes
            self.dist.shutdown()
        return result

    def _finished_run(self) -> TrainResult | None:
        """The result of the run folder's run when it already reached its end under this config, else None."""
        from medseg.training.progress import finished_reason

        prepare_run_dir(self.config, resume=True)  # the same errors as a resume that trains
        last = load_bundle(self.run_dir / "last.pt")
        state = LoopState.from_checkpoint(last.training_state)
        reason = finished_reason(self.config, state)
        if reason is None:
            return None
        self.dist.shutdown()
        if self.dist.is_main:
            log.info("%s: already finished (%d epochs, %s), nothing to do; to train on, raise train.epochs, "
                     "train.max_minutes or train.early_stopping_patience (--set)", self.run_dir, state.epoch + 1, reason)
        best = self.run_dir / "best.pt"
        chosen = None
        if (self.run_dir / "postprocessing.json").is_file():
            chosen = json.loads((self.run_dir / "postprocessing.json").read_text()).get("keep_largest_component")
        return TrainResult(self.run_dir, best if best.is_file() else self.run_dir / "last.pt", state.best_dice,
                           state.best_epoch, state.epoch + 1, state.history, chosen, already_finished=True)

    def choose_postprocessing(self) -> list[int]:
        """Enable keep-largest-component for the classes where it raised validation Dice (strictly), in the
        best bundle's inference settings and the run's ``config.yaml``; the numbers go to ``postprocessing.json``."""
        best = load_bundle(self.run_dir / "best.pt")
        self.model.load_state_dict(best.weights)
        self.model.eval()
        effect = postprocessing_effect(self.predictor, self.val_loader, self.num_classes, self.dist)
        chosen = [k for k, (before, after) in effect.items() if after > before]
        decided = self.config.model_copy(deep=True)
        decided.infer.keep_largest_component = chosen
        spec = best.spec.model_copy(update={
            "inference": best.inference.model_copy(update={"keep_largest_component": chosen}),
            "provenance": best.spec.provenance.model_copy(update={"config": decided.model_dump(mode="json")}),
        })
        if self.dist.is_main:
            self._write_postprocessing_choice(best, spec, decided, effect, chosen)
        log.info("postprocessing: keep largest component for classes %s (%s)", chosen or "none",
                 ", ".join(f"{k}: {b:.4f} -> {a:.4f}" for k, (b, a) in effect.items()))
        return chosen

    def _write_postprocessing_choice(self, best: ModelBundle, spec, decided: ExperimentConfig,
                                     effect: dict[int, tuple[float, float]], chosen: list[int]) -> None:
        ModelBundle(spec, best.weights).save(best.path, **best.training_state)
        write_text_atomic(self.run_dir / "config.yaml", dump_config(decided))
        record = {
            "rule": "keep the largest connected component of a class when that raises its mean validation Dice",
            "evaluated_on": "validation cases, preprocessed grid, best checkpoint",
            "checkpoint_epoch": best.training_state.get("best_epoch"),
            "classes": {str(k): {"dice": b, "dice_largest_component": a, "enabled": k in chosen}
                        for k, (b, a) in effect.items()},
            "keep_largest_component": chosen,
        }
        write_text_atomic(self.run_dir / "postprocessing.json", json.dumps(record, indent=1))


def default_callbacks(config: ExperimentConfig) -> list[TrainerCallback]:
    """Plain logs, honest progress, and the trackers of ``train.trackers``."""
    from medseg.training.progress import ProgressCallback

    callbacks: list[TrainerCallback] = [LogCallback(), ProgressCallback()]
    if "tensorboard" in config.train.trackers:
        callbacks.append(TensorBoardCallback())
    if "mlflow" in config.train.trackers:
        # An optional dependency: imported only when asked for.
        from medseg.training.tracking import MLflowCallback

        callbacks.append(MLflowCallback())
    if "wandb" in config.train.trackers:
        from medseg.training.tracking import WandbCallback

        callbacks.append(WandbCallback())
    return callbacks


def train(config: ExperimentConfig, resume: bool = False, device: str | None = None) -> TrainResult:
    """Train the configured network; returns the best checkpoint (by mean foreground validation Dice)."""
    return Trainer(config, device).fit(resume)
