"""Builders of the MONAI networks in the registry (``unet``, ``dynunet``, ``segresnet``), from ``model``."""

from __future__ import annotations

from monai.networks.nets import DynUNet, SegResNet, UNet
from torch import nn

from medseg.config import ModelConfig


def strides_of(cfg: ModelConfig) -> list[int | tuple[int, ...]]:
    """Strides per level below the top; a per-axis list becomes a tuple, which MONAI convolutions accept."""
    if cfg.strides is None:
        return [2] * (len(cfg.channels) - 1)
    return [tuple(s) if isinstance(s, list) else s for s in cfg.strides]


def kernels_of(cfg: ModelConfig) -> list[int | tuple[int, ...]]:
    """Convolution kernel per level (3 each when not given)."""
    if cfg.kernel_sizes is None:
        return [3] * len(cfg.channels)
    return [tuple(k) if isinstance(k, list) else k for k in cfg.kernel_sizes]


def build_unet(cfg: ModelConfig, in_channels: int, num_classes: int) -> nn.Module:
    """MONAI's residual U-Net."""
    return UNet(
        spatial_dims=cfg.spatial_dims,
        in_channels=in_channels,
        out_channels=num_classes,
        channels=cfg.channels,
        strides=strides_of(cfg),
        num_res_units=cfg.num_res_units,
        norm=cfg.norm,
        dropout=cfg.dropout,
    )


def build_dynunet(cfg: ModelConfig, in_channels: int, num_classes: int) -> nn.Module:
    """MONAI's DynUNet (nnU-Net's network), with optional deep supervision."""
    strides = [1, *strides_of(cfg)]
    return DynUNet(
        spatial_dims=cfg.spatial_dims,
        in_channels=in_channels,
        out_channels=num_classes,
        kernel_size=kernels_of(cfg),
        strides=strides,
        upsample_kernel_size=strides[1:],
        filters=cfg.channels,
        norm_name=cfg.norm,
        dropout=cfg.dropout or None,
        deep_supervision=cfg.deep_supervision,
        deep_supr_num=max(1, min(2, len(strides) - 2)),
        res_block=cfg.num_res_units > 0,
    )


def build_segresnet(cfg: ModelConfig, in_channels: int, num_classes: int) -> nn.Module:
    """MONAI's SegResNet: ``init_filters`` from the first of ``model.channels``, one level per entry."""
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
