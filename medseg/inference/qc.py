"""Quality-control flags of a prediction: input unlike the training data, uncertain output, implausible
volumes, empty masks and weak models (docs/qc.md names every flag and its threshold rule).

The limits come from the model bundle's ``qc`` section (:class:`medseg.models.bundle.QCThresholds`),
written at training time from the training and validation cases. A bundle without it (trained before QC
existed; ``medseg calibrate-qc RUN`` adds it) gets only the checks that need no limits: empty
prediction and weak model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import torch

from medseg.io.volume import ras_spacing
from medseg.models.bundle import DEFAULT_MIN_VALIDATION_DICE, QCThresholds

#: Whole-scan intensity percentiles compared with the training cases'.
INTENSITY_PERCENTILES = (0.5, 50.0, 99.5)
#: Voxels sampled (fixed seed) for the percentiles: bounded time and memory on large CTs.
INTENSITY_SAMPLES = 200_000
#: The highest median (HU) a scan guessed to be a CT may have: even a bone crop's median is below it, an
#: MR stored in large units (hippocampus cases reach 600,000) is far above it.
CT_MAX_MEDIAN_HU = 1000.0
#: A foreground voxel whose winning class has less probability than this counts as low-confidence.
LOW_CONFIDENCE_PROBABILITY = 0.75
#: Threshold rules (docs/qc.md): spacing range widened by this factor, volume range by VOLUME_FACTOR,
#: intensity percentile range by this share of the training intensity span, uncertainty above both this
#: percentile of the validation cases and their far-out fence (Q3 + UNCERTAINTY_FENCE_IQR x IQR).
SPACING_FACTOR = 1.25
VOLUME_FACTOR = 2.0
INTENSITY_MARGIN = 0.1
UNCERTAINTY_PERCENTILE = 99.0
UNCERTAINTY_FENCE_IQR = 3.0


def uncertainty_limit(values: Sequence[float]) -> float | None:
    """The limit of an uncertainty measure from the validation cases' values: the higher of their
    UNCERTAINTY_PERCENTILE-th percentile and Tukey's far-out fence (Q3 + 3 IQR); None without values.

    Why the fence: with a few dozen validation cases the 99th percentile is about their maximum, so a new
    case of the same kind lands above it with probability about 1/(n+1) (3 % for 34 cases) — per measure.
    The fence depends on the spread, not on n, and flags only values far outside it (docs/qc.md).
    """
    if not values:
        return None
    q1, q3, top = np.percentile(np.asarray(values, dtype=np.float64), [25.0, 75.0, UNCERTAINTY_PERCENTILE])
    return float(max(top, q3 + UNCERTAINTY_FENCE_IQR * (q3 - q1)))


#: Model-grid voxels per slab of :func:`prediction_uncertainty` (bounds its memory, about 16 B each).
UNCERTAINTY_SLAB_VOXELS = 1 << 22


@dataclass(frozen=True)
class PredictionUncertainty:
    """Uncertainty of one prediction, on the model's grid: mean normalised entropy (0-1) over the predicted
    foreground voxels and the share of them whose winning probability is below LOW_CONFIDENCE_PROBABILITY;
    both None when no foreground is predicted."""

    foreground_voxels: int
    foreground_entropy: float | None
    low_confidence_share: float | None


def prediction_uncertainty(probs: torch.Tensor) -> PredictionUncertainty:
    """Summarise softmax probabilities (K, ...) of one scan; entropy is divided by log K, so 1 is uniform.

    Slab by slab along the first spatial axis (UNCERTAINTY_SLAB_VOXELS at a time): the argmax and winning
    probability of the whole grid (12 B per model voxel) never exist. Per-voxel entropy is float32, summed
    in float64: the mean matches an all-float64 computation to about 1e-9.
    """
    n, entropy_sum, low = 0, 0.0, 0
    plane = max(1, int(np.prod(probs.shape[2:])))
    step = max(1, UNCERTAINTY_SLAB_VOXELS // plane)
    for start in range(0, probs.shape[1], step):
        slab = probs[:, start:start + step].float()
        if slab.shape[0] == 2:  # the common two-class case: no argmax (ties go to class 0, as argmax's do)
            top, foreground = torch.maximum(slab[0], slab[1]), slab[1] > slab[0]
        else:
            top, winner = slab.max(dim=0)
            foreground = winner > 0
        count = int(foreground.sum())
        if count == 0:
            continue
        # Masked sums instead of gathering the foreground voxels (a copy per slab): about 1.5x less time.
        entropy = (slab * slab.clamp_min(1e-12).log()).sum(dim=0)
        entropy_sum += float(torch.where(foreground, entropy, 0.0).sum(dtype=torch.float64))
        low += int(torch.count_nonzero(foreground & (top < LOW_CONFIDENCE_PROBABILITY)))
        n += count
    if n == 0:
        return PredictionUncertainty(0, None, None)
    return PredictionUncertainty(n, -entropy_sum / n / float(np.log(probs.shape[0])), low / n)


def intensity_percentiles(data: np.ndarray, percentiles: Sequence[float] = INTENSITY_PERCENTILES,
                          seed: int = 0) -> list[float]:
    """Percentiles of a scan's voxel values (its units), from a fixed-seed sample of INTENSITY_SAMPLES voxels."""
    flat = np.ravel(np.asarray(data), order="K")  # a view for C- and Fortran-ordered scans alike
    if flat.size > INTENSITY_SAMPLES:
        flat = flat[np.random.default_rng(seed).integers(0, flat.size, INTENSITY_SAMPLES)]
    return [float(v) for v in np.percentile(flat.astype(np.float64), list(percentiles))]


