"""Figures of report.html as base64 PNG strings: metric box plots, lesion plots and case overlays.

Figures are built with ``matplotlib.figure.Figure`` directly (Agg canvas, no pyplot), so rendering never
touches a display or the global pyplot state of a caller's session.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cc3d
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Circle, Patch, Rectangle
from matplotlib.ticker import FuncFormatter, NullFormatter

from medseg.evaluation.lesions import Lesion, MatchStatus, bucket_names
from medseg.io.display import (
    MARKER_COLOR,
    PREDICTION_COLOR,
    PREDICTION_STYLE,
    REFERENCE_COLOR,
    REFERENCE_STYLE,
    DisplayGrid,
    Window,
    choose_window,
    format_lps,
    format_voxel,
    looks_like_ct,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from medseg.evaluation.results import CaseResult, EvaluationResult

# Okabe-Ito (colour-blind safe), one per class in the summary plots.
_COLORS = ["#E69F00", "#56B4E9", "#009E73", "#0072B2", "#D55E00", "#CC79A7", "#F0E442", "#000000"]


def _png(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _color(class_id: int) -> str:
    return _COLORS[(class_id - 1) % len(_COLORS)]


def dice_axis_limits(values: Iterable[float]) -> tuple[float, float]:
    """Dice axis limits fitted to the values: their range plus a margin, at least 0.1 wide, inside [0, 1] (plus 0.01 at an end it reaches).

    A fixed 0-1 axis squeezes models that differ between 0.85 and 0.95 into a sliver.
    """
    finite = [float(v) for v in values if v is not None and np.isfinite(v)]
    if not finite:
        return 0.0, 1.0
    lo, hi = min(finite), max(finite)
    pad = max(0.05 * (hi - lo), 0.02)
    lo, hi = lo - pad, hi + pad
    if hi - lo < 0.1:
        mid = (lo + hi) / 2
        lo, hi = mid - 0.05, mid + 0.05
    # Within [0, 1] plus a hair, so a dot at exactly 1 (or 0) is not cut by the frame.
    if hi > 1.0:
        lo, hi = max(0.0, lo - (hi - 1.0)), 1.0
    if lo < 0.0:
        lo, hi = 0.0, min(1.0, hi - lo)
    return lo - (0.01 if lo == 0.0 else 0.0), hi + (0.01 if hi == 1.0 else 0.0)


def metric_boxplots(result: EvaluationResult) -> str:
    """Box plots of per-case Dice and HD95 (mm) per class, each case a dot; undefined values left out."""
    summaries = list(result.per_class.values())
    fig = Figure(figsize=(max(9.0, 1.6 * len(summaries) + 4), 3.8), layout="constrained")
    axes = fig.subplots(1, 2)
    rng = np.random.default_rng(0)  # fixed jitter: the same report twice is the same picture
    for ax, metric, label in ((axes[0], "dice", "Dice"), (axes[1], "hd95_mm", "HD95 (mm)")):
        data = [[getattr(c.metrics[s.class_id], metric) for c in result.cases if s.class_id in c.metrics] for s in summaries]
        data = [[v for v in vals if v is not None and np.isfinite(v)] for vals in data]
        positions = np.arange(1, len(summaries) + 1)
        shown = [(p, d) for p, d in zip(positions, data, strict=True) if d]
        if shown:
            ax.boxplot([d for _, d in shown], positions=[p for p, _ in shown], widths=0.5, showfliers=False,
                       medianprops={"color": "black"})
            for (p, d), s in zip(shown, [s for s, d in zip(summaries, data, strict=True) if d], strict=True):
                ax.scatter(p + rng.uniform(-0.15, 0.15, len(d)), d, s=9, alpha=0.6, color=_color(s.class_id), zorder=3)
        ax.set_xticks(positions, [s.name for s in summaries], rotation=30 if len(summaries) > 4 else 0, ha="right" if len(summaries) > 4 else "center")
        ax.set_xlim(0.4, len(summaries) + 0.6)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
        for p, d, s in zip(positions, data, summaries, strict=True):
            undefined = s.stats[metric].n_undefined
            if undefined:
                ax.annotate(f"{undefined} undef.", (p, 0), xycoords=("data", "axes fraction"), xytext=(0, 2),
                            textcoords="offset points", ha="center", fontsize=7, color="#777")
            if not d:
                ax.annotate("no values", (p, 0.5), xycoords=("data", "axes fraction"), ha="center", fontsize=8, color="#777")
    dice = [c.metrics[s.class_id].dice for s in summaries for c in result.cases if s.class_id in c.metrics]
    axes[0].set_ylim(*dice_axis_limits(dice))
    axes[0].set_ylabel("Dice (axis fitted to the data)")
    axes[1].set_ylim(bottom=0)
    return _png(fig)


def paired_plot(models: list[str], panels: dict[str, list[list[float | None]]], ylabel: str = "Dice",
                tie: float = 0.0) -> str:
    """One panel per class: each case a line across the models (x) joining its values; blue where the last
    model is better than the first by more than ``tie``, orange where worse, grey otherwise; the mean over
    cases in black.

    ``panels`` maps a panel title to per-case value lists (one value per model, None: undefined, not drawn).
    Higher is better (Dice); the axis is fitted to the values.
    """
    fig = Figure(figsize=(max(4.0, 1.3 * len(models) + 1.6) * len(panels), 4.2), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    x = np.arange(len(models))
    for ax, (title, cases) in zip(axes, panels.items(), strict=True):
        counts = {"better": 0, "worse": 0, "equal": 0}
        for values in cases:
            ys = np.array([np.nan if v is None else float(v) for v in values])
            shown = np.isfinite(ys)
            if shown.sum() == 0:
                continue
            first, last = ys[shown][0], ys[shown][-1]
            kind = "better" if last - first > tie else "worse" if first - last > tie else "equal"
            counts[kind] += 1
            color = {"better": "#0072B2", "worse": "#D55E00", "equal": "#999999"}[kind]
            ax.plot(x[shown], ys[shown], color=color, alpha=0.45, lw=1, marker="o", ms=3)
        means = [np.nanmean([np.nan if c[i] is None else c[i] for c in cases]) if cases else np.nan for i in x]
        ax.plot(x, means, color="black", lw=2.5, marker="D", ms=6, zorder=5)
        ax.set_xticks(x, models, rotation=20 if len(models) > 2 or max(map(len, models)) > 14 else 0,
                      ha="right" if len(models) > 2 or max(map(len, models)) > 14 else "center")
        ax.set_xlim(-0.3, len(models) - 0.7)
        ax.set_ylim(*dice_axis_limits([v for c in cases for v in c if v is not None]))
        ax.set_ylabel(f"{ylabel} (axis fitted to the data)")
        ax.set_title(f"{title}\n{counts['better']} better, {counts['worse']} worse, {counts['equal']} tied", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    handles = [Patch(color="#0072B2", label=f"case better with {models[-1]} than with {models[0]}"),
               Patch(color="#D55E00", label="case worse"), Patch(color="#999999", label="tied"),
               Patch(color="black", label="mean over cases")]
    fig.legend(handles=handles, loc="outside lower center", ncols=4, fontsize=9, frameon=False)
    return _png(fig)


def lesion_figure(result: EvaluationResult, class_id: int) -> str:
    """Left: predicted vs reference lesion volume (mL, log) with missed/false positives on the floor/wall.
    Right: sensitivity and precision by size bucket, with lesion counts."""
    matches = [m for c in result.cases for m in c.lesions.get(class_id, [])]
    summary = next(s for s in result.lesion_summary.values() if s.class_id == class_id)
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    ax_scatter, ax_bars = fig.subplots(1, 2)

    volumes = [les.volume_ml for m in matches for les in (m.reference, m.prediction) if les is not None and les.volume_ml > 0]
    if volumes:
        lo, hi = min(volumes) / 3, max(volumes) * 3
        det = [(m.reference.volume_ml, m.prediction.volume_ml) for m in matches
               if m.status == MatchStatus.DETECTED and m.reference and m.prediction]
        missed = [m.reference.volume_ml for m in matches if m.status == MatchStatus.MISSED and m.reference]
        fps = [m.prediction.volume_ml for m in matches if m.status == MatchStatus.FALSE_POSITIVE and m.prediction]
        ax_scatter.plot([lo, hi], [lo, hi], color="#999", lw=1, ls=":")
        if det:
            ax_scatter.scatter(*zip(*det, strict=True), s=18, color="#0072B2", label=f"detected ({len(det)})")
        if missed:
            ax_scatter.scatter(missed, [lo] * len(missed), marker="v", s=30, color="#D55E00", label=f"missed ({len(missed)})", clip_on=False)
        if fps:
            ax_scatter.scatter([lo] * len(fps), fps, marker="<", s=30, color="#E69F00", label=f"false positive ({len(fps)})", clip_on=False)
        ax_scatter.set_xscale("log")
        ax_scatter.set_yscale("log")
        ax_scatter.set_xlim(lo, hi)
        ax_scatter.set_ylim(lo, hi)
        for axis in (ax_scatter.xaxis, ax_scatter.yaxis):
            # Plain numbers ("0.5", "2") read better than 5x10^-1 on a volume axis.
            axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            axis.set_minor_formatter(NullFormatter())
        ax_scatter.legend(fontsize=8, loc="upper left")
    else:
        ax_scatter.text(0.5, 0.5, "no lesions", ha="center", va="center", transform=ax_scatter.transAxes)
    ax_scatter.set_xlabel("reference lesion volume (mL)")
    ax_scatter.set_ylabel("predicted lesion volume (mL)")
    ax_scatter.set_title(summary.name, fontsize=10)

    buckets = bucket_names(result.config.size_buckets_mm)
    x = np.arange(len(buckets))
    sens = [summary.detection[b].sensitivity for b in buckets]
    prec = [summary.detection[b].precision for b in buckets]
    ax_bars.bar(x - 0.2, [v or 0 for v in sens], 0.4, color="#0072B2", label="sensitivity")
    ax_bars.bar(x + 0.2, [v or 0 for v in prec], 0.4, color="#009E73", label="precision")
    for i, b in enumerate(buckets):
        d = summary.detection[b]
        ax_bars.annotate(f"{d.tp}/{d.tp + d.fn}", (i - 0.2, sens[i] or 0), xytext=(0, 2), textcoords="offset points", ha="center", fontsize=7)
        ax_bars.annotate(f"{d.tp}/{d.tp + d.fp}", (i + 0.2, prec[i] or 0), xytext=(0, 2), textcoords="offset points", ha="center", fontsize=7)
    ax_bars.set_xticks(x, buckets)
    ax_bars.set_ylim(0, 1.15)
    ax_bars.set_xlabel(f"lesion size (longest {'axial' if result.config.size_by == 'axial' else '3D'} diameter)")
    ax_bars.set_ylabel("rate (counts above bars)")
    ax_bars.legend(fontsize=8, loc="upper left", ncols=2)
    ax_bars.grid(axis="y", alpha=0.3)
    return _png(fig)


# ---------------------------------------------------------------------------------------------- overlays


@dataclass
class CaseView:
    """One case's reference, prediction and image (if on the grid) in RAS-closest order, for drawing."""

    case_id: str
    grid: DisplayGrid
    reference: np.ndarray
    prediction: np.ndarray
    image: np.ndarray | None
    is_ct: bool


