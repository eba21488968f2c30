"""Fine-tuning: start a run from another run's weights (``train.init_from``) and freeze its encoder.

Weights are matched by name and shape. The only tensors allowed to differ are the network's
class-dependent ones (the output layer and deep-supervision heads, found by building the same
architecture with another class count): when the source model's classes differ from this run's
(count or names), those keep their fresh initialisation. Any other difference means another
architecture, which is refused naming both.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from medseg.config import ModelConfig
from medseg.errors import CheckpointError
from medseg.models.bundle import InitFromRecord, load_bundle
from medseg.models.registry import build_model

log = logging.getLogger(__name__)


@dataclass
class TransferReport:
    """What :func:`load_matching_weights` did: tensors loaded, re-initialised heads, unused source tensors."""

    source: Path
    loaded: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    classes_differ: bool = False
    source_sha256: str = ""

    def describe(self) -> str:
        skipped = self.reinitialised + self.unused
        names = ", ".join(skipped[:6]) + (", ..." if len(skipped) > 6 else "")
        why = " (classes differ: output layer re-initialised)" if self.classes_differ else ""
        return (f"init_from {self.source}: loaded {len(self.loaded)} tensors, skipped {len(skipped)}"
                + (f" ({names})" if skipped else "") + why)

    def record(self) -> InitFromRecord:
        """The bundle provenance entry (the source's file name and checksum, the counts)."""
        return InitFromRecord(source=self.source.name, source_weights_sha256=self.source_sha256,
                              loaded=len(self.loaded), reinitialised=self.reinitialised, unused=self.unused)


def _describe(arch: ModelConfig, num_classes: int, in_channels: int) -> str:
    return (f"{arch.name} channels {arch.channels} strides {arch.strides} kernels {arch.kernel_sizes} "
            f"res units {arch.num_res_units}, {in_channels} input channel(s), {num_classes} classes")


def class_dependent(arch: ModelConfig, in_channels: int, num_classes: int) -> set[str]:
    """Names of the tensors whose shape depends on the class count (output layer, deep-supervision heads)."""
    a = build_model(arch, in_channels, num_classes).state_dict()
    b = build_model(arch, in_channels, num_classes + 1).state_dict()
    return {k for k, v in a.items() if k not in b or b[k].shape != v.shape}


def load_matching_weights(model: nn.Module, arch: ModelConfig, in_channels: int, label_names: dict[int, str],
                          source: Path) -> TransferReport:
    """Copy into ``model`` the weights of the bundle or run folder ``source`` that match by name and shape.

    When the source's classes differ from ``label_names`` its class-dependent tensors are not used (the
    model keeps their fresh initialisation). Raises :class:`CheckpointError` naming both networks when
    anything else does not fit.
    """
    bundle = load_bundle(source)
    report = TransferReport(source=bundle.path or Path(source), source_sha256=bundle.spec.provenance.weights_sha256)
    num_classes = len(label_names)
    report.classes_differ = bundle.label_names != label_names
    heads = class_dependent(arch, in_channels, num_classes)
    target = model.state_dict()
    weights = bundle.weights
    mismatched = []
    to_load: dict[str, torch.Tensor] = {}
    for key, tensor in target.items():
        src = weights.get(key)
        if key in heads and report.classes_differ:
            report.reinitialised.append(key)
        elif src is None or src.shape != tensor.shape:
            (report.reinitialised if key in heads else mismatched).append(key)
        else:
            to_load[key] = src
    report.unused = [k for k in weights if k not in target]
    theirs = _describe(bundle.network.architecture, bundle.network.num_classes, bundle.network.in_channels)
    ours = _describe(arch, num_classes, in_channels)
    if mismatched or [k for k in report.unused if k not in class_dependent(
            bundle.network.architecture, bundle.network.in_channels, bundle.network.num_classes)]:
        example = ", ".join((mismatched or report.unused)[:3])
        raise CheckpointError(
            f"{report.source}: train.init_from does not fit this network beyond its output layer "
            f"({len(mismatched)} tensors differ or are missing, e.g. {example}).\n  source: {theirs}\n  this run: {ours}")
    model.load_state_dict(to_load, strict=False)
    report.loaded = sorted(to_load)
    return report
