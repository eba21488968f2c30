"""Find scans in the paths a user gives (NIfTI files, folders of them, DICOM series folders) and load them.

:func:`load_volume` is the one loader: a NIfTI file, a DICOM series folder or a multi-channel case (one
file per channel, stacked on the first channel's grid) becomes a :class:`~medseg.io.volume.Volume`, which
owns the scan's geometry. :func:`load_scan` and :func:`load_channels` are its image, for callers that
want the ``nib.Nifti1Image`` only.

Also exposes :class:`ScanReader`, a MONAI ``ImageReader`` so that ``LoadImaged`` reads NIfTI files and
DICOM series through the same checks as prediction does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
from monai.data import ImageReader
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple

from medseg.errors import ScanError
from medseg.io.channels import group_channel_files
from medseg.io.dicom import DicomSeriesRef, find_dicom_series, read_dicom_series
from medseg.io.nifti import _image_with_geometry, is_nifti_path, load_nifti, nifti_stem
from medseg.io.volume import Volume


@dataclass(frozen=True)
class Scan:
    """One input scan: ``case_id`` names its outputs; it comes from file/folder names, never DICOM tags."""

    case_id: str
    path: Path
    kind: Literal["nifti", "dicom"]
    series: DicomSeriesRef | None = None
    #: A multi-channel case: one NIfTI file per input channel, in channel order (``path`` is the first).
    channels: tuple[Path, ...] = ()


def find_scans(paths: Sequence[Path], channels: int = 1) -> list[Scan]:
    """Scans under the given paths: NIfTI files, folders of NIfTI files, and DICOM series folders.

    nnU-Net channel files ``CASE_0000.nii.gz, CASE_0001.nii.gz...`` are one case named ``CASE``: with
    ``channels`` > 1 (the model's input channels) they are grouped into one multi-channel scan (see
    :func:`medseg.io.channels.group_channel_files`); with one channel a lone ``CASE_0000`` is named ``CASE``.
    """
    scans: list[Scan] = []
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            if not is_nifti_path(path):
                raise ScanError(path, "not a NIfTI file (.nii / .nii.gz) or a DICOM series folder")
            scans.append(Scan(nifti_stem(path), path, "nifti"))
        elif path.is_dir():
            before = len(scans)
            niftis = sorted(p for p in path.iterdir() if p.is_file() and is_nifti_path(p))
            scans.extend(Scan(nifti_stem(p), p, "nifti") for p in niftis)
            for series in find_dicom_series(path):
                # Names come from folder names only, never from DICOM tags (which may identify the patient).
                rel = series.folder.relative_to(path)
                name = "_".join((path.name, *rel.parts)) if rel.parts else path.name
                scans.append(Scan(name, series.folder, "dicom", series))
            if len(scans) == before:
                raise ScanError(path, "no NIfTI files or DICOM series found in this folder")
        else:
            raise ScanError(path, "no such file or folder")
    _number_duplicate_series(scans)
    return group_channel_files(scans, channels)


def _number_duplicate_series(scans: list[Scan]) -> None:
    """Several series in one folder are separate scans: suffix their case ids with _s1, _s2..."""
    counts: dict[str, int] = {}
    for scan in scans:
        counts[scan.case_id] = counts.get(scan.case_id, 0) + 1
    seen: dict[str, int] = {}
    for i, scan in enumerate(scans):
        if scan.kind == "dicom" and counts[scan.case_id] > 1:
            seen[scan.case_id] = seen.get(scan.case_id, 0) + 1
            scans[i] = Scan(f"{scan.case_id}_s{seen[scan.case_id]}", scan.path, scan.kind, scan.series)


def load_volume(
    scan: Scan | Path | Sequence[Path], *, allow_gantry_tilt: bool = False, max_bytes: int | None = None
) -> Volume:
    """The scan as a :class:`~medseg.io.volume.Volume` (an in-memory NIfTI image, RAS affine in mm, and the
    file(s) it came from), through all of medseg's checks. The one place that loads a single file or stacks
    channel files.

    ``scan`` is a found :class:`Scan`, a path (NIfTI file or DICOM series folder) or a list of channel files
    in channel order. NIfTI voxels keep their stored dtype (float32 when the header scales them); DICOM
    series are float32 rescaled values (HU for CT). Several channels are stacked as float32 ``(X, Y, Z, C)``
    on the first channel's grid with its header geometry; a channel off that grid is a
    :class:`~medseg.errors.GeometryError` naming both files. ``allow_gantry_tilt`` and ``max_bytes``: see
    :func:`medseg.io.dicom.read_dicom_series_report`. Every failure is a :class:`ScanError`.
    """
    options = {"allow_gantry_tilt": allow_gantry_tilt, "max_bytes": max_bytes}
    if isinstance(scan, Scan):
        if len(scan.channels) > 1:
            return _stacked(scan.channels, max_bytes)
        if scan.kind == "dicom":
            return Volume(read_dicom_series(scan.path, scan.series, **options), scan.path)
        return Volume(load_nifti(scan.path, max_bytes=max_bytes), scan.path)
    if not isinstance(scan, str | Path):
        paths = [Path(p) for p in scan]
        if not paths:
            raise ValueError("load_volume needs at least one file")
        if len(paths) > 1:
            return _stacked(paths, max_bytes)
        scan = paths[0]
    path = Path(scan)
    if path.is_dir():
        return Volume(read_dicom_series(path, **options), path)
    if not path.exists():
        raise ScanError(path, "no such file or folder")
    if not is_nifti_path(path):
        raise ScanError(path, "not a NIfTI file (.nii / .nii.gz); for DICOM, pass the folder holding the series")
    return Volume(load_nifti(path, max_bytes=max_bytes), path)


def _stacked(paths: Sequence[Path], max_bytes: int | None) -> Volume:
    """Channel files as one float32 ``(X, Y, Z, C)`` volume on the first channel's grid."""
    paths = [Path(p) for p in paths]
    first = load_volume(paths[0], max_bytes=max_bytes)
    arrays = [np.asarray(first.image.dataobj, dtype=np.float32)]
    for path in paths[1:]:
        channel = load_volume(path, max_bytes=max_bytes)
        first.check_same_grid(channel, what="channel")
        arrays.append(np.asarray(channel.image.dataobj, dtype=np.float32))
    return Volume(_image_with_geometry(np.stack(arrays, axis=-1), first.image.header), paths[0], tuple(paths))