@dataclass(frozen=True)
class Overlay:
    """A drawn overlay: the PNG (base64) and where it looks, in the terms a viewer uses."""

    png: str
    centre_voxel: tuple[int, int, int]  # the file's (i, j, k) of the crosshair point
    centre_lps_mm: tuple[float, float, float]
    slices: dict[str, str]  # view name -> "k = 23 of 48"
    window: str

    def describe(self) -> str:
        """Centre voxel and LPS position, and the window, for a caption."""
        if not self.slices:
            return "both masks empty"
        return f"centre {format_voxel(self.centre_voxel)}, {format_lps(self.centre_lps_mm)}; {self.window}"


def load_case_view(case: CaseResult) -> CaseView:
    """Read a case's masks (and image, if it lies on the reference grid) and reorient them for drawing."""
    from medseg.evaluation.cases import label_array, load_image_on_grid
    from medseg.io.nifti import load_nifti
    from medseg.io.volume import Volume

    ref_img = load_nifti(case.reference_path)
    ref = label_array(ref_img, case.reference_path)
    pred = label_array(load_nifti(case.prediction_path), case.prediction_path) if case.prediction_path else np.zeros_like(ref)
    image = load_image_on_grid(case.image_path, Volume(ref_img, case.reference_path))
    grid = DisplayGrid(np.asarray(ref_img.affine), ref.shape)
    return CaseView(case.case_id, grid, grid.reorient(ref), grid.reorient(pred),
                    grid.reorient(image) if image is not None else None,
                    image is not None and looks_like_ct(image))


