"""A scan's geometry, owned in one place: the :class:`Volume` that scan loading returns.

Every geometric fact of a scan is derived here from its voxel-to-world affine (NIfTI convention: RAS,
mm) and asked of here by everyone else, so spacing, orientation or "same grid" never mean two things:

* spacing (mm) along the array axes: the column norms of the affine's 3x3 part;
* RAS spacing (mm): the same spacings reordered to the R-L, A-P, S-I world axes, whatever the array order
  (what the planning fingerprint and the QC limits compare);
* the orientation code (``"RAS"``, ``"LPS"``...): the world axis each array axis points closest to;
* the voxel volume (mL): |det| of the 3x3 part / 1000, exact also for oblique grids;
* one same-grid check (:func:`check_same_grid`): same spatial shape and every voxel centre within
  :data:`GRID_TOLERANCE_MM` of its counterpart, else a :class:`~medseg.errors.GeometryError` naming both files.

The functions take an affine so that code holding only a header (the memory estimate) or a mask's affine
(statistics, metrics) asks the same derivation as a loaded :class:`Volume`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import io_orientation, ornt2axcodes

from medseg.errors import GeometryError

#: Largest distance (mm) between a voxel centre of one grid and the same voxel's centre in another that is
#: still called the same grid. Header rounding (float32 affines, DICOM decimal strings) moves centres by
#: well under 1e-3 mm across a 512-voxel axis; a misregistered or resampled file moves them by far more.
GRID_TOLERANCE_MM = 1e-2


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel edge lengths (mm) along the array axes: the column norms of the affine's 3x3 part."""
    return tuple(float(s) for s in np.linalg.norm(np.asarray(affine, dtype=float)[:3, :3], axis=0))  # type: ignore[return-value]


def axis_order(affine: np.ndarray) -> np.ndarray:
    """nibabel's orientation of the array axes, ``(3, 2)``: row i is (RAS axis of array axis i, +1/-1 flip)."""
    return io_orientation(np.asarray(affine, dtype=float))


def ras_spacing(affine: np.ndarray) -> list[float]:
    """Voxel spacing (mm) per RAS axis (R-L, A-P, S-I), whatever the array order."""
    spacing = np.asarray(voxel_spacing(affine))
    order = axis_order(affine)[:, 0].astype(int)  # array axis i -> RAS axis order[i]
    ras = np.empty(3)
    ras[order] = spacing
    return [float(v) for v in ras]


def orientation_code(affine: np.ndarray) -> str:
    """The orientation code of the array axes, e.g. ``"RAS"`` or ``"LPS"`` (the direction each axis increases)."""
    return "".join(ornt2axcodes(axis_order(affine)))


def voxel_volume_ml(affine: np.ndarray) -> float:
    """Volume of one voxel in mL (|det| of the affine's 3x3 part, mm^3, / 1000); exact also for sheared grids."""
    return float(abs(np.linalg.det(np.asarray(affine, dtype=float)[:3, :3]))) / 1000.0


@dataclass(frozen=True)
class GridMismatch:
    """How a grid differs from a reference grid: ``part`` is the first of shape, spacing, origin or
    orientation that differs, ``distance_mm`` the largest voxel-centre distance (0 for a shape mismatch)."""

    part: str
    distance_mm: float


def grid_mismatch(reference_affine: np.ndarray, reference_shape: tuple[int, ...], affine: np.ndarray,
                  shape: tuple[int, ...]) -> GridMismatch | None:
    """None when two grids are the same (spatial shape equal, every voxel centre within
    :data:`GRID_TOLERANCE_MM`), else what differs. The one same-grid rule of medseg."""
    a_shape, b_shape = tuple(int(s) for s in reference_shape[:3]), tuple(int(s) for s in shape[:3])
    if a_shape != b_shape:
        return GridMismatch("shape", 0.0)
    difference = np.asarray(affine, dtype=float) - np.asarray(reference_affine, dtype=float)
    # The displacement is affine in the voxel index, so its largest norm is at a corner of the grid.
    corners = np.array([[*c, 1.0] for c in itertools.product(*[(0.0, n - 1.0) for n in a_shape])])
    distance = float(np.linalg.norm(corners @ difference[:3].T, axis=1).max())
    if distance <= GRID_TOLERANCE_MM:
        return None
    a_spacing, b_spacing = np.asarray(voxel_spacing(reference_affine)), np.asarray(voxel_spacing(affine))
    a_origin, b_origin = np.asarray(reference_affine, float)[:3, 3], np.asarray(affine, float)[:3, 3]
    extent = np.asarray(a_shape, dtype=float) - 1.0
    if np.any(np.abs(a_spacing - b_spacing) * extent > GRID_TOLERANCE_MM):
        part = "spacing"
    elif np.linalg.norm(a_origin - b_origin) > GRID_TOLERANCE_MM:
        part = "origin"
    else:
        part = "orientation"
    return GridMismatch(part, distance)