def guess_modality(percentiles: Sequence[float]) -> str | None:
    """CT, MR or None (cannot tell) from the (0.5, 50, 99.5) percentiles of a scan.

    CT holds air at about -1000 HU, so a clearly negative 0.5th percentile, and its median is air, lung,
    fat or soft tissue (below CT_MAX_MEDIAN_HU); MR magnitude images are non-negative. A scan with neither
    (a CT crop without air, a normalised image, an MR in large float units with noise below zero) is not
    guessed, so it is not flagged.
    """
    low, median = percentiles[0], percentiles[1]
    if low <= -500 and median <= CT_MAX_MEDIAN_HU:
        return "CT"
    if low >= 0:
        return "MR"
    return None


def input_flags(qc: QCThresholds | None, spacing_ras: Sequence[float], percentiles: Sequence[float],
                modality: str | None = None, trained_on: str | None = None) -> list[str]:
    """Flags of a scan unlike the training data: ``modality_mismatch``, ``spacing_outside_training``,
    ``intensity_unlike_training``. ``modality`` is the scan's own (e.g. a DICOM tag), else guessed;
    ``trained_on`` the model's (:func:`medseg.models.bundle.model_modality`), else the QC section's."""
    if qc is None:
        return []
    flags = []
    seen = modality or guess_modality(percentiles)
    trained_on = trained_on or qc.modality
    if trained_on in ("CT", "MR") and seen in ("CT", "MR") and seen != trained_on:
        flags.append("modality_mismatch")
    if qc.spacing_mm_low is not None and qc.spacing_mm_high is not None and any(
            not lo <= s <= hi for s, lo, hi in zip(spacing_ras, qc.spacing_mm_low, qc.spacing_mm_high, strict=True)):
        flags.append("spacing_outside_training")
    if qc.intensity_low is not None and qc.intensity_high is not None and any(
            not lo <= v <= hi for v, lo, hi in zip(percentiles, qc.intensity_low, qc.intensity_high, strict=True)):
        flags.append("intensity_unlike_training")
    return flags


def uncertainty_flags(qc: QCThresholds | None, uncertainty: PredictionUncertainty | None) -> list[str]:
    """``uncertain_foreground`` (entropy) and ``low_confidence`` (share of low-confidence voxels)."""
    if qc is None or uncertainty is None or uncertainty.foreground_entropy is None:
        return []
    flags = []
    if qc.max_foreground_entropy is not None and uncertainty.foreground_entropy > qc.max_foreground_entropy:
        flags.append("uncertain_foreground")
    if (qc.max_low_confidence_share is not None and uncertainty.low_confidence_share is not None
            and uncertainty.low_confidence_share > qc.max_low_confidence_share):
        flags.append("low_confidence")
    return flags


def class_flags(qc: QCThresholds | None, class_value: int, class_name: str, volume_ml: float) -> list[str]:
    """``volume_implausible:<name>`` outside the training volume range, ``empty:<name>`` for a class that
    every training label holds but the prediction lacks."""
    if qc is None:
        return []
    if volume_ml == 0:
        return [f"empty:{class_name}"] if class_value in qc.always_present else []
    low, high = qc.volume_ml_low.get(class_value), qc.volume_ml_high.get(class_value)
    if (low is not None and volume_ml < low) or (high is not None and volume_ml > high):
        return [f"volume_implausible:{class_name}"]
    return []


def model_flags(qc: QCThresholds | None, validation_dice: float | None) -> list[str]:
    """``weak_model`` when the bundle's mean foreground validation Dice is below the floor (0.5 unless the
    bundle's QC section says otherwise); a model without a validation score is not judged."""
    floor = qc.min_validation_dice if qc is not None else DEFAULT_MIN_VALIDATION_DICE
    return ["weak_model"] if validation_dice is not None and validation_dice < floor else []


def scan_spacing_and_percentiles(image: nib.Nifti1Image, data: np.ndarray | None = None) -> tuple[list[float], list[float]]:
    """RAS spacing (mm) and intensity percentiles of a scan (``data``: its voxels, if already read)."""
    values = np.asanyarray(image.dataobj) if data is None else data
    return ras_spacing(image.affine), intensity_percentiles(values)
