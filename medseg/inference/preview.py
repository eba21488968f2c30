"""``medseg predict --preview``: one PNG per scan (``<case_id>.preview.png``) to check a prediction at a glance.

One row per predicted structure: each foreground class, or for lesion classes (the config's
``evaluate.lesion_classes``) each of its largest lesions; three planes (axial, coronal, sagittal) through
the structure's centre, cropped around it, each plane titled with the file slice a viewer opens and each
row with the centre in LPS mm. Classes are filled in the colours of the model's label table (the colours
viewers and sidecars use) and named in a legend; windows, coordinates and orientation follow the
evaluation report (:mod:`medseg.io.display`), so the window is named on the figure (HU for CT). Figures use ``matplotlib.figure.Figure`` (Agg canvas, no pyplot, no display).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cc3d
import nibabel as nib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from scipy import ndimage

from medseg.atomic import write_atomic
from medseg.data.labels import LabelInfo
from medseg.io.display import DisplayGrid, choose_window, format_lps

#: Lesions shown per lesion class (largest first) and structures per figure.
LESIONS_PER_CLASS = 3
MAX_ROWS = 8
#: Context around a structure: its own extent again on each side, at least this many mm.
MIN_MARGIN_MM = 30.0


@dataclass(frozen=True)
class Structure:
    """What one row shows: a class (and lesion number), its centre (voxel, RAS-ordered array) and box."""

    value: int
    title: str
    centre: tuple[int, int, int]
    box: tuple[slice, slice, slice]
    mask: np.ndarray  # the structure's voxels inside ``box``


def _structures(labels: np.ndarray, spacing: np.ndarray, names: dict[int, str], lesion_classes: Sequence[int]) -> list[Structure]:
    """The rows of a preview: each class present, or each of a lesion class's largest lesions."""
    voxel_ml = float(np.prod(spacing)) / 1000.0
    boxes = ndimage.find_objects(labels)
    out: list[Structure] = []
    for value in sorted(names):
        if value == 0 or value - 1 >= len(boxes) or boxes[value - 1] is None:
            continue
        box = boxes[value - 1]
        inside = labels[box] == value
        if value in lesion_classes:
            comps = cc3d.largest_k(inside, k=LESIONS_PER_CLASS, connectivity=26)
            parts = [(f"{names[value]} #{i}", comps == i) for i in range(1, int(comps.max()) + 1)]
        else:
            parts = [(names[value], inside)]
        for title, part in parts:
            sub = ndimage.find_objects(part.astype(np.uint8))[0]
            assert sub is not None
            whole = tuple(slice(b.start + s.start, b.start + s.stop) for b, s in zip(box, sub, strict=True))
            centre = tuple(int(round(c)) + b.start for c, b in zip(ndimage.center_of_mass(part), box, strict=True))
            out.append(Structure(value, f"{title} ({part.sum() * voxel_ml:.2f} mL)", centre, whole,  # type: ignore[arg-type]
                                 part[sub]))
    return out[:MAX_ROWS]


