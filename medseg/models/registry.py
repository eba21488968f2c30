"""The model registry: one builder per network name. Adding a network is one entry in ``MODEL_REGISTRY``."""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from monai.networks.nets import DynUNet, SegResNet, UNet
from torch import nn

from medseg.config import ModelConfig
from medseg.models.deeplab import DeepLabASPP


def _strides(cfg: ModelConfig) -> list[int | tuple[int, ...]]:
    """Strides per level below the top; a per-axis list becomes a tuple, which MONAI convolutions accept."""
    if cfg.strides is None:
        return [2] * (len(cfg.channels) - 1)
    return [tuple(s) if isinstance(s, list) else s for s in cfg.strides]


def _kernels(cfg: ModelConfig) -> list[int | tuple[int, ...]]:
    if cfg.kernel_sizes is None:
        return [3] * len(cfg.channels)
    return [tuple(k) if isinstance(k, list) else k for k in cfg.kernel_sizes]


def _unet(cfg: ModelConfig, in_channels: int, num_classes: int) -> nn.Module:
    return UNet(
        spatial_dims=cfg.spatial_dims,
        in_channels=in_channels,
        out_channels=num_classes,
        channels=cfg.channels,
        strides=_strides(cfg),
        num_res_units=cfg.num_res_units,
        norm=cfg.norm,
        dropout=cfg.dropout,
    )


def _dynunet(cfg: ModelConfig, in_channels: int, num_classes: int) -> nn.Module:
    strides = [1, *_strides(cfg)]
    return DynUNet(
        spatial_dims=cfg.spatial_dims,
        in_channels=in_channels,
        out_channels=num_classes,
        kernel_size=_kernels(cfg),
        strides=strides,
        upsample_kernel_size=strides[1:],
        filters=cfg.channels,
        norm_name=cfg.norm,
        dropout=cfg.dropout or None,
        deep_supervision=cfg.deep_supervision,
        deep_supr_num=max(1, min(2, len(strides) - 2)),
        res_block=cfg.num_res_units > 0,
    )


def _segresnet(cfg: ModelConfig, in_channels: int, num_classes: int) -> nn.Module:
    return SegResNet(
        spatial_dims=cfg.spatial_dims,
        in_channels=in_channels,
        out_channels=num_classes,
        init_filters=cfg.channels[0],
        blocks_down=tuple([1] + [2] * (len(cfg.channels) - 1)),
        blocks_up=tuple([1] * (len(cfg.channels) - 1)),
        norm=cfg.norm,
        dropout_prob=cfg.dropout or None,
    )


def _deeplab(cfg: ModelConfig, in_channels: int, num_classes: int) -> nn.Module:
    return DeepLabASPP(cfg.spatial_dims, in_channels, num_classes, cfg.channels, _strides(cfg), cfg.norm)


MODEL_REGISTRY: dict[str, Callable[[ModelConfig, int, int], nn.Module]] = {
    "unet": _unet,
    "dynunet": _dynunet,
    "segresnet": _segresnet,
    "deeplab": _deeplab,
}


# The encoder of each network, by parameter name (``train.freeze_encoder_epochs`` fixes these): the
# contracting path down to and including the deepest level; the decoder, skips' up-convolutions and
# output heads are not encoder. MONAI's UNet nests each level as Sequential(down, SkipConnection(next
# level), up), so its encoder is every ``...0.`` (down) and the innermost SkipConnection's bottom layer.
ENCODER_PATTERNS: dict[str, str] = {
    "unet": r"model\.(?:1\.submodule\.)*(?:0\.|1\.submodule\.(?!\d))",
    "dynunet": r"(?:input_block|downsamples|bottleneck)\.",
    "segresnet": r"(?:convInit|down_layers)\.",
    "deeplab": r"(?:encoder|aspp)\.",
}


def encoder_parameters(model: nn.Module, name: str) -> list[tuple[str, nn.Parameter]]:
    """The encoder's parameters of a network built by :func:`build_model` for the registry ``name``."""
    pattern = re.compile(ENCODER_PATTERNS[name])
    return [(key, p) for key, p in model.named_parameters() if pattern.match(key)]


def build_model(cfg: ModelConfig, in_channels: int, num_classes: int) -> nn.Module:
    """The network named by ``cfg.name``; output is ``num_classes`` logits per voxel."""
    return MODEL_REGISTRY[cfg.name](cfg, in_channels, num_classes)


def count_parameters(model: torch.nn.Module) -> int:
    """Trainable parameter count."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