def _compact(affine: np.ndarray) -> str:
    return np.array2string(np.asarray(affine, dtype=float)[:3], precision=3, suppress_small=True).replace("\n", "")


@dataclass(frozen=True)
class Volume:
    """A loaded scan and the geometry it owns: an in-memory NIfTI image (3D, or 4D with channels last as
    stacked channel files give) and the file(s) it came from, which messages name."""

    image: nib.Nifti1Image
    #: The scan's file or DICOM series folder (the first channel's for stacked channels).
    path: Path | None = None
    #: Every channel file of a stacked multi-channel case, in channel order (empty for one file).
    files: tuple[Path, ...] = ()

    @property
    def name(self) -> str:
        """The file a message names: the path, else the image's own file name, else ``scan``."""
        return str(self.path or self.image.get_filename() or "scan")

    @property
    def affine(self) -> np.ndarray:
        """Voxel-to-world affine (4x4, RAS mm), as a float64 copy."""
        return np.array(self.image.affine, dtype=float)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape (voxels per array axis)."""
        return tuple(int(s) for s in self.image.shape[:3])  # type: ignore[return-value]

    @property
    def channels(self) -> int:
        """Input channels: the 4th axis of a stacked image, else 1."""
        return int(self.image.shape[3]) if len(self.image.shape) == 4 else 1

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel spacing (mm) along the array axes."""
        return voxel_spacing(self.image.affine)

    @property
    def ras_spacing(self) -> list[float]:
        """Voxel spacing (mm) per RAS axis (R-L, A-P, S-I)."""
        return ras_spacing(self.image.affine)

    @property
    def orientation(self) -> str:
        """Orientation code of the array axes, e.g. ``"RAS"``."""
        return orientation_code(self.image.affine)

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel (mL)."""
        return voxel_volume_ml(self.image.affine)

    def check_same_grid(self, other: Volume, what: str = "channel", reference_what: str = "first channel") -> None:
        """Refuse ``other`` unless it lies on this volume's grid (see :func:`check_same_grid`)."""
        check_same_grid(self, other, what, reference_what)


def check_same_grid(reference: Volume, other: Volume, what: str = "channel",
                    reference_what: str = "first channel") -> None:
    """Refuse ``other`` unless it has ``reference``'s spatial shape and every voxel centre within
    :data:`GRID_TOLERANCE_MM`; the :class:`~medseg.errors.GeometryError` names both files and what differs.
    ``what`` and ``reference_what`` name the two in the message (channel / first channel, prediction /
    reference...)."""
    mismatch = grid_mismatch(reference.image.affine, reference.shape, other.image.affine, other.shape)
    if mismatch is None:
        return
    advice = ("a case's files must share one voxel grid (register and resample them onto one grid first, or "
              "compare files written on the same grid)")
    if mismatch.part == "shape":
        raise GeometryError(other.name, f"{what} shape {other.shape} differs from {reference_what} {reference.name}'s "
                                        f"{reference.shape}; {advice}")
    raise GeometryError(other.name, f"{what} affine {_compact(other.image.affine)} differs from {reference_what} "
                                    f"{reference.name}'s {_compact(reference.image.affine)} ({mismatch.part} differs: "
                                    f"voxel centres up to {mismatch.distance_mm:.4g} mm apart, tolerance "
                                    f"{GRID_TOLERANCE_MM} mm); {advice}")


__all__ = [
    "GRID_TOLERANCE_MM", "GridMismatch", "Volume", "axis_order", "check_same_grid", "grid_mismatch",
    "orientation_code", "ras_spacing", "voxel_spacing", "voxel_volume_ml",
]
