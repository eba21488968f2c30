"""Lesions as connected components: size (mL), diameters (mm), position (RAS mm) and one-to-one matching.

Measurements are made on the surface that marching cubes puts half-way between inside and outside voxel
centres, mapped to the scanner frame by the affine. That one surface gives:

* the longest 3D diameter: the largest distance between two surface points (over the convex hull);
* the longest axial diameter (RECIST-style): the largest diameter of the cross-section of that surface
  with a plane of constant world S coordinate (the scanner's axial plane), over all such planes. For axial
  acquisitions the planes pass through the slice centres, so this is the in-slice diameter a reader would
  measure; for sagittal, coronal or oblique acquisitions the planes cut the voxel grid, and the result is
  still the diameter in the patient's axial plane rather than in the acquired slice;
* the short-axis diameter (RECIST 1.1 / WHO): in that same axial plane, the longest extent of the
  cross-section along a line perpendicular to the long axis.

A single voxel measures one voxel edge across; a line of n voxels measures n edges. Components are found
with ``cc3d`` (26-connectivity by default).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import NamedTuple

import cc3d
import numpy as np
from nibabel.affines import apply_affine
from scipy.optimize import linear_sum_assignment
from scipy.spatial import ConvexHull, QhullError
from scipy.spatial.distance import cdist
from skimage.measure import marching_cubes

from medseg.evaluation.metrics import bounding_box, voxel_spacing, voxel_volume_ml

# A voxel axis within this cosine (about 2.6 degrees) of the world S axis counts as axial: its slices are the
# axial planes. Cutting through voxel-centre levels then matches what a reader measures on the slices.
_AXIAL_COSINE = 1.0 - 1e-3


@dataclass(frozen=True)
class Lesion:
    """One connected component. ``index`` is 1 for the largest kept lesion of its mask, 2 for the next..."""

    index: int
    voxels: int
    volume_ml: float
    diameter_mm: float
    axial_diameter_mm: float
    short_axis_mm: float
    centroid_ras_mm: tuple[float, float, float]
    mean_intensity: float | None = None
    bbox: tuple[slice, slice, slice] = field(default=(slice(0), slice(0), slice(0)), repr=False, compare=False)
    centroid_voxel: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @property
    def centroid_lps_mm(self) -> tuple[float, float, float]:
        """Centroid in LPS mm (DICOM, 3D Slicer, ITK-SNAP): the RAS centroid with x and y negated."""
        r, a, s = self.centroid_ras_mm
        return (-r, -a, s)

    @property
    def viewer_voxel(self) -> tuple[int, int, int]:
        """Voxel (i, j, k) of the centroid in the file's own array: what Slicer's and ITK-SNAP's cursor show."""
        return tuple(int(round(c)) for c in self.centroid_voxel)  # type: ignore[return-value]

    def size_mm(self, size_by: str) -> float:
        """The diameter that sorts this lesion into a size bucket: ``"axial"`` or ``"3d"`` (mm)."""
        return self.axial_diameter_mm if size_by == "axial" else self.diameter_mm

    def as_record(self) -> dict[str, object]:
        """JSON/CSV-ready mapping (bounding box left out)."""
        record = asdict(self)
        record.pop("bbox")
        record["centroid_ras_mm"] = [round(c, 3) for c in self.centroid_ras_mm]
        record["centroid_lps_mm"] = [round(c, 3) for c in self.centroid_lps_mm]
        record["centroid_voxel"] = list(self.viewer_voxel)
        return record


@dataclass
class LesionSet:
    """The lesions of one mask: ``labels`` numbers kept lesions 1..n (largest first), dropped ones are 0."""

    labels: np.ndarray
    lesions: list[Lesion]
    dropped: list[Lesion]
    region: tuple[slice, ...] | None = None  # box holding every component (kept or dropped); None if none


    def __len__(self) -> int:
        return len(self.lesions)


def _max_pairwise_distance(points: np.ndarray) -> float:
    """Largest distance between two of ``points`` (rows), computed in chunks to bound memory."""
    if len(points) < 2:
        return 0.0
    best = 0.0
    for start in range(0, len(points), 2048):
        best = max(best, float(cdist(points[start:start + 2048], points).max()))
    return best


