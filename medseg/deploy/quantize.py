"""Static int8 quantization of an ONNX export, calibrated on training patches.

ONNX Runtime's static quantization (QDQ format, int8 weights per output channel, uint8 activations: the
pairing its CPU kernels run with VNNI) needs the activation ranges of real inputs. They come from patches
of the model's own training cases, preprocessed and sampled as training samples them (foreground-weighted
crops of the patch size) but without augmentation, so the ranges are those the network sees at inference.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from medseg.config import AugmentationConfig
from medseg.data.manifest import load_manifest
from medseg.data.transforms import IMAGE, training_transforms
from medseg.errors import ExportError
from medseg.models.bundle import ModelBundle

log = logging.getLogger(__name__)


def calibration_patches(bundle: ModelBundle, count: int = 16, per_case: int | None = None,
                        seed: int = 0) -> list[np.ndarray]:
    """``count`` float32 patches (1, C, *roi) from the training cases of the bundle's manifest.

    Cases are taken in manifest order, ``per_case`` patches each (default: 2, more when there are too few
    cases for ``count``); sampling is seeded, so a calibration is reproducible.
    """
    import torch

    config = bundle.config
    try:
        manifest = load_manifest(config.data.manifest)
    except Exception as exc:  # a moved or missing manifest: say where calibration data was looked for
        raise ExportError(f"{bundle.path}: int8 calibration reads training patches from the model's manifest "
                          f"{config.data.manifest}, which cannot be used ({exc})") from None
    cases = manifest.split("train", config.data.fold) or manifest.cases
    roi = list(bundle.inference.roi_size)
    if per_case is None:
        per_case = max(2, -(-count // max(1, len(cases))))
    # The training sampler without augmentation, its patch set to the inference patch (the exported shape).
    plain = config.model_copy(update={
        "augmentation": AugmentationConfig(flip_prob=0.0, noise_prob=0.0, intensity_shift_prob=0.0),
        "train": config.train.model_copy(update={"samples_per_volume": per_case, "patch_size": roi}),
    })
    sample = training_transforms(plain)
    sample.set_random_state(seed)
    patches: list[np.ndarray] = []
    for case in cases:
        if len(patches) >= count:
            break
        label = manifest.label_path(case)
        if label is None:  # the sampler needs a label for its foreground weighting
            continue
        item = {IMAGE: str(manifest.image_path(case)), "label": str(label)}
        for crop in sample(item):
            image = torch.as_tensor(crop[IMAGE]).float()
            patches.append(image[None].numpy().astype(np.float32))
    if not patches:
        raise ExportError(f"{config.data.manifest}: no training cases to calibrate int8 quantization on")
    return patches[:count]


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol over a list of patches."""

    def __init__(self, input_name: str, patches: list[np.ndarray]):
        self.input_name = input_name
        self._iter: Iterator[np.ndarray] = iter(patches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        patch = next(self._iter, None)
        return None if patch is None else {self.input_name: patch}


def quantize_int8(onnx_fp32: Path, output: Path, patches: list[np.ndarray]) -> Path:
    """Write a statically quantized (QDQ, s8 weights per channel, u8 activations) copy of ``onnx_fp32``."""
    try:
        import onnx
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:
        raise ExportError("int8 quantization needs onnx and onnxruntime: pip install 'medseg[export]'") from None
    prepared = output.with_name(output.name + ".pre.onnx")
    try:
        # Shape inference and graph folding first, as ONNX Runtime recommends before static quantization.
        quant_pre_process(str(onnx_fp32), str(prepared), skip_symbolic_shape=True)
        input_name = onnx.load(str(prepared), load_external_data=False).graph.input[0].name
        quantize_static(str(prepared), str(output), _Reader(input_name, patches), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
    finally:
        prepared.unlink(missing_ok=True)
    log.info("quantized %s to int8 with %d calibration patches", onnx_fp32.name, len(patches))
    return output