# (name, reoriented axis sliced, in-plane axes, radiological x flip, edge letters left/right/bottom/top)
_VIEWS = (("axial", 2, (0, 1), True, ("R", "L", "P", "A")),
          ("coronal", 1, (0, 2), True, ("R", "L", "I", "S")),
          ("sagittal", 0, (1, 2), False, ("P", "A", "I", "S")))


def _contour(ax: Axes, mask: np.ndarray, spacing: tuple[float, float], origin: tuple[float, float], color: str,
             style: str, width: float) -> None:
    if mask.any():
        xs = origin[0] + (np.arange(mask.shape[0]) + 0.5) * spacing[0]
        ys = origin[1] + (np.arange(mask.shape[1]) + 0.5) * spacing[1]
        # Padding closes contours that touch the crop's edge.
        padded = np.pad(mask.T.astype(np.float32), 1)
        xs = np.concatenate([[xs[0] - spacing[0]], xs, [xs[-1] + spacing[0]]])
        ys = np.concatenate([[ys[0] - spacing[1]], ys, [ys[-1] + spacing[1]]])
        ax.contour(xs, ys, padded, levels=[0.5], colors=[color], linestyles=style, linewidths=width)


def _panel(ax: Axes, view: CaseView, axis: int, index: int, box: tuple[slice, slice, slice], classes: list[int],
           window: Window | None, label_names: dict[int, str], marker: tuple[float, float, float] | None = None) -> None:
    """One slice of the box: grey image, reference (orange, solid) and prediction (blue, dashed) outlines, in mm."""
    name, _, (a, b), flip, letters = next(v for v in _VIEWS if v[1] == axis)
    take: list[slice | int] = list(box)
    take[axis] = index
    sl = tuple(take)
    ref, pred = view.reference[sl], view.prediction[sl]
    sp = (view.grid.spacing[a], view.grid.spacing[b])
    origin = (box[a].start * sp[0], box[b].start * sp[1])
    extent = (origin[0], origin[0] + ref.shape[0] * sp[0], origin[1], origin[1] + ref.shape[1] * sp[1])
    if view.image is not None and window is not None:
        ax.imshow(view.image[sl].T, cmap="gray", origin="lower", extent=extent, vmin=window.low, vmax=window.high,
                  interpolation="nearest")
    else:
        ax.imshow(np.zeros(ref.shape[::-1]), cmap="gray", origin="lower", extent=extent, vmin=0, vmax=1)
    for k in classes:
        _contour(ax, ref == k, sp, origin, REFERENCE_COLOR, REFERENCE_STYLE, 2.0)
        _contour(ax, pred == k, sp, origin, PREDICTION_COLOR, PREDICTION_STYLE, 2.0)
        if len(classes) > 1:
            where = np.argwhere((ref == k) | (pred == k))
            if len(where):
                cx, cy = (where.mean(axis=0) + 0.5) * sp + origin
                ax.text(cx, cy, label_names.get(k, f"class_{k}"), color="white", fontsize=7, ha="center", va="center",
                        bbox={"facecolor": "black", "alpha": 0.5, "pad": 1, "linewidth": 0})
    if marker is not None:
        cx, cy, radius = marker
        ax.add_patch(Circle((cx, cy), radius, fill=False, color=MARKER_COLOR, lw=1.0, ls=":"))
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    if flip:
        ax.invert_xaxis()
    ax.set_xticks([])
    ax.set_yticks([])
    left, right, bottom, top = letters
    for text, xy in ((left, (0.03, 0.5)), (right, (0.97, 0.5)), (bottom, (0.5, 0.03)), (top, (0.5, 0.97))):
        ax.text(*xy, text, transform=ax.transAxes, color="#F0E442", fontsize=10, fontweight="bold", ha="center", va="center")
    ax.set_title(f"{name} · {view.grid.slice_label(axis, index)}", fontsize=9)