def _hull_points(points: np.ndarray) -> np.ndarray:
    """The convex hull's vertices (they hold every longest chord), or all distinct points if degenerate."""
    try:
        return points[ConvexHull(points).vertices]
    except QhullError:  # flat or degenerate point sets: all points, still exact
        return np.unique(points, axis=0)


def _diameter(points: np.ndarray) -> float:
    """Largest distance between points (mm); the convex hull's vertices suffice and are far fewer."""
    if len(points) < 2:
        return 0.0
    return _max_pairwise_distance(_hull_points(points))


def _diameter_ends(points: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Largest distance between 2D points and its two end points."""
    hull = _hull_points(points)
    d = cdist(hull, hull)
    i, j = np.unravel_index(int(np.argmax(d)), d.shape)
    return float(d[i, j]), hull[i], hull[j]


def short_axis_length(segments: np.ndarray, start: np.ndarray, end: np.ndarray) -> float:
    """Longest extent (mm) of a planar contour along lines perpendicular to the long axis ``start``-``end``.

    ``segments`` (n, 2, 2) is the contour as line segments in the plane. For each perpendicular line the
    extent is the distance between the outermost contour crossings (what a caliper across the lesion
    reads). Between two segment end points the set of crossed segments is fixed and the extent is convex
    in the line's position, so its maximum lies at a segment end point: evaluating there is exact.
    """
    length = float(np.linalg.norm(end - start))
    if len(segments) == 0 or length == 0:
        return 0.0
    u = (end - start) / length
    v = np.array([-u[1], u[0]])
    along = segments @ u  # (n, 2): position of each end point along the long axis
    across = segments @ v
    positions = np.unique(along)
    if len(positions) > 4000:  # very large sections: a dense sample is within a hair of the maximum
        positions = np.quantile(positions, np.linspace(0, 1, 4000))
    lo_s, hi_s = along.min(axis=1), along.max(axis=1)
    best = 0.0
    for chunk in np.array_split(positions, max(1, len(positions) // 256)):
        t = chunk[:, None]
        crossing = (lo_s[None, :] <= t) & (hi_s[None, :] >= t)
        span = along[:, 1] - along[:, 0]
        safe = np.where(span == 0, 1.0, span)
        frac = np.clip((t - along[None, :, 0]) / safe[None, :], 0.0, 1.0)
        w = across[None, :, 0] + frac * (across[None, :, 1] - across[None, :, 0])
        # A segment lying along the line itself: both of its ends count.
        w_hi = np.where(span[None, :] == 0, across.max(axis=1)[None, :], w)
        w_lo = np.where(span[None, :] == 0, across.min(axis=1)[None, :], w)
        top = np.where(crossing, w_hi, -np.inf).max(axis=1)
        bottom = np.where(crossing, w_lo, np.inf).min(axis=1)
        valid = np.isfinite(top) & np.isfinite(bottom)
        if valid.any():
            best = max(best, float((top - bottom)[valid].max()))
    return best


def _surface(mask: np.ndarray, affine: np.ndarray, origin: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Marching-cubes surface (level 0.5) of a cropped boolean mask, vertices in world mm; and its faces."""
    padded = np.pad(mask, 1).astype(np.float32)
    verts, faces, _, _ = marching_cubes(padded, level=0.5, allow_degenerate=False)
    index = verts.astype(np.float64) - 1.0 + np.asarray(origin, dtype=np.float64)
    return apply_affine(affine, index), faces


def _axial_levels(mask: np.ndarray, affine: np.ndarray, origin: Sequence[int], z_range: tuple[float, float]) -> np.ndarray:
    """World S coordinates (mm) of the axial planes to cut the surface with.

    When a voxel axis points along S the planes go through the slice centres (a hair above, so no vertex
    lies exactly on a plane); otherwise planes every half of the smallest voxel edge.
    """
    rotation = np.asarray(affine)[:3, :3] / np.asarray(voxel_spacing(affine))
    spacing = min(voxel_spacing(affine))
    eps = 1e-6 * spacing  # vertices sit exactly on slice planes; affine maths is float64
    if np.max(np.abs(rotation[2])) > _AXIAL_COSINE:
        centres = apply_affine(affine, np.argwhere(mask) + np.asarray(origin))
        return np.unique(np.round(centres[:, 2], 4)) + eps
    step = spacing / 2
    lo, hi = z_range
    return np.arange(lo + step / 2, hi, step)


def _section_segments(verts: np.ndarray, faces: np.ndarray, level: float) -> np.ndarray:
    """The cross-section of a triangle surface with the plane S = ``level`` as (n, 2, 2) segments in (x, y) mm."""
    z = verts[faces, 2] - level  # (faces, 3)
    crossings = []
    for i, j in ((0, 1), (1, 2), (2, 0)):
        za, zb = z[:, i], z[:, j]
        crossed = za * zb < 0
        t = np.divide(za, za - zb, out=np.zeros_like(za), where=crossed)[:, None]
        a, b = verts[faces[:, i], :2], verts[faces[:, j], :2]
        crossings.append((crossed, a + t * (b - a)))
    hits = np.stack([c for c, _ in crossings], axis=1)
    points = np.stack([p for _, p in crossings], axis=1)  # (faces, 3, 2)
    two = hits.sum(axis=1) == 2  # no vertex lies on a plane, so a crossed triangle has exactly two crossed edges
    order = np.argsort(~hits[two], axis=1, kind="stable")[:, :2]
    return np.take_along_axis(points[two], order[:, :, None], axis=1)


class Diameters(NamedTuple):
    """Diameters of one lesion in mm: longest 3D, longest axial, and the short axis perpendicular to the latter."""

    longest_3d_mm: float
    axial_mm: float
    short_axis_mm: float


def _axial_diameters(verts: np.ndarray, faces: np.ndarray, levels: np.ndarray) -> tuple[float, float]:
    """Longest diameter (mm) of the surface's cross-sections with the planes S = level, and the short axis
    in the plane where it is found (planes tied within 1 um: the larger short axis)."""
    sections = []
    for level in levels:
        segments = _section_segments(verts, faces, float(level))
        if len(segments) >= 2:
            sections.append((*_diameter_ends(segments.reshape(-1, 2)), segments))
    if not sections:
        return 0.0, 0.0
    longest = max(d for d, *_ in sections)
    short = max(short_axis_length(seg, a, b) for d, a, b, seg in sections if d >= longest - 1e-3)
    return longest, short


def measure_diameters(mask: np.ndarray, affine: np.ndarray, origin: Sequence[int] = (0, 0, 0)) -> Diameters:
    """Longest 3D, longest axial (RECIST 1.1) and short-axis (perpendicular, same plane) diameters in mm.

    ``mask`` is the component cropped to its bounding box and ``origin`` the box's first voxel index in the
    image whose ``affine`` maps voxel indices to scanner mm.
    """
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return Diameters(0.0, 0.0, 0.0)
    verts, faces = _surface(mask, affine, origin)
    d3 = _diameter(verts)
    levels = _axial_levels(mask, affine, origin, (float(verts[:, 2].min()), float(verts[:, 2].max())))
    return Diameters(d3, *_axial_diameters(verts, faces, levels))


def lesion_diameters(mask: np.ndarray, affine: np.ndarray, origin: Sequence[int] = (0, 0, 0)) -> tuple[float, float]:
    """Longest 3D and longest axial (RECIST-style) diameters in mm of one component (see :func:`measure_diameters`)."""
    d = measure_diameters(mask, affine, origin)
    return d.longest_3d_mm, d.axial_mm


def find_lesions(
    mask: np.ndarray,
    affine: np.ndarray,
    connectivity: int = 26,
    min_volume_ml: float = 0.0,
    image: np.ndarray | None = None,
) -> LesionSet:
    """Connected components of a boolean mask, measured; those under ``min_volume_ml`` (mL) are dropped.

    ``image`` (same grid) gives each lesion's mean intensity (e.g. HU).
    """
    mask = np.asarray(mask, dtype=bool)
    region = bounding_box(mask)
    if region is None:
        return LesionSet(np.zeros(mask.shape, np.int32), [], [], None)
    shift = np.array([s.start for s in region])
    raw = cc3d.connected_components(np.ascontiguousarray(mask[region]), connectivity=connectivity).astype(np.int32, copy=False)
    stats = cc3d.statistics(raw)
    counts = np.asarray(stats["voxel_counts"])
    voxel_ml = voxel_volume_ml(affine)
    sums = None
    if image is not None:
        sums = np.bincount(raw.ravel(), weights=np.asarray(image[region], dtype=np.float64).ravel(), minlength=len(counts))

    measured: list[tuple[int, Lesion]] = []
    for cid in range(1, len(counts)):
        if counts[cid] == 0:
            continue
        local = tuple(stats["bounding_boxes"][cid])
        origin = [s.start + int(o) for s, o in zip(local, shift, strict=True)]
        d3, dax, short = measure_diameters(raw[local] == cid, affine, origin)
        voxel = np.asarray(stats["centroids"][cid], dtype=np.float64) + shift
        centroid = apply_affine(affine, voxel)
        mean = float(sums[cid] / counts[cid]) if sums is not None else None
        box = tuple(slice(s.start + int(o), s.stop + int(o)) for s, o in zip(local, shift, strict=True))
        lesion = Lesion(0, int(counts[cid]), int(counts[cid]) * voxel_ml, d3, dax, short,
                        tuple(float(c) for c in centroid), mean, box,  # type: ignore[arg-type]
                        tuple(float(c) for c in voxel))  # type: ignore[arg-type]
        measured.append((cid, lesion))

    measured.sort(key=lambda item: -item[1].voxels)
    kept = [(cid, les) for cid, les in measured if les.volume_ml >= min_volume_ml]
    small = [(cid, les) for cid, les in measured if les.volume_ml < min_volume_ml]
    lookup = np.zeros(len(counts), dtype=np.int32)
    lesions = []
    for new_index, (cid, les) in enumerate(kept, start=1):
        lookup[cid] = new_index
        lesions.append(_renumbered(les, new_index))
    dropped = [_renumbered(les, len(kept) + i) for i, (_, les) in enumerate(small, start=1)]
    labels = np.zeros(mask.shape, np.int32)
    labels[region] = lookup[raw]
    return LesionSet(labels, lesions, dropped, region)


def _renumbered(lesion: Lesion, index: int) -> Lesion:
    return dataclasses.replace(lesion, index=index)


class MatchStatus(StrEnum):
    """Outcome of one lesion after matching."""

    DETECTED = "detected"
    MISSED = "missed"
    FALSE_POSITIVE = "false_positive"


@dataclass(frozen=True)
class LesionMatch:
    """One row of the lesion table: a matched pair, a missed reference lesion or a false-positive prediction.

    ``note`` is ``"merged"`` for a missed reference lesion that overlaps a prediction matched to another
    reference lesion, and ``"split"`` for a false positive that overlaps a matched reference lesion.
    ``dice`` is the two components' Dice (0 for missed and false-positive lesions).
    """

    status: MatchStatus
    reference: Lesion | None
    prediction: Lesion | None
    iou: float
    dice: float
    note: str = ""


def overlap_matrix(reference: LesionSet, prediction: LesionSet) -> np.ndarray:
    """Voxels shared by reference lesion i+1 and predicted lesion j+1, as an (n_ref, n_pred) array."""
    n_ref, n_pred = len(reference), len(prediction)
    if reference.region is None or prediction.region is None:
        return np.zeros((n_ref, n_pred), dtype=np.int64)
    # Only where both sets have components can they overlap: intersect their boxes.
    box = tuple(slice(max(a.start, b.start), max(min(a.stop, b.stop), max(a.start, b.start)))
                for a, b in zip(reference.region, prediction.region, strict=True))
    ref_labels, pred_labels = reference.labels[box], prediction.labels[box]
    both = (ref_labels > 0) & (pred_labels > 0)
    pairs = ref_labels[both].astype(np.int64) * (n_pred + 1) + pred_labels[both]
    counts = np.bincount(pairs, minlength=(n_ref + 1) * (n_pred + 1)).reshape(n_ref + 1, n_pred + 1)
    return counts[1:, 1:]


def match_lesions(reference: LesionSet, prediction: LesionSet, min_iou: float = 0.1) -> list[LesionMatch]:
    """One-to-one matching that maximises the summed IoU (Hungarian), keeping pairs with IoU >= ``min_iou``.

    Every reference lesion appears once (detected or missed) and every predicted lesion once (detected or
    false positive), so sensitivity and precision count each lesion exactly once.
    """
    inter = overlap_matrix(reference, prediction).astype(np.float64)
    ref_sizes = np.array([les.voxels for les in reference.lesions], dtype=np.float64)
    pred_sizes = np.array([les.voxels for les in prediction.lesions], dtype=np.float64)
    union = ref_sizes[:, None] + pred_sizes[None, :] - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    eligible = np.where((iou >= min_iou) & (inter > 0), iou, 0.0)
    pairs: dict[int, int] = {}
    if eligible.size and eligible.any():
        rows, cols = linear_sum_assignment(eligible, maximize=True)
        pairs = {int(r): int(c) for r, c in zip(rows, cols, strict=True) if eligible[r, c] > 0}
    matched_pred = set(pairs.values())
    matched_ref = set(pairs)

    rows_out: list[LesionMatch] = []
    for i, ref in enumerate(reference.lesions):
        if i in pairs:
            j = pairs[i]
            dice = 2 * inter[i, j] / (ref_sizes[i] + pred_sizes[j])
            rows_out.append(LesionMatch(MatchStatus.DETECTED, ref, prediction.lesions[j], float(iou[i, j]), float(dice)))
        else:
            merged = any(inter[i, j] > 0 for j in matched_pred)
            rows_out.append(LesionMatch(MatchStatus.MISSED, ref, None, 0.0, 0.0, "merged" if merged else ""))
    for j, pred in enumerate(prediction.lesions):
        if j not in matched_pred:
            split = any(inter[i, j] > 0 for i in matched_ref)
            rows_out.append(LesionMatch(MatchStatus.FALSE_POSITIVE, None, pred, 0.0, 0.0, "split" if split else ""))
    return rows_out


@dataclass(frozen=True)
class DetectionCounts:
    """Lesion detection counts and rates; a rate is ``None`` when its denominator is 0."""

    tp: int
    fn: int
    fp: int

    @property
    def sensitivity(self) -> float | None:
        """TP / (TP + FN): share of reference lesions detected."""
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else None

    @property
    def precision(self) -> float | None:
        """TP / (TP + FP): share of predicted lesions that match a reference lesion."""
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else None

    @property
    def f1(self) -> float | None:
        """2 TP / (2 TP + FP + FN)."""
        denominator = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / denominator if denominator else None

    def __add__(self, other: DetectionCounts) -> DetectionCounts:
        return DetectionCounts(self.tp + other.tp, self.fn + other.fn, self.fp + other.fp)

    def as_record(self) -> dict[str, float | int | None]:
        """Counts and rates as a flat mapping."""
        return {"tp": self.tp, "fn": self.fn, "fp": self.fp, "sensitivity": self.sensitivity,
                "precision": self.precision, "f1": self.f1}


def bucket_names(edges_mm: Sequence[float]) -> list[str]:
    """Names of the size buckets cut at ``edges_mm``: ``<5 mm``, ``5-10 mm``, ..., ``>=20 mm``."""
    fmt = [f"{e:g}" for e in edges_mm]
    names = [f"<{fmt[0]} mm"]
    names += [f"{a}-{b} mm" for a, b in zip(fmt, fmt[1:], strict=False)]
    names.append(f">={fmt[-1]} mm")
    return names


def size_bucket(diameter_mm: float, edges_mm: Sequence[float]) -> str:
    """The bucket of one diameter: the interval [edge_i, edge_i+1) it falls in."""
    return bucket_names(edges_mm)[int(np.searchsorted(np.asarray(edges_mm), diameter_mm, side="right"))]


def detection_counts(
    matches: Sequence[LesionMatch], edges_mm: Sequence[float], size_by: str = "axial"
) -> dict[str, DetectionCounts]:
    """Detection counts overall (key ``"all"``) and per size bucket.

    Detected and missed lesions are bucketed by the reference lesion's diameter, false positives by their
    own, so each bucket's counts are whole lesions and sensitivity/precision/F1 are well defined.
    """
    out = {name: DetectionCounts(0, 0, 0) for name in ["all", *bucket_names(edges_mm)]}
    for m in matches:
        lesion = m.reference if m.reference is not None else m.prediction
        assert lesion is not None
        one = {MatchStatus.DETECTED: DetectionCounts(1, 0, 0), MatchStatus.MISSED: DetectionCounts(0, 1, 0),
               MatchStatus.FALSE_POSITIVE: DetectionCounts(0, 0, 1)}[m.status]
        bucket = size_bucket(lesion.size_mm(size_by), edges_mm)
        out["all"] = out["all"] + one
        out[bucket] = out[bucket] + one
    return out
