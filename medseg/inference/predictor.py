"""Sliding-window prediction of one scan, with the preprocessing inverted onto the scan's own grid.

The same :meth:`Predictor.probabilities` serves validation during training and ``medseg predict``,
so what is validated is what is shipped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Literal, overload

import cc3d
import nibabel as nib
import numpy as np
import torch
from monai import transforms as mt
from monai.data import MetaTensor
from monai.inferers import SliceInferer, SlidingWindowInferer
from torch import nn

from medseg.data.transforms import IMAGE, intensity_transforms, preprocessing, window_in_place
from medseg.errors import CheckpointError
from medseg.inference.backends import build_backend
from medseg.inference.precision import PrecisionChoice, choose_precision
from medseg.inference.qc import PredictionUncertainty, prediction_uncertainty
from medseg.inference.resampling import GridPlan
from medseg.inference.timing import StageTimes
from medseg.io.channels import check_channel_count
from medseg.io.nifti import mask_like
from medseg.io.scans import Scan, ScanReader, load_scan
from medseg.models.bundle import ModelBundle, load_bundle

log = logging.getLogger(__name__)


def resolve_device(device: str | None) -> torch.device:
    """``auto`` (or None) picks CUDA when present, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


_AUTOCAST_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


class Predictor:
    """Trained network(s) plus their preprocessing: scans in, label maps on the scans' grids out.

    Everything but the networks comes from one model bundle: preprocessing, patch, overlap, mirroring,
    keep-largest-component and precision. Several networks (e.g. the folds of a cross-validation) form an
    ensemble: their softmax probabilities are averaged. ``mirror_axes`` overrides the bundle's
    (test-time flips).
    """

    def __init__(self, model: nn.Module | Sequence[nn.Module], bundle: ModelBundle, device: torch.device,
                 mirror_axes: Sequence[int] | None = None):
        models = [model] if isinstance(model, nn.Module) else list(model)
        if not models:
            raise ValueError("Predictor needs at least one model")
        self.models = [m.to(device).eval() for m in models]
        if device.type == "cpu" and bundle.network.spatial_dims == 3:
            # oneDNN's 3D convolutions run about 1.2x faster on channels-last weights (same results up to
            # float rounding; docs/benchmarks.md "Predict speed and memory").
            self.models = [m.to(memory_format=torch.channels_last_3d) for m in self.models]
        self.model = self.models[0]
        self.bundle = bundle
        self.settings = bundle.inference
        self.mirror_axes = list(self.settings.mirror_axes if mirror_axes is None else mirror_axes)
        self.label_names = bundle.label_names
        self.device = device
        #: The network's precision and why (:mod:`medseg.inference.precision`); from_checkpoint sets it.
        self.precision = PrecisionChoice("float32", "as built")
        self.preprocess = preprocessing(bundle.spec.preprocessing, keys=(IMAGE,), load=False)
        self.intensity = mt.Compose(intensity_transforms(bundle.spec.preprocessing.intensity))
        #: The CT window as in-place arithmetic on the fast path (equal to ``intensity``; None: use that).
        self.window_in_place = window_in_place(bundle.spec.preprocessing.intensity)
        #: False sends every scan through MONAI's Spacingd/Invertd (the reference the fast path is tested against).
        self.separable = True
        infer = self.settings
        if bundle.network.spatial_dims == 2:
            # A 2D network runs slice by slice along the third (axial in RAS) axis of the 3D volume.
            self.inferer = SliceInferer(roi_size=infer.roi_size, spatial_dim=2, sw_batch_size=infer.sw_batch_size,
                                        overlap=infer.overlap, mode=infer.mode, progress=False)
        else:
            self.inferer = SlidingWindowInferer(roi_size=infer.roi_size, sw_batch_size=infer.sw_batch_size,
                                                overlap=infer.overlap, mode=infer.mode, progress=False)

    @classmethod
    def from_checkpoint(cls, model_path: Path | Sequence[Path], device: str | None = None,
                        mirror: bool | None = None, backend: str = "torch", model_file: Path | None = None,
                        precision: str = "float32") -> Predictor:
        """Load model bundles (run folders or files, ``weights_only=True``); several form an ensemble.

        The models of an ensemble must share labels, preprocessing and patch size (the folds of one
        config); keep-largest-component applies to the classes every member chose. ``mirror`` True flips
        over every spatial axis at test time, False never, None as each bundle says. ``backend`` runs each
        bundle's checked export (``RUN/exports/``, or ``model_file`` for one model) instead of its weights
        (:mod:`medseg.inference.backends`); ``precision`` bfloat16 for backends torch and openvino, ``auto``
        by the parity rule of :mod:`medseg.inference.precision`.
        """
        paths = [Path(model_path)] if isinstance(model_path, str | Path) else [Path(p) for p in model_path]
        if not paths:
            raise CheckpointError("no model given: pass a run folder or model file")
        bundles = [load_bundle(p) for p in paths]
        first = bundles[0]
        for other in bundles[1:]:
            for what, a, b in (("label names", first.label_names, other.label_names),
                               ("preprocessing", first.spec.preprocessing, other.spec.preprocessing),
                               ("spatial dims", first.network.spatial_dims, other.network.spatial_dims),
                               ("input channels", first.network.in_channels, other.network.in_channels),
                               ("patch size", first.inference.roi_size, other.inference.roi_size)):
                if a != b:
                    raise CheckpointError(f"{other.path}: its {what} differ from {first.path}'s, so they cannot "
                                          f"form an ensemble ({b} vs {a})")
        common = sorted(set.intersection(*(set(b.inference.keep_largest_component) for b in bundles)))
        inference = first.inference.model_copy(update={"keep_largest_component": common})
        ensemble = ModelBundle(first.spec.model_copy(update={"inference": inference}), first.weights, first.path)
        axes = None if mirror is None else (list(range(first.network.spatial_dims)) if mirror else [])
        if model_file is not None and len(bundles) > 1:
            raise CheckpointError("--model-file names one exported model; an ensemble finds each member's export")
        target = resolve_device(device)
        choice = choose_precision(precision, [b.spec for b in bundles], target, backend)
        log.info("network precision %s (%s)", choice.runtime, choice.reason)
        networks = [build_backend(b, backend, model_file, choice.runtime) for b in bundles]
        predictor = cls(networks, ensemble, target, mirror_axes=axes)
        predictor.precision = choice
        return predictor

    def _forward_with(self, model: nn.Module):
        def forward(x: torch.Tensor) -> torch.Tensor:
            out = model(x)
            # Deep-supervision networks return stacked heads while training only; eval gives one tensor.
            return out[0] if isinstance(out, list | tuple) else out

        return forward

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward_with(self.model)(x)

    @torch.no_grad()
    def probabilities(self, image: torch.Tensor, times: StageTimes | None = None) -> torch.Tensor:
        """Softmax class probabilities (B, K, ...) for a preprocessed batch (B, 1, ...), averaged over the
        ensemble's models and the mirrored copies (each flip along one axis, undone after). ``times`` gets the
        network's forward calls as ``network`` and the rest (window cutting, Gaussian-weighted stitching,
        flips, softmax) as ``sliding_window``."""
        image = image.to(self.device)
        dtype = _AUTOCAST_DTYPES.get(self.settings.precision)
        use_amp = self.device.type == "cuda" and dtype is not None and self.precision.cuda_autocast
        probs: torch.Tensor | None = None
        start = time.perf_counter()
        forward_s = 0.0

        def timed(net: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
            def run(x: torch.Tensor) -> torch.Tensor:
                nonlocal forward_s
                t = time.perf_counter()
                out = net(x)
                if out.device.type == "cuda":
                    torch.cuda.synchronize(out.device)  # kernels are asynchronous: count them here
                forward_s += time.perf_counter() - t
                return out
            return run

        with torch.autocast(self.device.type, dtype=dtype, enabled=use_amp):
            for model in self.models:
                forward = self._forward_with(model) if times is None else timed(self._forward_with(model))
                for axis in [None, *self.mirror_axes]:
                    flip = [] if axis is None else [axis + 2]
                    p = _softmax_(self.inferer(torch.flip(image, flip) if flip else image, forward).float())
                    p = torch.flip(p, flip) if flip else p
                    probs = p if probs is None else probs.add_(p)
        assert probs is not None
        members = len(self.models) * (1 + len(self.mirror_axes))
        if members > 1:
            probs.div_(members)  # in place: a second K x model-grid array would be the largest thing held
        if times is not None:
            times.add("network", forward_s)
            times.add("sliding_window", time.perf_counter() - start - forward_s)
        return probs

    def plan(self, affine: np.ndarray, shape: Sequence[int]) -> GridPlan | None:
        """The separable scan <-> model grid plan for a scan, or None when the MONAI path must be taken."""
        if not self.separable:
            return None
        pre = self.bundle.spec.preprocessing
        return GridPlan.for_scan(affine, shape, pre.orientation, pre.spacing)

    @overload
    def predict_image(self, reference: nib.Nifti1Image, with_uncertainty: Literal[False] = False,
                      times: StageTimes | None = None) -> nib.Nifti1Image: ...

    @overload
    def predict_image(self, reference: nib.Nifti1Image, with_uncertainty: Literal[True],
                      times: StageTimes | None = None) -> tuple[nib.Nifti1Image, PredictionUncertainty]: ...

    def predict_image(self, reference: nib.Nifti1Image, with_uncertainty: bool = False,
                      times: StageTimes | None = None
                      ) -> nib.Nifti1Image | tuple[nib.Nifti1Image, PredictionUncertainty]:
        """Label map (uint8) for an in-memory scan, with exactly its shape, affine and header geometry.

        ``with_uncertainty`` also returns the entropy summary of the probabilities on the model's grid
        (:func:`medseg.inference.qc.prediction_uncertainty`), for the QC flags. A multi-channel scan is one
        4D image (X, Y, Z, channel), as :func:`medseg.io.scans.load_volume` stacks it. ``times`` gets
        the seconds of stages resample_in, network, resample_out and statistics (:mod:`medseg.inference.timing`).
        """
        def stage(name: str):
            return times.stage(name) if times is not None else nullcontext()

        check_channel_count(reference, self.bundle.network.in_channels)
        array, meta = ScanReader().get_data(reference)
        plan = self.plan(reference.affine, array.shape) if array.ndim == 3 else None  # one channel: fast path
        uncertainty = None
        if plan is None:
            labels, uncertainty = self._labels_monai(array, meta, with_uncertainty, times)
        else:
            # Same steps as the MONAI path (reorient, resample linearly, intensity, network, linear inverse,
            # argmax), in slabs: the float32 scan and the K x scan-sized probabilities never exist.
            with stage("resample_in"):
                image = plan.scan_to_model(array).unsqueeze(0)
                image = self.window_in_place(image) if self.window_in_place is not None \
                    else torch.as_tensor(self.intensity({IMAGE: image})[IMAGE])
            probs = self.probabilities(image.unsqueeze(0), times)[0]
            del image
            with stage("statistics"):
                uncertainty = prediction_uncertainty(probs) if with_uncertainty else None
            with stage("resample_out"):
                probs = probs.half() if probs.device.type == "cpu" else probs  # halves the model-grid memory
                labels = plan.labels_on_scan(probs)
            del probs
        with stage("resample_out"):
            if self.settings.keep_largest_component:
                keep_largest_components(labels, self.settings.keep_largest_component)
            if plan is not None:
                labels = plan.oriented_to_scan(labels)
            mask = mask_like(labels, reference)
        return (mask, uncertainty) if uncertainty is not None else mask

    def _labels_monai(self, array: np.ndarray, meta: dict, with_uncertainty: bool = False,
                      times: StageTimes | None = None) -> tuple[np.ndarray, PredictionUncertainty | None]:
        """Labels on the scan grid through MONAI's Spacingd/Invertd (dense affine-grid resampling)."""
        times = times if times is not None else StageTimes()
        with times.stage("resample_in"):
            data = self.preprocess({IMAGE: MetaTensor(np.asarray(array, dtype=np.float32), meta=meta)})
            image = data[IMAGE]
        probs = self.probabilities(image.unsqueeze(0), times)[0].cpu()
        with times.stage("statistics"):
            uncertainty = prediction_uncertainty(probs.as_tensor() if isinstance(probs, MetaTensor) else probs) \
                if with_uncertainty else None
        with times.stage("resample_out"):
            data["pred"] = MetaTensor(probs, meta=dict(image.meta))
            # Invert orientation and resampling: probabilities go back to the source grid (linear), then argmax.
            inverted = mt.Invertd("pred", transform=self.preprocess, orig_keys=IMAGE, nearest_interp=False)(data)["pred"]
            return torch.argmax(inverted, dim=0).numpy().astype(np.uint8), uncertainty

    def predict_scan(self, scan: Scan | Path) -> nib.Nifti1Image:
        """Read a scan (NIfTI file or DICOM series) and return its label map on the scan's grid."""
        return self.predict_image(load_scan(scan))


def _softmax_(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the class axis (1), in place: a model-grid K-class array is the largest thing predict holds."""
    logits.sub_(logits.amax(dim=1, keepdim=True)).exp_()
    return logits.div_(logits.sum(dim=1, keepdim=True))


def keep_largest_components(labels: np.ndarray, classes: Sequence[int]) -> None:
    """In place on a 3D label map: each class in ``classes`` keeps only its largest 26-connected component
    (the rest becomes background), as MONAI's ``KeepLargestConnectedComponent(independent=True)`` does, in
    a fraction of its memory (cc3d on a boolean mask)."""
    for k in classes:
        mask = labels == k
        if mask.any():
            largest = cc3d.largest_k(mask, k=1, connectivity=26, binary_image=True)
            labels[mask & (largest == 0)] = 0