def _legend(fig: Figure) -> None:
    """Big solid swatches, on white below the panels: readable in print and by colour-blind readers."""
    handles = [Patch(facecolor=REFERENCE_COLOR, edgecolor="black", label="reference (solid outline)"),
               Patch(facecolor=PREDICTION_COLOR, edgecolor="black", label="prediction (dashed outline)")]
    fig.legend(handles=handles, loc="lower center", ncols=2, fontsize=10, frameon=False, handlelength=2.5, handleheight=1.2)


def _slices_through(mask: np.ndarray) -> tuple[int, int, int]:
    """Per axis, the plane where ``mask`` (reoriented) has the most voxels; of tied planes the most central."""
    out = []
    for axis in range(3):
        areas = mask.sum(axis=tuple(i for i in range(3) if i != axis))
        tied = np.flatnonzero(areas == areas.max())
        occupied = np.flatnonzero(areas)
        middle = (occupied[0] + occupied[-1]) / 2 if len(occupied) else (len(areas) - 1) / 2
        out.append(int(tied[np.argmin(np.abs(tied - middle))]))
    return tuple(out)  # type: ignore[return-value]


def _box_around(lo: np.ndarray, hi: np.ndarray, margin: list[int], shape: tuple[int, ...]) -> tuple[slice, slice, slice]:
    return tuple(slice(max(int(lo[i]) - margin[i], 0), min(int(hi[i]) + margin[i], shape[i])) for i in range(3))  # type: ignore[return-value]


