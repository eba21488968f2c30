"""Adding a network is one module plus one registration: the config accepts its name, checks patches by its
downsampling rule, builds it and fine-tunes its encoder, with no other file touched."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from medseg.config import config_from_dict
from medseg.errors import ConfigError
from medseg.models.registry import (
    NetworkEntry,
    build_model,
    encoder_parameters,
    network_names,
    register_network,
    unregister_network,
)
from tests.conftest import REPO_ROOT


class _Tiny(nn.Module):
    """A throwaway network: one strided encoder convolution (4x down), an upsampling head."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.down = nn.Conv3d(in_channels, 4, kernel_size=4, stride=4)
        self.head = nn.ConvTranspose3d(4, num_classes, kernel_size=4, stride=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.down(x))


@pytest.fixture
def tiny_network():
    entry = register_network(NetworkEntry(
        "tiny_test_net", lambda cfg, in_channels, num_classes: _Tiny(in_channels, num_classes), r"down\.",
        lambda cfg: [4] * cfg.spatial_dims, "one 4x strided convolution"))
    yield entry
    unregister_network(entry.name)


def _raw(name: str, patch: list[int]) -> dict:
    return {"name": "t", "data": {"manifest": "m.json"}, "model": {"name": name, "channels": [4, 8]},
            "train": {"patch_size": patch}}


def test_a_registered_network_is_accepted_by_the_config_built_and_fine_tuned(tiny_network):
    assert "tiny_test_net" in network_names()
    config = config_from_dict(_raw("tiny_test_net", [8, 8, 12]), source="test")
    assert config.model.downsampling() == [4, 4, 4]
    model = build_model(config.model, 2, 3)
    assert model(torch.zeros(1, 2, 8, 8, 12)).shape == (1, 3, 8, 8, 12)
    assert [k for k, _ in encoder_parameters(model, "tiny_test_net")] == ["down.weight", "down.bias"]
    with pytest.raises(ConfigError, match=r"axis 2 is 10, not a positive multiple of 4 \(tiny_test_net downsamples "
                                          r"that axis 4x: one 4x strided convolution\)"):
        config_from_dict(_raw("tiny_test_net", [8, 8, 10]), source="test")


def test_an_unknown_network_is_refused_naming_the_registered_ones():
    with pytest.raises(ConfigError, match=r"model\.name.*unknown network 'vnet'; registered networks: unet, dynunet, "
                                          r"segresnet, deeplab"):
        config_from_dict(_raw("vnet", [8, 8, 8]), source="test")


def test_a_name_is_registered_once(tiny_network):
    with pytest.raises(ValueError, match="already registered"):
        register_network(tiny_network)


def test_loading_a_config_imports_no_torch():
    code = "import sys, medseg.config, medseg.models.registry; print('torch' in sys.modules, 'monai' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT,
                         env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"})
    assert out.stdout.split() == ["False", "False"]
