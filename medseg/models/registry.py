"""The network registry: one entry per network, carrying every per-network fact.

An entry (:class:`NetworkEntry`) knows the network's config name (``model.name``), its builder, the
parameter names of its encoder (``train.freeze_encoder_epochs`` freezes them) and its downsampling rule
(a patch side must be a multiple of it; :meth:`medseg.config.ModelConfig.downsampling` asks it). The
config's allowed names, fine-tuning and patch checks all read this table, so adding a network is one
module (its builder) plus one :func:`register_network` call (docs/extending.md).

This module imports neither torch nor MONAI: builders are named ``"module:function"`` and imported when a
network is built, so loading a config stays cheap. It imports nothing from :mod:`medseg.config` either
(config asks it); the rules read a :class:`NetworkLayout`, which ``ModelConfig`` is.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch
    from torch import nn


class NetworkLayout(Protocol):
    """What a downsampling rule reads of ``model``: :class:`medseg.config.ModelConfig` is one."""

    name: str
    spatial_dims: int
    channels: list[int]
    strides: Sequence[int | list[int]] | None


def strided_downsampling(cfg: NetworkLayout) -> list[int]:
    """Per axis, the product of ``model.strides`` along it (2 per level below the top when not given)."""
    strides = cfg.strides if cfg.strides is not None else [2] * (len(cfg.channels) - 1)
    per_level = [s if isinstance(s, list) else [s] * cfg.spatial_dims for s in strides]
    return [math.prod(level[axis] for level in per_level) for axis in range(cfg.spatial_dims)]


def per_level_downsampling(cfg: NetworkLayout) -> list[int]:
    """2x per level below the top of ``model.channels`` on every axis (networks built from channels alone)."""
    return [2 ** (len(cfg.channels) - 1)] * cfg.spatial_dims


def any_size(cfg: NetworkLayout) -> None:
    """No constraint: the network resizes its deep features to any input size."""
    return None


#: A network builder: ``(model config, input channels, classes) -> nn.Module`` giving one logit per class.
Builder = Callable[[Any, int, int], "nn.Module"]


@dataclass(frozen=True)
class NetworkEntry:
    """One network: its config name, builder, encoder parameter pattern and downsampling rule."""

    name: str
    #: ``"package.module:function"`` (imported when a network is built) or the function itself.
    builder: str | Builder
    #: Regex matched against ``named_parameters()`` names: the encoder that ``train.freeze_encoder_epochs``
    #: freezes (the contracting path down to the deepest level; decoder and heads are not encoder).
    encoder_pattern: str
    #: Overall downsampling factor per spatial axis (a patch side must be a multiple), or None for any size.
    downsampling: Callable[[NetworkLayout], list[int] | None] = strided_downsampling
    #: Why the factor is what it is, in the words of a config error message.
    downsampling_rule: str = "the product of model.strides along it"

    def build_function(self) -> Builder:
        """The builder, imported on first use."""
        if callable(self.builder):
            return self.builder
        module, _, function = self.builder.partition(":")
        return getattr(importlib.import_module(module), function)


#: Every registered network by config name, in registration order.
MODEL_REGISTRY: dict[str, NetworkEntry] = {}


def register_network(entry: NetworkEntry, *, replace: bool = False) -> NetworkEntry:
    """Add a network to the registry (``replace`` to redefine a name); returns the entry."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", entry.name):
        raise ValueError(f"network name {entry.name!r}: use lower-case letters, digits and _")
    if entry.name in MODEL_REGISTRY and not replace:
        raise ValueError(f"a network named {entry.name!r} is already registered")
    re.compile(entry.encoder_pattern)  # a broken pattern fails here, not at the first fine-tuning
    MODEL_REGISTRY[entry.name] = entry
    return entry


def unregister_network(name: str) -> None:
    """Remove a network (tests registering a throwaway one clean up with this)."""
    MODEL_REGISTRY.pop(name, None)


def network_names() -> list[str]:
    """The config names of every registered network."""
    return list(MODEL_REGISTRY)


def network_entry(name: str) -> NetworkEntry:
    """The entry of ``name``; a ValueError naming the registered ones otherwise."""
    try:
        return MODEL_REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown network {name!r}; registered: {', '.join(MODEL_REGISTRY)}") from None


# MONAI's UNet nests each level as Sequential(down, SkipConnection(next level), up), so its encoder is
# every ``...0.`` (down) and the innermost SkipConnection's bottom layer.
register_network(NetworkEntry("unet", "medseg.models.monai_nets:build_unet",
                              r"model\.(?:1\.submodule\.)*(?:0\.|1\.submodule\.(?!\d))"))
register_network(NetworkEntry("dynunet", "medseg.models.monai_nets:build_dynunet",
                              r"(?:input_block|downsamples|bottleneck)\."))
register_network(NetworkEntry("segresnet", "medseg.models.monai_nets:build_segresnet", r"(?:convInit|down_layers)\.",
                              per_level_downsampling, "2x per level below the top of model.channels"))
register_network(NetworkEntry("deeplab", "medseg.models.deeplab:build_deeplab", r"(?:encoder|aspp)\.", any_size,
                              "none: its deep features are resized to the input"))


def encoder_parameters(model: nn.Module, name: str) -> list[tuple[str, nn.Parameter]]:
    """The encoder's parameters of a network built by :func:`build_model` for the registry ``name``."""
    pattern = re.compile(network_entry(name).encoder_pattern)
    return [(key, p) for key, p in model.named_parameters() if pattern.match(key)]


def build_model(cfg: Any, in_channels: int, num_classes: int) -> nn.Module:
    """The network named by ``cfg.name`` (a :class:`medseg.config.ModelConfig`); ``num_classes`` logits per voxel."""
    return network_entry(cfg.name).build_function()(cfg, in_channels, num_classes)


def count_parameters(model: torch.nn.Module) -> int:
    """Trainable parameter count."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