def render_preview(image: nib.Nifti1Image, mask: nib.Nifti1Image, labels: Sequence[LabelInfo], case_id: str,
                   modality: str | None = None, lesion_classes: Sequence[int] = (),
                   flags: Sequence[str] = ()) -> Figure:
    """The preview figure of one scan and its predicted mask (same grid)."""
    data = np.asanyarray(image.dataobj)
    data = data[..., 0] if data.ndim == 4 else data
    grid = DisplayGrid(np.asarray(mask.affine), mask.shape)
    spacing = np.asarray(grid.spacing)
    img, lab = grid.reorient(data), grid.reorient(np.asanyarray(mask.dataobj).astype(np.uint8))
    names = {label.value: label.name for label in labels}
    colors = {label.value: np.array(label.color) / 255.0 for label in labels}
    rows = _structures(lab, spacing, names, lesion_classes)
    title_lines, title_size = fit_title(f"{case_id}: predicted structures", flags, FIGURE_WIDTH_IN)
    title_in = TITLE_LINE_IN * len(title_lines) * title_size / TITLE_FONT_SIZE
    fig = Figure(figsize=(FIGURE_WIDTH_IN, 3.4 * max(1, len(rows)) + 0.5 + title_in))
    fig.suptitle("\n".join(title_lines), fontsize=title_size, color="firebrick" if flags else "black")
    if not rows:
        ax = fig.subplots(1, 1)
        ax.text(0.5, 0.5, "empty prediction: no structure found", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    axes = np.atleast_2d(fig.subplots(len(rows), 3))
    views = (("axial", 2, (0, 1), True, "RLPA"), ("coronal", 1, (0, 2), True, "RLIS"),
             ("sagittal", 0, (1, 2), False, "PAIS"))
    overlay_lut = np.zeros((256, 4))
    for value, rgb in colors.items():
        if value:
            overlay_lut[value] = [*rgb, 0.4]
    for row, structure in zip(axes, rows, strict=True):
        margin = [max(int(np.ceil(MIN_MARGIN_MM / s)), b.stop - b.start) for s, b in zip(spacing, structure.box, strict=True)]
        crop = tuple(slice(max(b.start - m, 0), min(b.stop + m, n)) for b, m, n in zip(structure.box, margin, lab.shape, strict=True))
        window = choose_window(img[crop], modality == "CT")
        for ax, (view, axis, (a, b), flip, letters) in zip(row, views, strict=True):
            take: list[slice | int] = list(crop)
            take[axis] = structure.centre[axis]
            sl = tuple(take)
            grey, classes = np.asarray(img[sl], dtype=np.float32), lab[sl]
            extent = (0, grey.shape[0] * spacing[a], 0, grey.shape[1] * spacing[b])
            ax.imshow(grey.T, cmap="gray", origin="lower", extent=extent, vmin=window.low, vmax=window.high, interpolation="nearest")
            ax.imshow(overlay_lut[classes.T], origin="lower", extent=extent, interpolation="nearest")
            xs = (np.arange(grey.shape[0]) + 0.5) * spacing[a]
            ys = (np.arange(grey.shape[1]) + 0.5) * spacing[b]
            for value in np.unique(classes):
                if value and not (classes == value).all():
                    ax.contour(xs, ys, (classes == value).T.astype(np.float32), levels=[0.5],
                               colors=[tuple(colors.get(int(value), (1, 0, 0)))], linewidths=1.2)
            if flip:  # radiological convention: the patient's right on the viewer's left
                ax.invert_xaxis()
            ax.set_xticks([])
            ax.set_yticks([])
            left, right, bottom, top = letters
            for text, xy in ((left, (0.03, 0.5)), (right, (0.97, 0.5)), (bottom, (0.5, 0.03)), (top, (0.5, 0.97))):
                ax.text(*xy, text, transform=ax.transAxes, color="yellow", fontsize=9, ha="center", va="center")
            ax.set_title(f"{view}, slice {grid.slice_label(axis, structure.centre[axis])}", fontsize=8)
        row[0].set_ylabel(structure.title, fontsize=9)
        row[2].set_xlabel(f"centre {format_lps(grid.lps(structure.centre))}", fontsize=7)
        row[1].set_xlabel(window.describe(), fontsize=8)
    handles = [Patch(facecolor=colors[v], label=names[v]) for v in sorted(names) if v]
    fig.legend(handles=handles, loc="lower center", ncols=min(len(handles), 6), fontsize=8)
    fig.subplots_adjust(bottom=0.8 / fig.get_figheight(), top=1 - (0.3 + title_in) / fig.get_figheight(),
                        hspace=0.35, wspace=0.05)
    return fig


FIGURE_WIDTH_IN = 11.0
TITLE_FONT_SIZE = 10.0
#: Height of one title line (10 pt text at matplotlib's 1.2 line spacing, and some air), inches.
TITLE_LINE_IN = 0.2
#: The title may use this share of the figure's width (the rest is a margin at each edge).
TITLE_WIDTH_SHARE = 0.96


def text_width_in(text: str, fontsize: float) -> float:
    """Width of one line of ``text`` in matplotlib's default font at ``fontsize`` points, inches (the Agg
    renderer's own metrics, so it is what the PNG shows)."""
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import TextToPath

    width, _, _ = TextToPath().get_text_width_height_descent(text, FontProperties(size=fontsize), ismath=False)
    return width / 72.0


def fit_title(heading: str, flags: Sequence[str], width_in: float) -> tuple[list[str], float]:
    """The figure title as lines that fit ``width_in``: the heading, then the QC flags packed onto
    "QC: a; b" lines; the font shrinks (to 6 pt at least) only if one heading or flag alone is too wide.
    A real CT with several flags once had a one-line title cut at both edges of the PNG."""
    limit = width_in * TITLE_WIDTH_SHARE
    size = TITLE_FONT_SIZE
    while True:
        lines = [heading]
        current = ""
        for flag in flags:
            candidate = f"{current}; {flag}" if current else f"QC: {flag}"
            if current and text_width_in(candidate, size) > limit:
                lines.append(current)
                candidate = f"QC: {flag}"
            current = candidate
        if current:
            lines.append(current)
        if size <= 6 or all(text_width_in(line, size) <= limit for line in lines):
            return lines, size
        size -= 1


def preview_path(output_dir: Path, case_id: str) -> Path:
    """Where a scan's preview goes: ``<case_id>.preview.png``."""
    return Path(output_dir) / f"{case_id}.preview.png"


def write_preview(target: Path, image: nib.Nifti1Image, mask: nib.Nifti1Image, labels: Sequence[LabelInfo],
                  case_id: str, modality: str | None = None, lesion_classes: Sequence[int] = (),
                  flags: Sequence[str] = ()) -> Path:
    """Render the preview and write it atomically as PNG."""
    fig = render_preview(image, mask, labels, case_id, modality, lesion_classes, flags)
    return write_atomic(Path(target), lambda tmp: fig.savefig(tmp, format="png", dpi=80), suffix=".png")
