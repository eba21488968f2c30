"""Sliding-window prediction of one scan, with the preprocessing inverted onto the scan's own grid.

The same :meth:`Predictor.probabilities` serves validation during training and ``medseg predict``,
so what is validated is what is shipped.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai import transforms as mt
from monai.data import MetaTensor
from monai.inferers import SliceInferer, SlidingWindowInferer
from torch import nn

from medseg.config import ExperimentConfig
from medseg.data.transforms import IMAGE, preprocessing
from medseg.io.nifti import mask_like
from medseg.io.scans import Scan, ScanReader, load_scan
from medseg.models import build_model
from medseg.models.checkpoint import load_checkpoint


def resolve_device(device: str | None) -> torch.device:
    """``auto`` (or None) picks CUDA when present, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Predictor:
    """A trained network plus its preprocessing: scans in, label maps on the scans' grids out."""

    def __init__(self, model: nn.Module, config: ExperimentConfig, label_names: dict[int, str], device: torch.device):
        self.model = model.to(device).eval()
        self.config = config
        self.label_names = label_names
        self.device = device
        self.preprocess = preprocessing(config, keys=(IMAGE,), load=False)
        infer = config.infer
        if config.model.spatial_dims == 2:
            # A 2D network runs slice by slice along the third (axial in RAS) axis of the 3D volume.
            self.inferer = SliceInferer(roi_size=config.roi_size, spatial_dim=2, sw_batch_size=infer.sw_batch_size,
                                        overlap=infer.overlap, mode=infer.mode, progress=False)
        else:
            self.inferer = SlidingWindowInferer(roi_size=config.roi_size, sw_batch_size=infer.sw_batch_size,
                                                overlap=infer.overlap, mode=infer.mode, progress=False)

    @classmethod
    def from_checkpoint(cls, model_path: Path, device: str | None = None) -> Predictor:
        """Load a run folder or checkpoint file (``weights_only=True``)."""
        ckpt = load_checkpoint(model_path)
        model = build_model(ckpt.config.model, ckpt.raw.get("in_channels", 1), len(ckpt.label_names))
        model.load_state_dict(ckpt.model_state)
        return cls(model, ckpt.config, ckpt.label_names, resolve_device(device))

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        # Deep-supervision networks return stacked heads while training only; eval gives one tensor.
        return out[0] if isinstance(out, list | tuple) else out

    @torch.no_grad()
    def probabilities(self, image: torch.Tensor) -> torch.Tensor:
        """Softmax class probabilities (B, K, ...) for a preprocessed batch (B, 1, ...), with optional mirroring."""
        image = image.to(self.device)
        use_amp = self.device.type == "cuda" and self.config.train.amp
        with torch.autocast(self.device.type, enabled=use_amp):
            probs = torch.softmax(self.inferer(image, self._forward).float(), dim=1)
            for axis in self.config.infer.mirror_axes:
                flip = [axis + 2]
                logits = self.inferer(torch.flip(image, flip), self._forward).float()
                probs += torch.flip(torch.softmax(logits, dim=1), flip)
        return probs / (1 + len(self.config.infer.mirror_axes))

    def predict_image(self, reference: nib.Nifti1Image) -> nib.Nifti1Image:
        """Label map (uint8) for an in-memory scan, with exactly its shape, affine and header geometry."""
        array, meta = ScanReader().get_data(reference)
        data = self.preprocess({IMAGE: MetaTensor(np.asarray(array, dtype=np.float32), meta=meta)})
        image = data[IMAGE]
        probs = self.probabilities(image.unsqueeze(0))[0].cpu()
        data["pred"] = MetaTensor(probs, meta=dict(image.meta))
        # Invert orientation and resampling: probabilities go back to the source grid (linear), then argmax.
        inverted = mt.Invertd("pred", transform=self.preprocess, orig_keys=IMAGE, nearest_interp=False)(data)["pred"]
        labels = torch.argmax(inverted, dim=0).numpy().astype(np.uint8)
        if self.config.infer.keep_largest_component:
            keep = mt.KeepLargestConnectedComponent(applied_labels=self.config.infer.keep_largest_component,
                                                    is_onehot=False, independent=True)
            labels = np.asarray(keep(labels[None])[0]).astype(np.uint8)
        return mask_like(labels, reference)

    def predict_scan(self, scan: Scan | Path) -> nib.Nifti1Image:
        """Read a scan (NIfTI file or DICOM series) and return its label map on the scan's grid."""
        return self.predict_image(load_scan(scan))
