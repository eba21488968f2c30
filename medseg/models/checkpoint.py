"""Checkpoints: everything needed to predict (weights, config, label names) and to resume training.

Only tensors and plain Python containers are stored, so ``torch.load(..., weights_only=True)`` reads
them; a checkpoint from an untrusted source cannot run code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medseg.atomic import write_atomic
from medseg.config import ExperimentConfig, config_from_dict
from medseg.errors import CheckpointError

CHECKPOINT_FORMAT = "medseg-checkpoint-1"


@dataclass
class LoadedCheckpoint:
    """A checkpoint read back: the validated config, label names and the raw state dicts."""

    path: Path
    config: ExperimentConfig
    label_names: dict[int, str]
    model_state: dict[str, torch.Tensor]
    raw: dict[str, Any]


def save_checkpoint(path: Path, *, config: ExperimentConfig, label_names: dict[int, str],
                    model_state: dict[str, torch.Tensor], **training_state: Any) -> Path:
    """Write a checkpoint atomically (temporary file, then rename)."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "config": config.model_dump(mode="json"),
        "label_names": {int(k): str(v) for k, v in label_names.items()},
        "in_channels": 1,
        "model_state": model_state,
        **training_state,
    }
    return write_atomic(Path(path), lambda tmp: torch.save(payload, tmp))


def resolve_checkpoint(model: Path) -> Path:
    """A checkpoint file as given, or a run folder's ``best.pt`` (else ``last.pt``)."""
    model = Path(model)
    if model.is_dir():
        for name in ("best.pt", "last.pt"):
            if (model / name).is_file():
                return model / name
        raise CheckpointError(f"{model}: run folder holds no best.pt or last.pt")
    if not model.is_file():
        raise CheckpointError(f"{model}: no such checkpoint file or run folder")
    return model


def load_checkpoint(model: Path) -> LoadedCheckpoint:
    """Read a checkpoint (or a run folder's best one) with ``weights_only=True``."""
    path = resolve_checkpoint(model)
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable medseg checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(raw, dict) or raw.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a medseg checkpoint (expected format {CHECKPOINT_FORMAT})")
    config = config_from_dict(raw["config"], source=f"{path} (embedded config)")
    return LoadedCheckpoint(path, config, {int(k): v for k, v in raw["label_names"].items()}, raw["model_state"], raw)
