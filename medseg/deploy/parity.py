"""The bfloat16 parity check that ``--precision auto`` relies on (:mod:`medseg.inference.precision`).

The validation cases of the model's fold are predicted twice, in float32 and under bfloat16 autocast, with
the same weights and the whole predict pipeline; each mask's Dice against the reference labels is taken per
foreground class (:func:`medseg.deploy.export.mask_agreement`) and averaged over the cases. The figures
(mean and per-class Dice change, voxel agreement of the two masks) go into the bundle's
``precision_check.bfloat16``. Made at the end of training and by ``medseg calibrate-qc`` (both through
:func:`medseg.training.qc_calibration.calibrate_bundle_file`), and by ``medseg export`` for a run that has none.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from tqdm import tqdm

from medseg.data.manifest import Manifest, ManifestCase, load_manifest
from medseg.deploy.export import mask_agreement
from medseg.errors import MedsegError
from medseg.inference.backends import build_backend
from medseg.inference.precision import choose_precision, cpu_bf16_native, parity_passes
from medseg.inference.predictor import Predictor, resolve_device
from medseg.models.bundle import ModelBundle, PrecisionParity, load_bundle, resolve_bundle_path

log = logging.getLogger(__name__)


def bf16_available(device: torch.device) -> bool:
    """Whether ``device`` runs bfloat16 natively (CPU: AVX512-BF16/AMX; CUDA: compute capability 8+)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_bf16_native()


def dice_changes(float32: Sequence[dict[str, float]], reduced: Sequence[dict[str, float]]
                 ) -> tuple[float, float, dict[str, float], float]:
    """From per-case, per-class Dice of both precisions: the mean Dice change, the largest |class change|,
    each class's change (means over the cases, reduced minus float32) and the float32 mean Dice."""
    names = list(float32[0]) if float32 else []
    a = {n: float(np.mean([case[n] for case in float32])) for n in names}
    b = {n: float(np.mean([case[n] for case in reduced])) for n in names}
    per_class = {n: b[n] - a[n] for n in names}
    mean32 = float(np.mean(list(a.values()))) if names else 0.0
    mean_change = float(np.mean(list(b.values()))) - mean32 if names else 0.0
    largest = max((abs(v) for v in per_class.values()), default=0.0)
    return mean_change, largest, per_class, mean32


def bf16_parity(bundle: ModelBundle, manifest: Manifest, cases: Sequence[ManifestCase], device: str | None = "cpu",
                progress: bool = True) -> PrecisionParity | None:
    """Predict ``cases`` (with labels) in float32 and bfloat16 and compare their Dice; None without cases."""

    cases = [c for c in cases if c.label]
    if not cases:
        return None
    target = resolve_device(device)
    runs = {}
    for runtime in ("float32", "bfloat16"):
        predictor = Predictor(build_backend(bundle, "torch", None, runtime), bundle, target)
        predictor.precision = choose_precision(runtime, [bundle.spec], target)
        runs[runtime] = predictor
    dice: dict[str, list[dict[str, float]]] = {"float32": [], "bfloat16": []}
    same = total = 0
    for case in tqdm(cases, desc="bf16 parity: validation cases", unit="case", leave=False,
                     disable=None if progress else True):
        image = manifest.case_image(case)
        label_path = manifest.label_path(case)
        assert label_path is not None
        label = np.asarray(nib.load(label_path).dataobj).astype(np.int64)
        masks = {k: np.asarray(p.predict_image(image).dataobj) for k, p in runs.items()}
        for k, mask in masks.items():
            dice[k].append(mask_agreement(mask, label, bundle.label_names))
        same += int(np.count_nonzero(masks["float32"] == masks["bfloat16"]))
        total += masks["float32"].size
    mean_change, largest, per_class, mean32 = dice_changes(dice["float32"], dice["bfloat16"])
    return PrecisionParity(mean_dice_change=round(mean_change, 6), max_class_dice_change=round(largest, 6),
                           per_class_dice_change={k: round(v, 6) for k, v in per_class.items()},
                           mean_dice_float32=round(mean32, 6), voxel_agreement=round(same / total, 7),
                           cases=len(cases), device=target.type,
                           passed=parity_passes(round(mean_change, 6), round(largest, 6)),
                           date=datetime.now(UTC).isoformat(timespec="seconds"))


def checked_precisions(bundle: ModelBundle, manifest: Manifest, cases: Sequence[ManifestCase],
                       device: str | None = "cpu", progress: bool = True) -> dict[str, PrecisionParity]:
    """The bundle's ``precision_check`` with a fresh bfloat16 entry, when ``device`` runs bf16 natively (an
    emulated check would take many times the float32 time, and auto never picks bf16 there anyway)."""
    checks = dict(bundle.spec.precision_check)
    target = resolve_device(device)
    if not bf16_available(target):
        log.info("bf16 parity check skipped: %s has no native bfloat16; run `medseg calibrate-qc` on a machine "
                 "that has (AVX512-BF16 or AMX) to record one", target.type)
        return checks
    parity = bf16_parity(bundle, manifest, cases, device, progress)
    if parity is None:
        log.info("bf16 parity check skipped: no labelled validation cases")
        return checks
    checks["bfloat16"] = parity
    log.info("bf16 parity check %s on %d validation case(s): mean Dice change %+.4f, largest class change %.4f",
             "passed" if parity.passed else "failed", parity.cases, parity.mean_dice_change, parity.max_class_dice_change)
    return checks


def record_bf16_parity(model: Path, manifest_path: Path | None = None, device: str | None = "cpu",
                       only_if_missing: bool = True, progress: bool = True) -> PrecisionParity | None:
    """Check a run folder's best bundle (or a bundle file) on its fold's validation cases and write the record
    into it (weights and training state unchanged). ``only_if_missing`` leaves an existing record alone.

    A manifest that cannot be read is logged and skipped (None): an export must not fail for want of data.
    """

    path = resolve_bundle_path(Path(model))
    bundle = load_bundle(path)
    if only_if_missing and "bfloat16" in bundle.spec.precision_check:
        return bundle.spec.precision_check["bfloat16"]
    manifest_path = Path(manifest_path or bundle.config.data.manifest)
    try:
        manifest = load_manifest(manifest_path)
    except MedsegError as exc:
        log.warning("bf16 parity check skipped: the model's manifest is not readable here (%s)", exc)
        return None
    checks = checked_precisions(bundle, manifest, manifest.labelled("val", bundle.config.data.fold), device, progress)
    if checks == bundle.spec.precision_check:
        return None
    ModelBundle(bundle.spec.model_copy(update={"precision_check": checks}), bundle.weights, path,
                bundle.training_state).save(path, **bundle.training_state)
    return checks["bfloat16"]
