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
from medseg.io.volume import grid_mismatch, orientation_code, voxel_spacing, voxel_volume_ml

__all__ = ["check_affine", "check_label_matches_image", "check_size", "check_spacing_values", "max_scan_bytes",
           "voxel_spacing", "voxel_volume_ml"]  # the last two live in medseg.io.volume; re-exported for callers

#: |cos| of the angle between two voxel axes above which the axes are called sheared (about 0.06 degrees).
SHEAR_TOLERANCE = 1e-3
#: Default cap on the in-memory size of one scan, in bytes; ``MEDSEG_MAX_SCAN_BYTES`` overrides it.
DEFAULT_MAX_SCAN_BYTES = 4 * 1024**3
MAX_SCAN_BYTES_ENV = "MEDSEG_MAX_SCAN_BYTES"


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
    spacing = np.asarray(voxel_spacing(affine))
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


def check_label_matches_image(
    image: nib.Nifti1Image, label: nib.Nifti1Image, label_values: set[int], path: Path
) -> None:
    """Refuse a label map that is not on its image's grid or holds values outside ``label_values``.

    The grid check is medseg's one same-grid rule (:func:`medseg.io.volume.grid_mismatch`: shape, and every
    voxel centre within ``GRID_TOLERANCE_MM``): a label on a slightly different grid would silently train or
    score the wrong voxels. ``path`` names the label; the message says which of spacing, origin or
    orientation differs, with both values.
    """
    path = Path(path)
    image_shape, label_shape = tuple(image.shape[:3]), tuple(label.shape)
    if len(label_shape) != 3 or label_shape != image_shape:
        raise GeometryError(path, f"label shape {label_shape} differs from its image's {image_shape}")
    mismatch = grid_mismatch(image.affine, image_shape, label.affine, label_shape)
    if mismatch is not None:
        i_affine, l_affine = np.asarray(image.affine, dtype=float), np.asarray(label.affine, dtype=float)
        apart = f" (voxel centres up to {mismatch.distance_mm:.4g} mm apart)"
        if mismatch.part == "spacing":
            raise GeometryError(path, f"label spacing {np.round(voxel_spacing(l_affine), 6).tolist()} mm differs from its "
                                      f"image's {np.round(voxel_spacing(i_affine), 6).tolist()} mm{apart}")
        if mismatch.part == "origin":
            raise GeometryError(path, f"label origin {l_affine[:3, 3].round(4).tolist()} mm differs from its image's "
                                      f"{i_affine[:3, 3].round(4).tolist()} mm{apart}")
        l_dirs = l_affine[:3, :3] / np.asarray(voxel_spacing(l_affine))
        i_dirs = i_affine[:3, :3] / np.asarray(voxel_spacing(i_affine))
        raise GeometryError(
            path,
            f"label orientation {tuple(orientation_code(l_affine))} / directions\n{l_dirs.round(5)}\ndiffer from its "
            f"image's {tuple(orientation_code(i_affine))} /\n{i_dirs.round(5)}{apart}",
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
