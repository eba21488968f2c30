"""Multi-channel scans (T1/T2/FLAIR, CT+PET): one 3D file per channel, stacked into one 4D image.

A multi-channel case is a list of channel files on one voxel grid. :func:`load_channels` checks that
every channel shares the first channel's shape and affine (no silent resampling: a misregistered channel
is refused, naming both files) and stacks them as float32 ``(X, Y, Z, C)`` with the first channel's
header geometry, so a mask written with :func:`medseg.io.nifti.mask_like` lies on the first channel's grid.

Files in nnU-Net naming (``CASE_0000.nii.gz``, ``CASE_0001.nii.gz``...) are grouped into one case ``CASE``
by :func:`group_channel_files`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from medseg.errors import ScanError

CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")

#: Largest difference (mm) between two channels' affines still taken as one grid (header rounding).
AFFINE_TOLERANCE_MM = 1e-3


def channel_file_name(case_id: str, channel: int, ending: str = ".nii.gz") -> str:
    """nnU-Net's name of one channel file: ``CASE_0001.nii.gz``."""
    return f"{case_id}_{channel:04d}{ending}"


def check_same_grid(reference: nib.Nifti1Image, ref_path: Path, other: nib.Nifti1Image, other_path: Path,
                    what: str = "channel") -> None:
    """Refuse ``other`` unless it has ``reference``'s spatial shape and affine (within 1e-3 mm)."""
    shape_a, shape_b = tuple(reference.shape[:3]), tuple(other.shape[:3])
    if shape_a != shape_b:
        raise ScanError(other_path, f"{what} shape {shape_b} differs from {ref_path}'s {shape_a}; all channels of a "
                                    "case must share one voxel grid (resample them onto one grid first)")
    if not np.allclose(reference.affine, other.affine, atol=AFFINE_TOLERANCE_MM):
        a = np.array2string(np.asarray(reference.affine)[:3], precision=3, suppress_small=True).replace("\n", "")
        b = np.array2string(np.asarray(other.affine)[:3], precision=3, suppress_small=True).replace("\n", "")
        raise ScanError(other_path, f"{what} affine {b} differs from {ref_path}'s {a} (same shape {shape_a}, another "
                                    "position or spacing); all channels of a case must share one voxel grid "
                                    "(register and resample them onto one grid first)")


def load_channels(paths: Sequence[Path], *, max_bytes: int | None = None) -> nib.Nifti1Image:
    """Channel files (NIfTI or DICOM series folders) as one float32 4D image ``(X, Y, Z, C)`` on the first
    channel's grid, with its header geometry. A channel off that grid is a :class:`ScanError`."""
    from medseg.io.nifti import _image_with_geometry
    from medseg.io.scans import load_scan

    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("load_channels needs at least one file")
    first = load_scan(paths[0], max_bytes=max_bytes)
    arrays = [np.asarray(first.dataobj, dtype=np.float32)]
    for path in paths[1:]:
        img = load_scan(path, max_bytes=max_bytes)
        check_same_grid(first, paths[0], img, path)
        arrays.append(np.asarray(img.dataobj, dtype=np.float32))
    return _image_with_geometry(np.stack(arrays, axis=-1), first.header)


def group_channel_files(scans: list, channels: int) -> list:
    """Group nnU-Net channel files among ``scans`` (as :func:`medseg.io.scans.find_scans` found them).

    With ``channels`` > 1 every NIfTI scan must be named ``CASE_XXXX``; the files ``CASE_0000`` ..
    ``CASE_{channels-1}`` of one folder become one scan ``CASE`` (a missing or extra channel names the case).
    DICOM series are single-channel and refused. With one channel, ``CASE_0000`` is named ``CASE`` unless
    a ``CASE_0001`` sits next to it (then the numbers are not channel numbers and names stay as they are).
    """
    from medseg.io.scans import Scan

    niftis = [s for s in scans if s.kind == "nifti"]
    if channels <= 1:
        present = {(s.path.parent, s.case_id) for s in niftis}
        out = []
        for s in scans:
            m = CHANNEL_SUFFIX.match(s.case_id) if s.kind == "nifti" else None
            if m and m["channel"] == "0000" and (s.path.parent, f"{m['case']}_0001") not in present:
                s = Scan(m["case"], s.path, s.kind, s.series)
            out.append(s)
        return out
    dicom = [s for s in scans if s.kind == "dicom"]
    if dicom:
        raise ScanError(dicom[0].path, f"a DICOM series is one channel, but the model takes {channels}: convert each "
                                       "channel to NIfTI and name the files CASE_0000.nii.gz, CASE_0001.nii.gz, ...")
    groups: dict[tuple[Path, str], dict[int, Path]] = {}
    for s in niftis:
        m = CHANNEL_SUFFIX.match(s.case_id)
        if m is None:
            raise ScanError(s.path, f"the model takes {channels} input channels: name each case's channel files "
                                    f"{s.case_id}_0000.nii.gz ... {s.case_id}_{channels - 1:04d}.nii.gz (nnU-Net naming)")
        by_channel = groups.setdefault((s.path.parent, m["case"]), {})
        number = int(m["channel"])
        if number in by_channel:  # the same file given twice (a folder and a file in it)
            if by_channel[number].resolve() != s.path.resolve():
                raise ScanError(s.path, f"channel {number} of case '{m['case']}' given twice ({by_channel[number]})")
            continue
        by_channel[number] = s.path
    grouped: list = []
    for (folder, case), by_channel in groups.items():
        ending = by_channel[min(by_channel)].name[len(case) + 5:]
        missing = [c for c in range(channels) if c not in by_channel]
        if missing:
            raise ScanError(folder / channel_file_name(case, missing[0], ending),
                            f"channel {missing[0]} of case '{case}' not found (the model takes {channels} channels: "
                            f"{', '.join(channel_file_name(case, c, ending) for c in range(channels))})")
        extra = sorted(c for c in by_channel if c >= channels)
        if extra:
            raise ScanError(by_channel[extra[0]], f"channel {extra[0]} of case '{case}', but the model takes "
                                                  f"{channels} channels (0..{channels - 1})")
        files = tuple(by_channel[c] for c in range(channels))
        grouped.append(Scan(case, files[0], "nifti", None, files))
    return grouped


def check_channel_count(image: nib.Nifti1Image, expected: int) -> None:
    """Refuse an image whose channel count (4th axis of a stacked image, else 1) is not the model's."""
    got = int(image.shape[3]) if len(image.shape) == 4 else 1
    if got != expected:
        raise ScanError(image.get_filename() or "scan",
                        f"the image has {got} channel(s) but the model takes {expected}: give one file per channel "
                        "(nnU-Net naming CASE_0000.nii.gz, CASE_0001.nii.gz, ...)")
