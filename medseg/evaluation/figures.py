"""Figures of report.html as base64 PNG strings: metric box plots, lesion plots and case overlays.

Figures are built with ``matplotlib.figure.Figure`` directly (Agg canvas, no pyplot), so rendering never
touches a display or the global pyplot state of a caller's session.
"""

from __future__ import annotations

import base64
import io
from typing import TYPE_CHECKING

import cc3d
import numpy as np
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter
from nibabel.orientations import apply_orientation, io_orientation

from medseg.evaluation.lesions import MatchStatus, bucket_names
from medseg.evaluation.metrics import voxel_spacing

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from medseg.evaluation.runner import CaseResult, EvaluationResult

_COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45", "#9a6324", "#800000"]


def _png(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _color(class_id: int) -> str:
    return _COLORS[(class_id - 1) % len(_COLORS)]


def _prediction_color(class_id: int) -> tuple[float, float, float]:
    """The class colour mixed halfway with white: where the dashed prediction runs along the solid reference
    contour, a same-colour dash would vanish into it; a tint keeps both visible on grey images."""
    rgb = to_rgb(_color(class_id))
    return tuple(0.45 * c + 0.55 for c in rgb)  # type: ignore[return-value]


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
            ax.boxplot([d for _, d in shown], positions=[p for p, _ in shown], widths=0.5, showfliers=False)
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
    axes[0].set_ylim(-0.02, 1.02)
    axes[1].set_ylim(bottom=0)
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
            ax_scatter.scatter(*zip(*det, strict=True), s=18, color="#4363d8", label=f"detected ({len(det)})")
        if missed:
            ax_scatter.scatter(missed, [lo] * len(missed), marker="v", s=30, color="#e6194b", label=f"missed ({len(missed)})", clip_on=False)
        if fps:
            ax_scatter.scatter([lo] * len(fps), fps, marker="<", s=30, color="#f58231", label=f"false positive ({len(fps)})", clip_on=False)
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
    ax_bars.bar(x - 0.2, [v or 0 for v in sens], 0.4, color="#4363d8", label="sensitivity")
    ax_bars.bar(x + 0.2, [v or 0 for v in prec], 0.4, color="#3cb44b", label="precision")
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


def _canonical(affine: np.ndarray, *arrays: np.ndarray) -> tuple[tuple[float, float, float], list[np.ndarray]]:
    """Arrays flipped/transposed to the closest RAS orientation, and their spacing (mm) in that order."""
    ornt = io_orientation(affine)
    spacing = np.asarray(voxel_spacing(affine))[ornt[:, 0].astype(int)]
    return tuple(float(s) for s in spacing), [apply_orientation(a, ornt) for a in arrays]  # type: ignore[return-value]


def _draw(ax: Axes, image: np.ndarray | None, ref: np.ndarray, pred: np.ndarray, spacing: tuple[float, float],
          classes: list[int], window: tuple[float, float] | None, flip_x: bool, letters: tuple[str, str, str, str]) -> None:
    """One slice: grey image, reference (solid) and prediction (dashed) contours per class; in mm."""
    nx, ny = ref.shape
    extent = (0, nx * spacing[0], 0, ny * spacing[1])
    if image is not None and window is not None:
        ax.imshow(image.T, cmap="gray", origin="lower", extent=extent, vmin=window[0], vmax=window[1], interpolation="nearest")
    else:
        ax.imshow(np.zeros((ny, nx)), cmap="gray_r", origin="lower", extent=extent, vmin=0, vmax=1)
    xs = (np.arange(nx) + 0.5) * spacing[0]
    ys = (np.arange(ny) + 0.5) * spacing[1]
    for k in classes:
        for mask, style, color, width in ((ref == k, "solid", _color(k), 1.8), (pred == k, "dashed", _prediction_color(k), 1.4)):
            if mask.any() and not mask.all():
                ax.contour(xs, ys, mask.T.astype(np.float32), levels=[0.5], colors=[color], linestyles=style, linewidths=width)
    if flip_x:
        ax.invert_xaxis()
    ax.set_xticks([])
    ax.set_yticks([])
    left, right, bottom, top = letters
    for text, xy in ((left, (0.02, 0.5)), (right, (0.98, 0.5)), (bottom, (0.5, 0.02)), (top, (0.5, 0.98))):
        ax.text(*xy, text, transform=ax.transAxes, color="yellow", fontsize=10, fontweight="bold", ha="center", va="center")


def case_overlay(case: CaseResult, label_names: dict[int, str]) -> str:
    """Axial, coronal and sagittal slices through the largest reference structure (the prediction's if the
    reference is empty), each slice where that structure is widest; image in grey when available."""
    from medseg.evaluation.runner import label_array, load_image_on_grid
    from medseg.io.nifti import load_nifti

    ref_img = load_nifti(case.reference_path)
    ref = label_array(ref_img, case.reference_path)
    pred = label_array(load_nifti(case.prediction_path), case.prediction_path) if case.prediction_path else np.zeros_like(ref)
    image = load_image_on_grid(case.image_path, ref_img, case.reference_path)
    arrays = [ref, pred] + ([image] if image is not None else [])
    spacing, arrays = _canonical(np.asarray(ref_img.affine), *arrays)
    ref, pred = arrays[0], arrays[1]
    image = arrays[2] if image is not None else None

    target = ref > 0 if ref.any() else pred > 0
    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 3)
    if not target.any():
        for ax in axes:
            ax.text(0.5, 0.5, "both masks empty", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
        return _png(fig)
    largest = cc3d.largest_k(target, k=1, connectivity=26) > 0
    coords = np.argwhere(largest)
    lo, hi = coords.min(axis=0), coords.max(axis=0) + 1
    # Context around the structure: its own size again on each side, at least 25 mm.
    margin = [max(int(np.ceil(25 / s)), int(hi[i] - lo[i])) for i, s in enumerate(spacing)]
    box = tuple(slice(max(int(lo[i]) - margin[i], 0), min(int(hi[i]) + margin[i], ref.shape[i])) for i in range(3))
    ref_c, pred_c, big = ref[box], pred[box], largest[box]
    img_c = image[box] if image is not None else None
    window = None
    if img_c is not None:
        lo_w, hi_w = np.percentile(img_c, [1, 99])
        window = (float(lo_w), float(hi_w if hi_w > lo_w else lo_w + 1))
    classes = sorted({int(k) for k in np.unique(ref_c) if k} | {int(k) for k in np.unique(pred_c) if k})

    views = (("axial", 2, (0, 1), True, ("R", "L", "P", "A")),
             ("coronal", 1, (0, 2), True, ("R", "L", "I", "S")),
             ("sagittal", 0, (1, 2), False, ("P", "A", "I", "S")))
    for ax, (title, axis, (a, b), flip, letters) in zip(axes, views, strict=True):
        areas = big.sum(axis=tuple(i for i in range(3) if i != axis))
        index = int(np.argmax(areas))
        take = [slice(None)] * 3
        take[axis] = index  # type: ignore[call-overload]
        sl = tuple(take)
        _draw(ax, img_c[sl] if img_c is not None else None, ref_c[sl], pred_c[sl], (spacing[a], spacing[b]), classes,
              window, flip, letters)
        ax.set_title(f"{title} (slice {index + box[axis].start})", fontsize=9)
    handles = []
    from matplotlib.lines import Line2D

    for k in classes:
        name = label_names.get(k, f"class_{k}")
        handles.append(Line2D([], [], color=_color(k), lw=1.8, label=f"{name} reference"))
        handles.append(Line2D([], [], color=_prediction_color(k), lw=1.4, ls="--", label=f"{name} prediction"))
    fig.legend(handles=handles, loc="lower center", ncols=min(len(handles), 6), fontsize=8, frameon=True, facecolor="#bbbbbb")
    fig.suptitle(f"{case.case_id}", fontsize=10)
    return _png(fig)
