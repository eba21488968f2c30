"""Checks on scan geometry shared by the NIfTI and DICOM readers, and label-versus-image checks.

A voxel-to-world affine (4x4, mm) is usable when it is finite, every voxel axis has a positive length
(spacing) and the three axes are orthogonal: NIfTI consumers (MONAI, ITK, viewers) assume a rotation
times a diagonal scaling, so a sheared affine would be silently "fixed" by one tool and not another.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np

from medseg.errors import GeometryError, ScanError

#: |cos| of the angle between two voxel axes above which the axes are called sheared (about 0.06 degrees).
SHEAR_TOLERANCE = 1e-3
#: Default cap on the in-memory size of one scan, in bytes; ``MEDSEG_MAX_SCAN_BYTES`` overrides it.
DEFAULT_MAX_SCAN_BYTES = 4 * 1024**3
MAX_SCAN_BYTES_ENV = "MEDSEG_MAX_SCAN_BYTES"
#: Label-versus-image tolerances: float32 headers and DICOM rounding give differences far below these.
LABEL_SPACING_RTOL = 1e-4
LABEL_ORIGIN_ATOL_MM = 1e-3
LABEL_DIRECTION_ATOL = 1e-4


def max_scan_bytes(override: int | None = None) -> int:
    """The size cap for one scan in bytes: ``override``, else ``$MEDSEG_MAX_SCAN_BYTES``, else 4 GiB."""
    if override is not None:
        return int(override)
    raw = os.environ.get(MAX_SCAN_BYTES_ENV)
    if raw:
        try:
            return int(float(raw))
        except ValueError:
            raise ScanError(Path(MAX_SCAN_BYTES_ENV), f"environment variable must be a number of bytes, got {raw!r}") from None
    return DEFAULT_MAX_SCAN_BYTES


def check_size(path: Path, shape: tuple[int, ...], itemsize: int, max_bytes: int | None = None) -> None:
    """Refuse a scan whose voxel count x bytes per voxel exceeds the cap, before anything is allocated."""
    limit = max_scan_bytes(max_bytes)
    size = int(np.prod([int(s) for s in shape], dtype=object)) * int(itemsize)
    if size > limit:
        raise ScanError(
            path,
            f"scan of shape {tuple(int(s) for s in shape)} needs {size / 2**30:.2f} GiB in memory, above the "
            f"limit of {limit / 2**30:.2f} GiB (raise it with max_bytes= or ${MAX_SCAN_BYTES_ENV})",
        )


def check_affine(affine: np.ndarray, path: Path) -> None:
    """Refuse affines no scanner writes: non-finite values, zero spacing, or sheared (non-orthogonal) axes."""
    affine = np.asarray(affine, dtype=float)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise GeometryError(path, f"affine has non-finite values or is not 4x4:\n{affine}")
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if np.any(spacing <= 0):
        raise GeometryError(path, f"voxel spacing must be positive, got {spacing.round(6).tolist()} mm")
    directions = affine[:3, :3] / spacing
    cosines = directions.T @ directions
    off_diagonal = np.abs(cosines - np.eye(3)).max()
    if off_diagonal > SHEAR_TOLERANCE:
        raise GeometryError(
            path,
            f"voxel axes are sheared (not orthogonal: largest |cos| between axes {off_diagonal:.4f}, "
            f"tolerance {SHEAR_TOLERANCE}); direction columns:\n{directions.round(5)}",
        )


def check_spacing_values(spacing: np.ndarray | tuple[float, ...], path: Path, what: str = "voxel spacing") -> None:
    """Refuse zero, negative or non-finite spacings (mm), e.g. NIfTI pixdim[1:4] or DICOM PixelSpacing."""
    values = np.asarray(spacing, dtype=float)
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise GeometryError(path, f"{what} must be positive and finite, got {values.tolist()} mm")


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel edge lengths (mm) along the array axes: the column norms of the affine's 3x3 part."""
    return tuple(float(s) for s in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))  # type: ignore[return-value]


def voxel_volume_ml(affine: np.ndarray) -> float:
    """Volume of one voxel in mL (|det| of the affine's 3x3 part, mm^3, / 1000); exact also for sheared grids."""
    return float(abs(np.linalg.det(np.asarray(affine)[:3, :3]))) / 1000.0


def _geometry(img: nib.Nifti1Image) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Spacing (mm), origin (mm) and unit direction columns of an image's affine."""
    affine = np.asarray(img.affine, dtype=float)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    return spacing, affine[:3, 3], affine[:3, :3] / np.where(spacing > 0, spacing, 1.0)


def check_label_matches_image(
    image: nib.Nifti1Image, label: nib.Nifti1Image, label_values: set[int], path: Path
) -> None:
    """Refuse a label map that is not on its image's grid or holds values outside ``label_values``.

    Shape, spacing (relative 1e-4), origin (1e-3 mm) and direction cosines (1e-4) must agree: a label on
    a slightly different grid would silently train or score the wrong voxels. ``path`` names the label.
    """
    path = Path(path)
    image_shape, label_shape = tuple(image.shape[:3]), tuple(label.shape)
    if len(label_shape) != 3 or label_shape != image_shape:
        raise GeometryError(path, f"label shape {label_shape} differs from its image's {image_shape}")
    i_spacing, i_origin, i_dirs = _geometry(image)
    l_spacing, l_origin, l_dirs = _geometry(label)
    if not np.allclose(l_spacing, i_spacing, rtol=LABEL_SPACING_RTOL, atol=0):
        raise GeometryError(
            path, f"label spacing {l_spacing.round(6).tolist()} mm differs from its image's {i_spacing.round(6).tolist()} mm"
        )
    if not np.allclose(l_origin, i_origin, rtol=0, atol=LABEL_ORIGIN_ATOL_MM):
        raise GeometryError(
            path, f"label origin {l_origin.round(4).tolist()} mm differs from its image's {i_origin.round(4).tolist()} mm"
        )
    if not np.allclose(l_dirs, i_dirs, rtol=0, atol=LABEL_DIRECTION_ATOL):
        raise GeometryError(
            path,
            f"label orientation {nib.aff2axcodes(label.affine)} / directions\n{l_dirs.round(5)}\ndiffer from its "
            f"image's {nib.aff2axcodes(image.affine)} /\n{i_dirs.round(5)}",
        )
    data = np.asanyarray(label.dataobj)
    if data.dtype.kind == "f":
        if not np.all(np.isfinite(data)):
            raise ScanError(path, "label holds NaN or infinite values")
        if np.any(data != np.round(data)):
            raise ScanError(path, "label holds non-integer values; expected integer class values")
    found = {int(v) for v in np.unique(data)}
    unknown = sorted(found - {int(v) for v in label_values})
    if unknown:
        raise ScanError(
            path, f"label holds values {unknown[:10]} not declared in the manifest's labels {sorted(label_values)}"
        )
