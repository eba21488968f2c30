"""The preprocessing's intensity steps: the fast path's in-place CT window equals MONAI's transform."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medseg.config import IntensityConfig
from medseg.data.transforms import IMAGE, intensity_transforms, window_in_place


@pytest.mark.parametrize(("a_min", "a_max"), [(-1000.0, 400.0), (-160.0, 240.0), (-1350.0, 150.0)])
def test_in_place_ct_window_equals_monai_bit_for_bit(a_min, a_max):
    cfg = IntensityConfig(kind="ct_window", a_min=a_min, a_max=a_max)
    rng = np.random.default_rng(0)
    values = rng.uniform(-3000, 3000, (1, 17, 19, 23)).astype(np.float32)
    values.flat[:6] = [a_min, a_max, np.nextafter(np.float32(a_min), 0), -0.0, 0.0, 3071.0]  # edges of the window
    expected = intensity_transforms(cfg)[0]({IMAGE: torch.from_numpy(values.copy())})[IMAGE]
    image = torch.from_numpy(values.copy())
    out = window_in_place(cfg)(image)
    assert out.data_ptr() == image.data_ptr()  # no copy
    assert torch.equal(out, torch.as_tensor(expected))
    assert float(out.min()) == 0.0 and float(out.max()) == 1.0


@pytest.mark.parametrize("cfg", [IntensityConfig(kind="zscore"), IntensityConfig(kind="ct_zscore", mean=40, std=300),
                                 IntensityConfig(kind="none"), [IntensityConfig(), IntensityConfig(kind="zscore")]])
def test_other_intensity_configs_keep_the_monai_transforms(cfg):
    assert window_in_place(cfg) is None
