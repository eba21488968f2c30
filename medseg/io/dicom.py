"""DICOM series: find, sort and stack slices into a volume with its scanner geometry.

Slices are ordered by ImagePositionPatient projected on the slice normal (never by file order or
InstanceNumber), and the affine is built from the DICOM LPS frame converted to NIfTI's RAS.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom

from medseg.errors import DicomSeriesError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class DicomSeriesRef:
    """One series found on disk: the folder it was found in and its files (sorted by name)."""

    folder: Path
    series_uid: str
    files: tuple[Path, ...] = field(repr=False)


def _read_header(path: Path) -> pydicom.Dataset | None:
    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    except Exception:
        return None
    return ds if "SeriesInstanceUID" in ds else None


def find_dicom_series(folder: Path) -> list[DicomSeriesRef]:
    """Series under ``folder`` (recursively), grouped by SeriesInstanceUID; non-DICOM files are ignored."""
    folder = Path(folder)
    groups: dict[tuple[Path, str], list[Path]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        ds = _read_header(path)
        if ds is None:
            continue
        groups.setdefault((path.parent, str(ds.SeriesInstanceUID)), []).append(path)
    return [DicomSeriesRef(parent, uid, tuple(files)) for (parent, uid), files in sorted(groups.items())]


def is_dicom_folder(folder: Path) -> bool:
    """True when ``folder`` holds at least one DICOM file directly."""
    return any(
        _read_header(p) is not None for p in sorted(Path(folder).iterdir()) if p.is_file() and not p.name.startswith(".")
    )


def read_dicom_series(folder: Path, series: DicomSeriesRef | None = None) -> nib.Nifti1Image:
    """Read one series into a float32 volume (rescaled values, e.g. HU) with a RAS affine in mm."""
    folder = Path(folder)
    if series is None:
        found = [s for s in find_dicom_series(folder) if s.folder == folder] or find_dicom_series(folder)
        if not found:
            raise DicomSeriesError(folder, "no DICOM files found")
        if len(found) > 1:
            raise DicomSeriesError(folder, f"holds {len(found)} DICOM series; expected exactly one")
        series = found[0]
    slices = [pydicom.dcmread(str(p)) for p in series.files]
    orientation = np.array(slices[0].ImageOrientationPatient, dtype=float)
    row_cos, col_cos = orientation[:3], orientation[3:]
    normal = np.cross(row_cos, col_cos)
    slices.sort(key=lambda ds: float(np.dot(np.array(ds.ImagePositionPatient, dtype=float), normal)))
    positions = np.array([ds.ImagePositionPatient for ds in slices], dtype=float)
    row_spacing, col_spacing = (float(v) for v in slices[0].PixelSpacing)
    if len(slices) > 1:
        slice_step = (positions[-1] - positions[0]) / (len(slices) - 1)
    else:
        slice_step = normal * float(getattr(slices[0], "SliceThickness", 1.0) or 1.0)
    try:
        planes = [
            ds.pixel_array.astype(np.float32) * float(getattr(ds, "RescaleSlope", 1) or 1)
            + float(getattr(ds, "RescaleIntercept", 0) or 0)
            for ds in slices
        ]
    except Exception as exc:
        syntax = slices[0].file_meta.get("TransferSyntaxUID", "unknown")
        raise DicomSeriesError(folder, f"cannot decode pixel data (transfer syntax {syntax}): {exc}") from None
    # pixel_array is (rows, columns); NIfTI voxel order is (column index i, row index j, slice k).
    volume = np.stack(planes, axis=-1).transpose(1, 0, 2)
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_cos * col_spacing
    affine_lps[:3, 1] = col_cos * row_spacing
    affine_lps[:3, 2] = slice_step
    affine_lps[:3, 3] = positions[0]
    img = nib.Nifti1Image(np.ascontiguousarray(volume), LPS_TO_RAS @ affine_lps)
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    return img