def _overlay(fig: Figure, view: CaseView, centre: tuple[int, int, int], window: Window | None) -> Overlay:
    _legend(fig)
    slices = {name: view.grid.slice_label(axis, centre[axis]) for name, axis, *_ in _VIEWS}
    return Overlay(_png(fig), view.grid.file_index(centre), view.grid.lps(centre), slices,
                   window.describe() if window is not None else "no image on the reference grid: black background")


def case_overlay(case: CaseResult, label_names: dict[int, str], view: CaseView | None = None) -> Overlay:
    """Axial, coronal and sagittal slices through the largest reference structure (the prediction's if the
    reference is empty), each slice where that structure is widest; image in grey when available."""
    view = view or load_case_view(case)
    target = view.reference > 0 if view.reference.any() else view.prediction > 0
    fig = Figure(figsize=(11, 4.0))
    axes = fig.subplots(1, 3)
    fig.subplots_adjust(bottom=0.12, top=0.88, wspace=0.05)
    if not target.any():
        for ax in axes:
            ax.text(0.5, 0.5, "both masks empty", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
        return Overlay(_png(fig), (0, 0, 0), view.grid.lps((0, 0, 0)), {}, "")
    largest = cc3d.largest_k(target, k=1, connectivity=26) > 0
    coords = np.argwhere(largest)
    lo, hi = coords.min(axis=0), coords.max(axis=0) + 1
    # Context around the structure: its own size again on each side, at least 25 mm.
    margin = [max(int(np.ceil(25 / s)), int(hi[i] - lo[i])) for i, s in enumerate(view.grid.spacing)]
    box = _box_around(lo, hi, margin, view.reference.shape)
    centre = _slices_through(largest)
    window = choose_window(view.image[box], view.is_ct) if view.image is not None else None
    classes = sorted({int(k) for k in np.unique(view.reference[box]) if k} | {int(k) for k in np.unique(view.prediction[box]) if k})
    for ax, (_, axis, *_) in zip(axes, _VIEWS, strict=True):
        _panel(ax, view, axis, centre[axis], box, classes, window, label_names)
    fig.suptitle(case.case_id, fontsize=10)
    return _overlay(fig, view, centre, window)


def lesion_mask(view: CaseView, lesion: Lesion, class_id: int, side: str, connectivity: int = 26) -> np.ndarray:
    """The lesion's voxels (reoriented array) as a boolean mask, found again from its box and voxel count."""
    volume = view.reference if side == "reference" else view.prediction
    box = view.grid.display_box(lesion.bbox)
    crop = np.ascontiguousarray(volume[box] == class_id)
    components = cc3d.connected_components(crop, connectivity=connectivity)
    counts = np.bincount(components.ravel())
    # The component that fills its own box; equal counts are the lesion itself, else take the largest.
    candidates = [c for c in range(1, len(counts)) if counts[c] == lesion.voxels] or [int(np.argmax(counts[1:])) + 1]
    mask = np.zeros(volume.shape, bool)
    mask[box] = components == candidates[0]
    return mask


def lesion_overlay(view: CaseView, lesion: Lesion, class_id: int, side: str, title: str, label_names: dict[int, str],
                   connectivity: int = 26) -> Overlay:
    """Four panels centred on one lesion: the whole axial slice (a square marks the zoom), then axial,
    coronal and sagittal zooms through the planes where the lesion is largest; the lesion ringed."""
    mask = lesion_mask(view, lesion, class_id, side, connectivity)
    coords = np.argwhere(mask)
    lo, hi = coords.min(axis=0), coords.max(axis=0) + 1
    centre = _slices_through(mask)
    spacing = view.grid.spacing
    extent_mm = max((hi[i] - lo[i]) * spacing[i] for i in range(3))
    # A field of view of at least 60 mm, or three times the lesion: enough anatomy to find it again.
    half_mm = max(30.0, 1.5 * extent_mm)
    mid = (lo + hi) / 2
    box = tuple(slice(max(int(np.floor(mid[i] - half_mm / spacing[i])), 0),
                      min(int(np.ceil(mid[i] + half_mm / spacing[i])), mask.shape[i])) for i in range(3))
    window = choose_window(view.image[box], view.is_ct) if view.image is not None else None
    full = tuple(slice(0, n) for n in mask.shape)
    fig = Figure(figsize=(14, 4.0))
    axes = fig.subplots(1, 4)
    fig.subplots_adjust(bottom=0.12, top=0.88, wspace=0.05)
    context_window = choose_window(view.image[:, :, centre[2]], view.is_ct) if view.image is not None else None
    _panel(axes[0], view, 2, centre[2], full, [class_id], context_window, label_names)  # type: ignore[arg-type]
    x0, y0 = box[0].start * spacing[0], box[1].start * spacing[1]
    axes[0].add_patch(Rectangle((x0, y0), (box[0].stop - box[0].start) * spacing[0], (box[1].stop - box[1].start) * spacing[1],
                                fill=False, color=MARKER_COLOR, lw=1.2))
    axes[0].set_title(f"whole axial slice · {view.grid.slice_label(2, centre[2])}", fontsize=9)
    radius = max(4.0, 0.75 * extent_mm + 2.0)
    for ax, (_, axis, (a, b), *_) in zip(axes[1:], _VIEWS, strict=True):
        marker = ((mid[a]) * spacing[a], (mid[b]) * spacing[b], radius)
        _panel(ax, view, axis, centre[axis], box, [class_id], window, label_names, marker)  # type: ignore[arg-type]
    fig.suptitle(title, fontsize=10)
    return _overlay(fig, view, centre, window)
