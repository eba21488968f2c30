"""Multi-channel scans (T1/T2/FLAIR, CT+PET): the naming and grouping of one 3D file per channel.

Files in nnU-Net naming (``CASE_0000.nii.gz``, ``CASE_0001.nii.gz``...) are grouped into one case ``CASE``
by :func:`group_channel_files`. Loading them is :func:`medseg.io.scans.load_volume`'s (one function for a
single file and stacked channels): every channel must lie on the first channel's grid
(:func:`medseg.io.volume.check_same_grid`; no silent resampling) and they are stacked as float32
``(X, Y, Z, C)`` with the first channel's header geometry. This module imports nothing from
:mod:`medseg.io.scans`, which calls it (records are rebuilt with :func:`dataclasses.replace`).
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import nibabel as nib

from medseg.errors import ScanError
from medseg.io.volume import Volume

CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def channel_file_name(case_id: str, channel: int, ending: str = ".nii.gz") -> str:
    """nnU-Net's name of one channel file: ``CASE_0001.nii.gz``."""
    return f"{case_id}_{channel:04d}{ending}"


def group_channel_files(scans: list, channels: int) -> list:  # list[Scan]: typed loosely, see module docstring
    """Group nnU-Net channel files among ``scans`` (as :func:`medseg.io.scans.find_scans` found them).

    With ``channels`` > 1 every NIfTI scan must be named ``CASE_XXXX``; the files ``CASE_0000`` ..
    ``CASE_{channels-1}`` of one folder become one scan ``CASE`` (a missing or extra channel names the case).
    DICOM series are single-channel and refused. With one channel, ``CASE_0000`` is named ``CASE`` unless
    a ``CASE_0001`` sits next to it (then the numbers are not channel numbers and names stay as they are).
    """
    niftis = [s for s in scans if s.kind == "nifti"]
    if channels <= 1:
        present = {(s.path.parent, s.case_id) for s in niftis}
        out = []
        for s in scans:
            m = CHANNEL_SUFFIX.match(s.case_id) if s.kind == "nifti" else None
            if m and m["channel"] == "0000" and (s.path.parent, f"{m['case']}_0001") not in present:
                s = replace(s, case_id=m["case"])
            out.append(s)
        return out
    dicom = [s for s in scans if s.kind == "dicom"]
    if dicom:
        raise ScanError(dicom[0].path, f"a DICOM series is one channel, but the model takes {channels}: convert each "
                                       "channel to NIfTI and name the files CASE_0000.nii.gz, CASE_0001.nii.gz, ...")
    groups: dict[tuple[Path, str], dict[int, Path]] = {}
    template = {}  # one record per case, rebuilt as the grouped scan
    for s in niftis:
        m = CHANNEL_SUFFIX.match(s.case_id)
        if m is None:
            raise ScanError(s.path, f"the model takes {channels} input channels: name each case's channel files "
                                    f"{s.case_id}_0000.nii.gz ... {s.case_id}_{channels - 1:04d}.nii.gz (nnU-Net naming)")
        by_channel = groups.setdefault((s.path.parent, m["case"]), {})
        template.setdefault((s.path.parent, m["case"]), s)
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
        grouped.append(replace(template[(folder, case)], case_id=case, path=files[0], kind="nifti", series=None,
                               channels=files))
    return grouped


def check_channel_count(image: nib.Nifti1Image, expected: int) -> None:
    """Refuse an image whose channel count (4th axis of a stacked image, else 1) is not the model's."""
    got = Volume(image).channels
    if got != expected:
        raise ScanError(image.get_filename() or "scan",
                        f"the image has {got} channel(s) but the model takes {expected}: give one file per channel "
                        "(nnU-Net naming CASE_0000.nii.gz, CASE_0001.nii.gz, ...)")
