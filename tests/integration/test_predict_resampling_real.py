"""The fast prediction path on a real CT gives the labels of MONAI's Spacingd/Invertd path.

Uses ../shared/data/lung_ct (a real chest CT, LPS-stored, 0.57 x 0.57 x 5 mm); skipped when it is absent.
A deterministic "network" whose output varies smoothly with intensity and position puts class boundaries
all over the scan, so the comparison is not decided by one dominant class.
"""

import nibabel as nib
import numpy as np
import torch
from torch import nn

from medseg.inference.predictor import Predictor
from medseg.models.bundle import ModelBundle
from tests.conftest import tiny_config


class SmoothCT(nn.Module):
    """Three classes from windowed intensity and depth: air-like, tissue-like, and a depth ramp."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ramp = torch.linspace(-1, 1, x.shape[4])[None, None, None, None, :].expand_as(x)
        return torch.cat([1 - 2 * x, 2 * x - 1, 0.2 + 0.5 * ramp], dim=1) * 3


def test_fast_path_labels_agree_with_monai_on_a_real_ct(shared_data):
    ct = nib.load(shared_data / "lung_ct" / "lung1_ct.nii.gz")
    # A real 192 x 192 x 48 block of the scan (keeps the test quick), with its true geometry.
    block = ct.slicer[160:352, 160:352, :]
    scan = nib.Nifti1Image(np.asarray(block.dataobj), block.affine, block.header)
    config = tiny_config("m.json", "out")
    raw = config.model_dump(mode="json")
    raw["preprocessing"]["spacing"] = [0.8, 0.8, 2.5]  # ct_lung's model grid
    raw["train"]["patch_size"] = [96, 96, 32]  # few windows: the network is not what is tested
    bundle = ModelBundle.from_config(type(config).model_validate(raw), {0: "air", 1: "tissue", 2: "ramp"}, 1)
    predictor = Predictor(SmoothCT(), bundle, torch.device("cpu"))
    fast = np.asarray(predictor.predict_image(scan).dataobj)
    predictor.separable = False
    reference = np.asarray(predictor.predict_image(scan).dataobj)
    assert min(np.bincount(reference.ravel(), minlength=3)) > 0.01 * reference.size, "every class must occur"
    assert (fast == reference).mean() >= 0.999