def load_scan(
    scan: Scan | Path, *, allow_gantry_tilt: bool = False, max_bytes: int | None = None
) -> nib.Nifti1Image:
    """The scan as an in-memory NIfTI image (3D, RAS affine in mm): :func:`load_volume`'s image."""
    return load_volume(scan, allow_gantry_tilt=allow_gantry_tilt, max_bytes=max_bytes).image


def load_channels(paths: Sequence[Path], *, max_bytes: int | None = None) -> nib.Nifti1Image:
    """Channel files (NIfTI or DICOM series folders) as one float32 4D image ``(X, Y, Z, C)`` on the first
    channel's grid (:func:`load_volume`'s image). A channel off that grid is a :class:`~medseg.errors.GeometryError`."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("load_channels needs at least one file")
    return _stacked(paths, max_bytes).image


class ScanReader(ImageReader):
    """MONAI reader for NIfTI files and DICOM series folders, through medseg's checks."""

    def __init__(self, *, allow_gantry_tilt: bool = False, max_bytes: int | None = None) -> None:
        super().__init__()
        self.allow_gantry_tilt = allow_gantry_tilt
        self.max_bytes = max_bytes

    def verify_suffix(self, filename: Sequence[str] | str) -> bool:
        return all(Path(f).is_dir() or is_nifti_path(Path(f)) for f in ensure_tuple(filename))

    def read(self, data: Sequence[str] | str, **kwargs):
        """One scan, or several channel files (a list) stacked into one 4D image (X, Y, Z, channel)."""
        paths = [Path(p) for p in ensure_tuple(data)]
        return load_volume(paths, allow_gantry_tilt=self.allow_gantry_tilt, max_bytes=self.max_bytes).image

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        if isinstance(img, list | tuple):
            raise NotImplementedError("ScanReader reads one scan per key")
        array = np.asanyarray(img.dataobj)
        # A 4D image holds channels on its last axis (load_channels); EnsureChannelFirst reads this key.
        channel_dim = -1 if array.ndim == 4 else float("nan")
        if array.dtype.kind not in "fiub":
            raise ScanError(img.get_filename() or "scan", f"unsupported voxel type {array.dtype}")
        meta = {
            MetaKeys.AFFINE: np.array(img.affine, copy=True),
            MetaKeys.ORIGINAL_AFFINE: np.array(img.affine, copy=True),
            MetaKeys.SPATIAL_SHAPE: np.asarray(array.shape[:3]),
            MetaKeys.ORIGINAL_CHANNEL_DIM: channel_dim,
            MetaKeys.SPACE: SpaceKeys.RAS,
        }
        return array, meta
