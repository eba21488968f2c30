"""Overlap and surface metrics of one class in one case, in physical units, with an explicit empty-case policy.

Distances come from MONAI (``compute_hausdorff_distance``, ``compute_average_surface_distance``,
``compute_surface_dice``) with the voxel spacing of the image, so they are in mm on anisotropic grids.
Dice and volumes are plain voxel counts.

Empty-case policy (docs/evaluation.md): a metric that has no meaning for a pair is ``None`` (undefined),
never a silent 0 or 1, and summaries count the undefined cases apart:

==========================  ======  =========  ===========  ==========
reference / prediction      Dice    NSD        HD95, ASSD   volumes
==========================  ======  =========  ===========  ==========
both non-empty              value   value      value        value
reference empty only        0       0          undefined    value
prediction empty only       0       0          undefined    value
both empty                  undef.  undefined  undefined    0, 0
==========================  ======  =========  ===========  ==========
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from enum import StrEnum

import numpy as np
import torch
from monai.metrics import (
    compute_average_surface_distance,
    compute_hausdorff_distance,
    compute_surface_dice,
)

from medseg.io.volume import voxel_spacing, voxel_volume_ml  # noqa: F401  (re-exported: lesions)


class PairStatus(StrEnum):
    """Which of the reference and the prediction contain the class."""

    BOTH = "both_present"
    REFERENCE_EMPTY = "reference_empty"  # a false-positive case
    PREDICTION_EMPTY = "prediction_empty"  # a missed case
    BOTH_EMPTY = "both_empty"


@dataclass(frozen=True)
class ClassMetrics:
    """Metrics of one class in one case. ``None`` means undefined (see the module's empty-case policy).

    Distances in mm, volumes in mL, Dice and NSD in [0, 1].
    """

    status: PairStatus
    dice: float | None
    hd95_mm: float | None
    assd_mm: float | None
    nsd: float | None
    nsd_tolerance_mm: float
    reference_ml: float
    prediction_ml: float

    @property
    def volume_difference_ml(self) -> float:
        """Predicted minus reference volume (mL): positive when the prediction is too large."""
        return self.prediction_ml - self.reference_ml

    def as_record(self) -> dict[str, object]:
        """Flat JSON/CSV-ready mapping (status as its string)."""
        record = asdict(self)
        record["status"] = str(self.status)
        record["volume_difference_ml"] = self.volume_difference_ml
        return record


def bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Slices of the smallest box holding all true voxels of ``mask``; ``None`` when it has none.

    Evaluation works inside such boxes: a 1 mL lesion in a 512x512x300 CT is a few thousand voxels, and
    whole-volume copies (our label maps are often Fortran-ordered, so ``ravel`` copies) cost seconds.
    """
    coords = [np.flatnonzero(mask.any(axis=tuple(j for j in range(mask.ndim) if j != i))) for i in range(mask.ndim)]
    if coords[0].size == 0:
        return None
    return tuple(slice(int(c[0]), int(c[-1]) + 1) for c in coords)


def _crop_to_union(a: np.ndarray, b: np.ndarray, margin: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cut to the bounding box of their union, padded by ``margin`` empty voxels.

    MONAI's distance transforms then run on a small box instead of a whole CT; the margin keeps the border
    voxels' neighbours, so edges and distances are unchanged.
    """
    box = bounding_box(a | b)
    assert box is not None, "called with two empty masks"
    return np.pad(a[box], margin), np.pad(b[box], margin)


def _as_batch(mask: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]


def binary_metrics(
    prediction: np.ndarray,
    reference: np.ndarray,
    spacing: Iterable[float],
    nsd_tolerance_mm: float,
    voxel_ml: float,
) -> ClassMetrics:
    """Dice, HD95 (mm), mean symmetric surface distance (mm), NSD and volumes (mL) of two boolean masks.

    HD95 is MONAI's symmetric definition: the larger of the two directed 95th percentiles of the distances
    from one mask's boundary voxels to the other's. ASSD is the mean over the boundary voxels of both masks
    of the distance to the other mask's boundary. NSD uses surface elements (``use_subvoxels=True``), as in
    Nikolov et al. 2021: the share of both surfaces within ``nsd_tolerance_mm`` of the other.
    """
    pred = np.asarray(prediction, dtype=bool)
    ref = np.asarray(reference, dtype=bool)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    n_pred, n_ref = int(pred.sum()), int(ref.sum())
    pred_ml, ref_ml = n_pred * voxel_ml, n_ref * voxel_ml
    if n_pred == 0 and n_ref == 0:
        return ClassMetrics(PairStatus.BOTH_EMPTY, None, None, None, None, nsd_tolerance_mm, 0.0, 0.0)
    if n_pred == 0 or n_ref == 0:
        status = PairStatus.PREDICTION_EMPTY if n_pred == 0 else PairStatus.REFERENCE_EMPTY
        # Dice = 2|A∩B|/(|A|+|B|) is 0 by its formula here, and NSD likewise: no surface is within tolerance.
        return ClassMetrics(status, 0.0, None, None, 0.0, nsd_tolerance_mm, ref_ml, pred_ml)

    dice = 2.0 * int(np.count_nonzero(pred & ref)) / (n_pred + n_ref)
    spacing_list = [float(s) for s in spacing]
    p, r = _crop_to_union(pred, ref)
    tp, tr = _as_batch(p), _as_batch(r)
    with warnings.catch_warnings():
        # MONAI 1.5+ warns about its own internal use of a deprecated argument; nothing for us to act on.
        warnings.simplefilter("ignore", FutureWarning)
        hd95 = compute_hausdorff_distance(tp, tr, include_background=True, percentile=95, spacing=spacing_list)
        assd = compute_average_surface_distance(tp, tr, include_background=True, symmetric=True, spacing=spacing_list)
        nsd = compute_surface_dice(tp, tr, [float(nsd_tolerance_mm)], include_background=True,
                                   spacing=spacing_list, use_subvoxels=True)
    return ClassMetrics(
        PairStatus.BOTH,
        float(dice),
        float(hd95.item()),
        float(assd.item()),
        float(nsd.item()),
        float(nsd_tolerance_mm),
        ref_ml,
        pred_ml,
    )


def label_metrics(
    prediction: np.ndarray,
    reference: np.ndarray,
    affine: np.ndarray,
    classes: Iterable[int],
    tolerances_mm: dict[int, float],
    default_tolerance_mm: float = 2.0,
) -> dict[int, ClassMetrics]:
    """Per-class metrics of two label maps on one grid (``affine`` gives the spacing in mm)."""
    spacing = voxel_spacing(affine)
    voxel_ml = voxel_volume_ml(affine)
    return {
        int(k): binary_metrics(prediction == k, reference == k, spacing,
                               tolerances_mm.get(int(k), default_tolerance_mm), voxel_ml)
        for k in classes
    }


@dataclass(frozen=True)
class Stats:
    """Summary of one metric over cases: undefined values (``None``/NaN) are counted, never averaged."""

    n: int
    n_undefined: int
    mean: float | None
    std: float | None
    median: float | None
    q1: float | None
    q3: float | None
    min: float | None
    max: float | None

    @property
    def iqr(self) -> float | None:
        """Inter-quartile range q3 - q1."""
        return None if self.q1 is None or self.q3 is None else self.q3 - self.q1

    def as_record(self) -> dict[str, float | int | None]:
        """Flat mapping including the IQR."""
        return {**asdict(self), "iqr": self.iqr}


def summarize(values: Iterable[float | None]) -> Stats:
    """n (defined values), n undefined, mean, population std, median, quartiles (linear), min, max."""
    raw = list(values)
    defined = np.array([v for v in raw if v is not None and np.isfinite(v)], dtype=float)
    n_undefined = len(raw) - defined.size
    if defined.size == 0:
        return Stats(0, n_undefined, None, None, None, None, None, None, None)
    q1, median, q3 = (float(q) for q in np.percentile(defined, [25, 50, 75]))
    return Stats(
        int(defined.size), int(n_undefined), float(defined.mean()), float(defined.std()), median, q1, q3,
        float(defined.min()), float(defined.max()),
    )
