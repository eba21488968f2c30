"""``medseg export``: a model bundle as ONNX (fp32 or static int8) or TorchScript, checked against eager.

An export is written only after it agrees with the eager network on real data:

- **logits** on a real patch (the centre patch of a real scan, preprocessed as at inference): the largest
  absolute difference must be at most ``atol`` times the largest eager logit (at least 1) (fp32
  exports; reported for int8);
- **masks** on that whole scan (sliding window, inversion, keep-largest-component, as ``medseg predict``):
  the Dice of the exported model's mask against the eager one, per foreground class, must be at least
  ``min_dice`` (a class both leave empty counts as agreement, 1.0).

Every runtime installed that runs the format is checked (ONNX: ONNX Runtime and OpenVINO). A model that
differs raises :class:`~medseg.errors.ExportError` and nothing is written. The file goes with a sidecar
``FILE.json`` (format, opset, precision, parity figures, the bundle's ``weights_sha256``, the file's own
SHA-256) that :mod:`medseg.inference.backends` checks before use. The patch size is fixed by the bundle;
the batch axis is dynamic. Deep-supervision heads are not exported (only the main output).

ONNX uses the ``torch.export``-based exporter (``dynamo=True``, torch's default since 2.9; needs
onnxscript): the TorchScript-based one still works in torch 2.13 but is deprecated (docs/deploy.md).
"""

from __future__ import annotations

import json
import logging
import platform
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
import torch
from monai import transforms as mt
from monai.data import MetaTensor
from torch import nn

from medseg import __version__
from medseg.atomic import write_atomic, write_text_atomic
from medseg.data.manifest import load_manifest
from medseg.data.transforms import IMAGE, preprocessing
from medseg.errors import ExportError, MedsegError
from medseg.inference.backends import (
    EXPORT_DIR,
    EXPORT_NAMES,
    SIDECAR_FORMAT,
    MainOutput,
    OnnxRuntimeNetwork,
    OpenVinoNetwork,
    TorchScriptNetwork,
    file_sha256,
    sidecar_path,
)
from medseg.inference.predictor import Predictor
from medseg.io.scans import ScanReader, load_scan
from medseg.models.bundle import ModelBundle, load_bundle, weights_sha256

log = logging.getLogger(__name__)

ExportFormat = Literal["onnx", "torchscript"]
ONNX_OPSET = 18
CPU = torch.device("cpu")


@dataclass
class Parity:
    """How one runtime's export compares with the eager network (figures stored in the sidecar)."""

    runtime: str
    max_abs_logit_diff: float
    max_abs_logit: float
    patch_shape: list[int]
    dice: dict[str, float]
    scan_shape: list[int]
    atol: float | None
    min_dice: float

    @property
    def min_class_dice(self) -> float:
        return min(self.dice.values()) if self.dice else 1.0

    @property
    def logit_limit(self) -> float | None:
        """``atol`` scaled by the logits' size (at least 1): float32 rounding grows with the values summed."""
        return None if self.atol is None else self.atol * max(1.0, self.max_abs_logit)

    @property
    def passed(self) -> bool:
        logits_ok = self.logit_limit is None or self.max_abs_logit_diff <= self.logit_limit
        return logits_ok and self.min_class_dice >= self.min_dice

    def describe(self) -> str:
        tol = f" (limit {self.logit_limit:.2g})" if self.logit_limit is not None else " (not limited: quantized)"
        dice = ", ".join(f"{k} {v:.4f}" for k, v in self.dice.items())
        return (f"{self.runtime}: max |Δlogit| {self.max_abs_logit_diff:.2e}{tol} on a real patch "
                f"{self.patch_shape} (logits up to {self.max_abs_logit:.1f}); mask Dice vs eager on a real scan "
                f"{self.scan_shape}: {dice} (limit {self.min_dice})")


@dataclass
class ExportResult:
    """What ``medseg export`` wrote."""

    path: Path
    sidecar: Path
    format: str
    precision: str
    parity: list[Parity] = field(default_factory=list)
    seconds: float = 0.0

    def describe(self) -> str:
        lines = [f"wrote {self.path} ({self.format}, {self.precision}) and {self.sidecar.name}"]
        lines += [f"  parity {p.describe()}" for p in self.parity]
        return "\n".join(lines)


def mask_agreement(a: np.ndarray, b: np.ndarray, label_names: dict[int, str]) -> dict[str, float]:
    """Dice of two label maps per foreground class, by name; a class both leave empty agrees (1.0)."""
    out: dict[str, float] = {}
    for value, name in label_names.items():
        if value == 0:
            continue
        x, y = a == value, b == value
        total = int(x.sum()) + int(y.sum())
        out[name] = 1.0 if total == 0 else 2.0 * int(np.count_nonzero(x & y)) / total
    return out


