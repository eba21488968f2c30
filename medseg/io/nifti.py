"""Reading NIfTI scans and writing masks in the exact geometry of the scan they came from."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from medseg.atomic import write_atomic
from medseg.errors import GeometryError, ScanError

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def is_nifti_path(path: Path) -> bool:
    """True for ``*.nii`` and ``*.nii.gz`` names (temporary ``.name`` files excluded)."""
    name = path.name.lower()
    return not path.name.startswith(".") and name.endswith(NIFTI_SUFFIXES)


def nifti_stem(path: Path) -> str:
    """File name without its NIfTI suffix: ``case_01.nii.gz`` -> ``case_01``."""
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def load_nifti(path: Path) -> nib.Nifti1Image:
    """Load a 3D NIfTI scan; trailing singleton dimensions are dropped, anything else non-3D is refused."""
    path = Path(path)
    try:
        img = nib.load(str(path))
    except FileNotFoundError:
        raise ScanError(path, "file not found") from None
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise ScanError(path, f"not a readable NIfTI file ({type(exc).__name__}: {exc})") from None
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise ScanError(path, f"expected a NIfTI image, got {type(img).__name__}")
    shape = img.shape
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise ScanError(path, f"expected a 3D scan, got an image of shape {img.shape}")
    if shape != img.shape:
        img = nib.Nifti1Image(np.asanyarray(img.dataobj).reshape(shape), None, img.header.copy())
    check_affine(img.affine, path)
    return img


def check_affine(affine: np.ndarray, path: Path) -> None:
    """Refuse affines that no scanner writes: non-finite values or zero spacing."""
    if not np.all(np.isfinite(affine)):
        raise GeometryError(path, f"affine has non-finite values:\n{affine}")
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if np.any(spacing <= 0):
        raise GeometryError(path, f"voxel spacing must be positive, got {spacing.tolist()} mm")


def mask_like(mask: np.ndarray, reference: nib.Nifti1Image) -> nib.Nifti1Image:
    """A uint8 label image on the reference scan's grid, with its header geometry copied field by field.

    The affine is not recomputed: qform/sform and their codes are taken from the reference header,
    so the mask overlays the scan exactly in any viewer.
    """
    spatial = reference.shape[:3]
    if tuple(mask.shape) != tuple(spatial):
        raise ValueError(f"mask shape {mask.shape} differs from the scan's {spatial}")
    header = nib.Nifti1Header()
    ref_header = reference.header
    if isinstance(ref_header, nib.Nifti1Header):
        for key in ("qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d",
                    "qoffset_x", "qoffset_y", "qoffset_z", "srow_x", "srow_y", "srow_z", "pixdim", "xyzt_units"):
            header[key] = ref_header[key]
    header.set_data_shape(spatial)
    header.set_data_dtype(np.uint8)
    out = nib.Nifti1Image(np.asarray(mask, dtype=np.uint8), None, header)
    if not isinstance(ref_header, nib.Nifti1Header):
        out.set_sform(reference.affine, code=1)
        out.set_qform(reference.affine, code=1)
    out.header.set_slope_inter(1.0, 0.0)
    return out


def save_atomic(img: nib.Nifti1Image, path: Path) -> Path:
    """Write a NIfTI image atomically (temporary file in the same folder, then rename)."""
    suffix = ".nii.gz" if str(path).lower().endswith(".gz") else ".nii"
    return write_atomic(Path(path), lambda tmp: nib.save(img, str(tmp)), suffix=suffix)
