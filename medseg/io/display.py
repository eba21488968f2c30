"""How masks and scans are shown to a reader: colours, intensity windows and viewer coordinates.

One small module so every picture (report.html, the prediction preview) draws the same way:

* **colours**: reference and prediction differ by hue *and* line style, from the Okabe-Ito palette, which
  stays distinct under the common colour-vision deficiencies: reference orange, solid; prediction sky
  blue, dashed. A lesion marker is white.
* **windows**: a CT (a volume whose air is near -1000 HU) is shown with a named HU window, lung
  (W 1500 / L -600) where the shown region is mostly air or lung, else soft tissue (W 400 / L 40); an MR
  or other image with the 1st-99th percentile of the shown region, named as such.
* **coordinates**: a voxel is named by its index (i, j, k) in the file's own array, which is what 3D Slicer
  and ITK-SNAP show at the cursor, and by its position in LPS mm (the DICOM and Slicer convention: x to
  the patient's left, y to the back, z up), from the file's affine. nibabel's affines are RAS, so
  LPS = (-x, -y, z).

It depends on numpy, nibabel and :mod:`medseg.io.volume` (which owns spacing and orientation) and sits in ``io`` so that pictures drawn
at predict time (:mod:`medseg.inference.preview`) and in evaluation reports use the same windows and
coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from nibabel.affines import apply_affine
from nibabel.orientations import apply_orientation

from medseg.io.volume import axis_order, ras_spacing

# Okabe & Ito (2008), "Color Universal Design": distinct for protan, deutan and tritan readers.
REFERENCE_COLOR = "#E69F00"  # orange
PREDICTION_COLOR = "#56B4E9"  # sky blue: lighter than Okabe-Ito blue, so it stays visible on dark CT
MARKER_COLOR = "#FFFFFF"
REFERENCE_STYLE = "solid"
PREDICTION_STYLE = "dashed"

# A volume whose 1st intensity percentile lies below this is taken for a CT in HU (air is -1000 HU; MR
# intensities, raw or z-scored, are not this negative).
CT_AIR_THRESHOLD_HU = -500.0
# Share of the shown region below -400 HU (air or lung) from which the lung window is chosen.
LUNG_SHARE = 0.3


@dataclass(frozen=True)
class Window:
    """An intensity window: the values mapped to black (``low``) and white (``high``), and its name."""

    name: str
    low: float
    high: float

    def describe(self) -> str:
        """The window as a reader would name it, e.g. ``CT lung window W 1500 / L -600 HU``."""
        return self.name


CT_WINDOWS = {"lung": (1500.0, -600.0), "soft tissue": (400.0, 40.0)}


def ct_window(name: str) -> Window:
    """A named CT window from its width and level (HU)."""
    width, level = CT_WINDOWS[name]
    return Window(f"CT {name} window W {width:g} / L {level:g} HU", level - width / 2, level + width / 2)


def looks_like_ct(image: np.ndarray) -> bool:
    """Whether a volume's values are CT Hounsfield units: its 1st percentile is air-like (< -500)."""
    values = np.asarray(image)
    if values.size == 0:
        return False
    sample = values.ravel()[:: max(1, values.size // 200_000)]  # a strided sample: percentiles of a CT in ms
    return bool(np.percentile(sample, 1) < CT_AIR_THRESHOLD_HU)


def choose_window(region: np.ndarray, is_ct: bool) -> Window:
    """The window for a shown region: a named CT window (lung or soft tissue) or the 1st-99th percentile."""
    values = np.asarray(region, dtype=np.float32)
    if is_ct:
        return ct_window("lung" if values.size and np.mean(values < -400) >= LUNG_SHARE else "soft tissue")
    lo, hi = (np.percentile(values, [1, 99]) if values.size else (0.0, 1.0))
    hi = hi if hi > lo else lo + 1
    return Window(f"1st-99th percentile of the shown region ({lo:.4g} to {hi:.4g})", float(lo), float(hi))


def lps_mm(affine: np.ndarray, voxel: tuple[float, float, float] | np.ndarray) -> tuple[float, float, float]:
    """LPS position (mm) of a voxel index (i, j, k) of the file whose NIfTI (RAS) ``affine`` is given."""
    r, a, s = apply_affine(np.asarray(affine), np.asarray(voxel, dtype=np.float64))
    return (float(-r), float(-a), float(s))


def format_voxel(voxel: tuple[int, ...] | np.ndarray) -> str:
    """``(i, j, k) = (12, 40, 7)``: a voxel index of the file's array."""
    return "(i, j, k) = (" + ", ".join(str(int(v)) for v in voxel) + ")"


def format_lps(position: tuple[float, float, float]) -> str:
    """``LPS (x, y, z) = (-21.9, 120.5, -611.5) mm``."""
    return "LPS (x, y, z) = (" + ", ".join(f"{v:.1f}" for v in position) + ") mm"


class DisplayGrid:
    """A file's voxel grid reoriented to the closest RAS orientation for drawing, with the way back.

    Pictures are drawn on the reoriented array (axial slices are then array planes, radiological view by
    flipping x); the slice a reader should open is the index in the file's own array, which
    :meth:`file_index` gives for any index of the reoriented array.
    """

    AXES = "ijk"

    def __init__(self, affine: np.ndarray, shape: tuple[int, ...]) -> None:
        self.affine = np.asarray(affine, dtype=np.float64)
        self.file_shape = tuple(int(n) for n in shape[:3])
        self.ornt = axis_order(self.affine)
        #: Spacing (mm) of the reoriented array's axes: the RAS spacing of the file's grid.
        self.spacing: tuple[float, float, float] = tuple(ras_spacing(self.affine))  # type: ignore[assignment]
        self.shape = tuple(self.file_shape[int(np.flatnonzero(self.ornt[:, 0] == axis)[0])] for axis in range(3))

    def reorient(self, array: np.ndarray) -> np.ndarray:
        """``array`` (file order) in RAS-closest order."""
        return apply_orientation(array, self.ornt)

    def file_axis(self, display_axis: int) -> int:
        """The file's array axis (0, 1, 2 = i, j, k) that the reoriented axis ``display_axis`` comes from."""
        return int(np.flatnonzero(self.ornt[:, 0] == display_axis)[0])

    def file_index(self, display_voxel: tuple[int, int, int] | np.ndarray) -> tuple[int, int, int]:
        """The file's voxel index (i, j, k) of a voxel of the reoriented array."""
        out = [0, 0, 0]
        for file_axis in range(3):
            display_axis, flip = int(self.ornt[file_axis, 0]), self.ornt[file_axis, 1] < 0
            index = int(display_voxel[display_axis])
            out[file_axis] = self.file_shape[file_axis] - 1 - index if flip else index
        return tuple(out)  # type: ignore[return-value]

    def display_index(self, file_voxel: tuple[int, int, int] | np.ndarray) -> tuple[int, int, int]:
        """The reoriented array's voxel of a file voxel index (inverse of :meth:`file_index`)."""
        out = [0, 0, 0]
        for file_axis in range(3):
            display_axis, flip = int(self.ornt[file_axis, 0]), self.ornt[file_axis, 1] < 0
            index = int(file_voxel[file_axis])
            out[display_axis] = self.file_shape[file_axis] - 1 - index if flip else index
        return tuple(out)  # type: ignore[return-value]

    def display_box(self, file_box: tuple[slice, slice, slice]) -> tuple[slice, slice, slice]:
        """A box of file voxel indices as a box of the reoriented array."""
        first = self.display_index([s.start for s in file_box])
        last = self.display_index([s.stop - 1 for s in file_box])
        return tuple(slice(min(a, b), max(a, b) + 1) for a, b in zip(first, last, strict=True))  # type: ignore[return-value]

    def slice_label(self, display_axis: int, display_index: int) -> str:
        """``k = 23 of 48``: the file slice a viewer shows for a reoriented plane ``display_axis`` = index."""
        file_axis = self.file_axis(display_axis)
        voxel = [0, 0, 0]
        voxel[display_axis] = display_index
        index = self.file_index(voxel)[file_axis]
        return f"{self.AXES[file_axis]} = {index} of {self.file_shape[file_axis]}"

    def lps(self, display_voxel: tuple[int, int, int] | np.ndarray) -> tuple[float, float, float]:
        """LPS mm of a voxel of the reoriented array."""
        return lps_mm(self.affine, self.file_index(display_voxel))


__all__ = [
    "CT_WINDOWS", "MARKER_COLOR", "PREDICTION_COLOR", "PREDICTION_STYLE", "REFERENCE_COLOR", "REFERENCE_STYLE",
    "DisplayGrid", "Window", "choose_window", "ct_window", "format_lps", "format_voxel", "looks_like_ct", "lps_mm",
]