def default_scan(bundle: ModelBundle) -> Path:
    """A real scan to check parity on: the first test case of the model's manifest (else val, else train)."""
    manifest_path = bundle.config.data.manifest
    try:
        manifest = load_manifest(manifest_path)
    except MedsegError as exc:
        raise ExportError(f"{bundle.path}: no --scan given and the model's manifest is unusable ({exc}); "
                          "pass --scan with a real scan to check the export on") from None
    for split in ("test", "val", "train"):
        cases = manifest.split(split)
        if cases:
            return manifest.image_path(cases[0])
    raise ExportError(f"{manifest_path}: lists no cases; pass --scan")


def real_patch(bundle: ModelBundle, image: nib.Nifti1Image) -> torch.Tensor:
    """The centre patch (1, C, *roi) of a scan, preprocessed as at inference (zero-padded where smaller)."""
    preprocess = preprocessing(bundle.spec.preprocessing, keys=(IMAGE,), load=False)
    array, meta = ScanReader().get_data(image)
    volume = preprocess({IMAGE: MetaTensor(np.asarray(array, dtype=np.float32), meta=meta)})[IMAGE]
    volume = torch.as_tensor(volume).float()
    roi = list(bundle.inference.roi_size)
    if len(roi) == 2:  # a 2D network sees axial slices: the middle one
        volume = volume[..., volume.shape[-1] // 2]
    crop = mt.Compose([mt.SpatialPad(roi), mt.CenterSpatialCrop(roi)])
    return torch.as_tensor(crop(volume)).float()[None]


class ParityCheck:
    """The eager network's logits on a real patch and mask of a real scan, computed once, to compare exports with."""

    def __init__(self, bundle: ModelBundle, scan: Path, atol: float | None, min_dice: float):
        self.bundle = bundle
        self.image = load_scan(scan)
        self.patch = real_patch(bundle, self.image)
        self.atol, self.min_dice = atol, min_dice
        eager = MainOutput(bundle.build_network()).eval()
        with torch.no_grad():
            self.logits = eager(self.patch)
        self.mask = self._mask(eager)

    def _mask(self, network: nn.Module) -> np.ndarray:
        predictor = Predictor(network, self.bundle, CPU, mirror_axes=[])
        return np.asarray(predictor.predict_image(self.image).dataobj)

    def compare(self, runtime: str, network: nn.Module) -> Parity:
        with torch.no_grad():
            logits = network(self.patch)
        diff = float((logits - self.logits).abs().max()) if logits.shape == self.logits.shape else float("inf")
        return Parity(runtime, diff, float(self.logits.abs().max()), list(self.patch.shape),
                      mask_agreement(self._mask(network), self.mask, self.bundle.label_names),
                      list(self.image.shape[:3]), self.atol, self.min_dice)


def _export_onnx(network: nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    try:
        import onnxscript  # noqa: F401  (the torch.export-based exporter translates through it)
    except ImportError:
        raise ExportError("ONNX export needs onnx and onnxscript: pip install 'medseg[export]'") from None
    batch = torch.export.Dim("batch", min=1, max=4096)
    # The exporter's and optimiser's chatter (unregistered torchvision ops, each folded initializer) is not the user's.
    for name in ("torch.onnx", "onnxscript", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.onnx.export(network, (example,), str(path), dynamo=True, input_names=["image"], output_names=["logits"],
                      dynamic_shapes=({0: batch},), opset_version=opset, external_data=False, verbose=False)


def _export_torchscript(network: nn.Module, example: torch.Tensor, path: Path) -> None:
    with torch.no_grad():
        traced = torch.jit.trace(network, example, check_trace=False)
    torch.jit.save(traced, str(path))


def _runtimes(fmt: str, path: Path) -> list[tuple[str, nn.Module]]:
    """The runtimes installed here that run ``fmt``, each loading ``path``."""
    if fmt == "torchscript":
        return [("torchscript", TorchScriptNetwork(path))]
    found: list[tuple[str, nn.Module]] = []
    try:
        found.append(("onnxruntime", OnnxRuntimeNetwork(path)))
    except MedsegError:
        pass
    try:
        found.append(("openvino", OpenVinoNetwork(path)))
    except MedsegError:
        pass
    if not found:
        raise ExportError("no ONNX runtime installed to check the export with: pip install 'medseg[export]'")
    return found


def export_model(run: Path, fmt: ExportFormat = "onnx", output: Path | None = None, scan: Path | None = None,
                 int8: bool = False, atol: float = 1e-3, min_dice: float | None = None,
                 calibration_patches: int = 16, overwrite: bool = False, opset: int = ONNX_OPSET) -> ExportResult:
    """Export the bundle of ``run`` (run folder or bundle file) and write it only if it matches eager.

    ``output`` defaults to ``RUN/exports/model.onnx`` (``model.int8.onnx``, ``model.torchscript.pt``).
    ``scan`` is the real scan parity is checked on (default: the first test case of the model's manifest).
    ``int8`` quantizes an ONNX export statically, calibrated on ``calibration_patches`` training patches;
    its logits differ by design, so only the mask Dice is enforced. ``min_dice`` defaults to 0.99 (fp32)
    and 0.97 (int8).
    """
    import time

    start = time.perf_counter()
    if fmt not in ("onnx", "torchscript"):
        raise ExportError(f"unknown export format {fmt!r}: onnx or torchscript")
    if int8 and fmt != "onnx":
        raise ExportError("int8 quantization is for ONNX exports (--format onnx)")
    bundle = load_bundle(run)
    assert bundle.path is not None
    precision = "int8" if int8 else "float32"
    output = Path(output) if output is not None else bundle.path.parent / EXPORT_DIR / EXPORT_NAMES[(fmt, precision)]
    if output.exists() and not overwrite:
        raise ExportError(f"{output}: already exists (use --overwrite to replace it)")
    if min_dice is None:
        min_dice = 0.97 if int8 else 0.99
    check = ParityCheck(bundle, Path(scan) if scan is not None else default_scan(bundle),
                        None if int8 else atol, min_dice)
    network = MainOutput(bundle.build_network()).eval()
    # Batch 2 as the example: torch.export would specialise a batch of 1 as a constant.
    example = torch.cat([check.patch, check.patch])
    parity: list[Parity] = []

    def write(tmp: Path) -> None:
        if fmt == "torchscript":
            _export_torchscript(network, example, tmp)
        elif not int8:
            _export_onnx(network, example, tmp, opset)
        else:
            from medseg.deploy.quantize import calibration_patches as patches_of
            from medseg.deploy.quantize import quantize_int8

            with tempfile.TemporaryDirectory(dir=tmp.parent, prefix=".export-") as work:
                fp32 = Path(work) / "model.fp32.onnx"
                _export_onnx(network, example, fp32, opset)
                quantize_int8(fp32, tmp, patches_of(bundle, calibration_patches))
        for runtime, loaded in _runtimes(fmt, tmp):
            result = check.compare(runtime, loaded)
            log.debug("parity %s", result.describe())
            parity.append(result)
        failed = [p for p in parity if not p.passed]
        if failed:
            raise ExportError(f"{output}: not written: the {fmt} export differs from the eager model: "
                              + "; ".join(p.describe() for p in failed))

    suffix = ".onnx" if fmt == "onnx" else ".pt"  # OpenVINO picks its reader by the file's extension
    write_atomic(output, write, suffix=suffix)
    sidecar = {
        "sidecar_format": SIDECAR_FORMAT,
        "format": fmt,
        "precision": precision,
        "opset": opset if fmt == "onnx" else None,
        "exporter": "torch.onnx.export(dynamo=True)" if fmt == "onnx" else "torch.jit.trace",
        "file_sha256": file_sha256(output),
        "weights_sha256": weights_sha256(bundle.weights),
        "bundle_name": bundle.spec.name,
        "input": {"name": "image", "shape": ["batch", bundle.network.in_channels, *bundle.inference.roi_size],
                  "dtype": "float32"},
        "output": {"name": "logits", "shape": ["batch", bundle.network.num_classes, *bundle.inference.roi_size]},
        "roi_size": list(bundle.inference.roi_size),
        "labels": bundle.label_names,
        "parity": [asdict(p) | {"logit_limit": p.logit_limit, "passed": p.passed} for p in parity],
        "int8_calibration_patches": calibration_patches if int8 else None,
        "versions": {"medseg": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    side = write_text_atomic(sidecar_path(output), json.dumps(sidecar, indent=2, default=str) + "\n")
    return ExportResult(output, side, fmt, precision, parity, time.perf_counter() - start)


def export_summary(path: Path) -> dict[str, Any]:
    """The sidecar of an export, as written (for reports and the benchmark)."""
    return json.loads(sidecar_path(Path(path)).read_text(encoding="utf-8"))
