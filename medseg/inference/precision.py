"""Which precision the network runs in: ``--precision auto|float32|bfloat16``.

``auto`` (the CLI default) is fast where it is proven safe:

- on CUDA, the autocast dtype the model was trained with (the bundle's ``inference.precision``);
- on a CPU with native bfloat16 (AVX512-BF16 or AMX, :func:`cpu_bf16_native`) and backend torch,
  bfloat16 autocast **only when** every model's bundle records a passed bfloat16 parity check
  (``precision_check.bfloat16``, written at the end of training, by ``medseg calibrate-qc`` and by
  ``medseg export``; :mod:`medseg.deploy.parity`) that meets :func:`parity_passes`;
- float32 otherwise (no record, a failed record, a CPU that would emulate bf16, other backends).

``float32`` and ``bfloat16`` are taken as asked (float32 also turns CUDA autocast off).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from medseg.errors import CheckpointError
from medseg.inference.backends import bf16_supported
from medseg.models.bundle import BundleSpec, PrecisionParity

Precision = Literal["auto", "float32", "bfloat16"]
PRECISIONS: tuple[str, ...] = ("auto", "float32", "bfloat16")
#: Largest change of the mean foreground validation Dice (bf16 minus fp32, either sign) ``auto`` accepts.
MAX_MEAN_DICE_CHANGE = 0.005
#: Largest change of any one class's validation Dice (either sign) ``auto`` accepts.
MAX_CLASS_DICE_CHANGE = 0.01


def parity_passes(mean_dice_change: float, max_class_dice_change: float) -> bool:
    """The rule: |mean Dice change| <= 0.005 and no class's |Dice change| above 0.01 (limits included)."""
    return abs(mean_dice_change) <= MAX_MEAN_DICE_CHANGE and abs(max_class_dice_change) <= MAX_CLASS_DICE_CHANGE


def cpu_bf16_native() -> bool:
    """Whether this CPU runs bfloat16 natively: the AVX512-BF16 or AMX-BF16 flag in /proc/cpuinfo, and a
    oneDNN build in torch that uses them. Elsewhere torch emulates bf16, slower than float32."""
    return bf16_supported() and torch.backends.mkldnn.is_available()


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision the network runs in (``float32`` or ``bfloat16`` for the backend) and why."""

    runtime: Literal["float32", "bfloat16"]
    reason: str
    #: On CUDA: autocast in the bundle's trained dtype (auto), or not (float32 asked).
    cuda_autocast: bool = True


def _describe(parity: PrecisionParity) -> str:
    return (f"bf16 parity check on {parity.cases} validation case(s): mean Dice change {parity.mean_dice_change:+.4f}, "
            f"largest class change {parity.max_class_dice_change:.4f}")


def choose_precision(requested: str, specs: Sequence[BundleSpec], device: torch.device,
                     backend: str = "torch") -> PrecisionChoice:
    """Apply the rule of this module to the bundles (all members of an ensemble) on ``device``."""
    if requested not in PRECISIONS:
        raise CheckpointError(f"unknown precision {requested!r}: choose one of {', '.join(PRECISIONS)}")
    if requested == "float32":
        return PrecisionChoice("float32", "asked", cuda_autocast=False)
    if requested == "bfloat16":
        return PrecisionChoice("bfloat16", "asked")
    if device.type == "cuda":
        return PrecisionChoice("float32", "CUDA: autocast as trained (" + ", ".join(
            sorted({s.inference.precision for s in specs})) + ")")
    if backend != "torch":
        return PrecisionChoice("float32", f"backend {backend}: the bf16 parity check is made with backend torch")
    if not cpu_bf16_native():
        return PrecisionChoice("float32", "this CPU has no native bfloat16 (AVX512-BF16 or AMX)")
    records = [s.precision_check.get("bfloat16") for s in specs]
    missing = [s.name for s, r in zip(specs, records, strict=True) if r is None]
    if missing:
        return PrecisionChoice("float32", f"no bf16 parity check recorded for {', '.join(missing)} "
                                          "(`medseg calibrate-qc RUN` records one)")
    for record in records:
        assert record is not None
        if not (record.passed and parity_passes(record.mean_dice_change, record.max_class_dice_change)):
            return PrecisionChoice("float32", "failed " + _describe(record))
    return PrecisionChoice("bfloat16", "passed " + "; ".join(_describe(r) for r in records if r is not None))
