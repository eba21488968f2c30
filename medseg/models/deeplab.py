"""A DeepLab-style network: a strided convolutional encoder, an ASPP block (parallel dilated
convolutions and image pooling) and a light decoder with one skip connection, in 2D or 3D.

MONAI has no ASPP segmentation network of its own, so it is assembled from MONAI blocks
(``Convolution``, ``SimpleASPP``) rather than torchvision (which has no CPU build here).
"""

from __future__ import annotations

import torch
from monai.networks.blocks import Convolution, SimpleASPP
from torch import nn
from torch.nn import functional as F

from medseg.config import ModelConfig
from medseg.models.monai_nets import strides_of


class DeepLabASPP(nn.Module):
    """Encoder -> ASPP -> decoder with a skip from the first encoder stage; logits at input resolution."""

    def __init__(self, spatial_dims: int, in_channels: int, num_classes: int, channels: list[int],
                 strides: list[int | tuple[int, ...]], norm: str = "instance"):
        super().__init__()
        stages: list[nn.Module] = []
        prev = in_channels
        for i, ch in enumerate(channels):
            stride = 1 if i == 0 else strides[i - 1]
            stages.append(nn.Sequential(
                Convolution(spatial_dims, prev, ch, strides=stride, kernel_size=3, norm=norm, act="LEAKYRELU"),
                Convolution(spatial_dims, ch, ch, kernel_size=3, norm=norm, act="LEAKYRELU"),
            ))
            prev = ch
        self.encoder = nn.ModuleList(stages)
        aspp_per_branch = max(channels[-1] // 4, 8)
        self.aspp = SimpleASPP(spatial_dims, channels[-1], aspp_per_branch, kernel_sizes=(1, 3, 3, 3),
                               dilations=(1, 2, 4, 6), norm_type=norm, acti_type="LEAKYRELU")
        self.decoder = nn.Sequential(
            Convolution(spatial_dims, aspp_per_branch * 4 + channels[0], channels[0], kernel_size=3, norm=norm, act="LEAKYRELU"),
            Convolution(spatial_dims, channels[0], num_classes, kernel_size=1, conv_only=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.encoder[0](x)
        deep = skip
        for stage in self.encoder[1:]:
            deep = stage(deep)
        deep = self.aspp(deep)
        mode = "bilinear" if x.ndim == 4 else "trilinear"
        deep = F.interpolate(deep, size=skip.shape[2:], mode=mode, align_corners=False)
        return self.decoder(torch.cat([deep, skip], dim=1))


def build_deeplab(cfg: ModelConfig, in_channels: int, num_classes: int) -> nn.Module:
    """The registry's ``deeplab``: :class:`DeepLabASPP` from ``model`` (channels, strides, norm)."""
    return DeepLabASPP(cfg.spatial_dims, in_channels, num_classes, cfg.channels, strides_of(cfg), cfg.norm)
