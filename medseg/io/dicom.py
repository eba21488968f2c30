"""DICOM series: find, sort, check and stack slices into a volume with its scanner geometry.

Slices are ordered by ImagePositionPatient projected on the slice normal (never by file order or
InstanceNumber), and the affine is built from the DICOM LPS frame converted to NIfTI's RAS. Every
series is checked before it becomes a volume (one orientation, no gaps, uniform spacing, no gantry
tilt, decodable pixels); what cannot be used is either refused with a :class:`DicomSeriesError`
naming the folder and the problem, or left out and recorded in a :class:`DicomReadReport`.
The rules, one by one, are in ``docs/scans.md``.

Enhanced / multi-frame objects (one file, per-frame functional groups) are expanded into one slice
record per frame (:func:`_frames_of`), and those records go through the same checks as the slices
of a classic series: a frame is a slice that shares its file with others.

Only geometry and pixel tags are read into outputs and messages: names come from file and folder
names, never from patient, study or institution tags.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from medseg.errors import DicomSeriesError, GeometryError, MedsegError
from medseg.io.geometry import SHEAR_TOLERANCE, check_affine, check_size, check_spacing_values

log = logging.getLogger(__name__)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
#: A volume needs this many distinct slice positions: with two, a missing slice cannot be detected.
MIN_SLICES = 3
#: Largest difference between ImageOrientationPatient values (direction cosines) of one orientation.
ORIENTATION_TOLERANCE = 1e-3
#: Slices closer than this along the normal (mm) are at the same position.
DUPLICATE_TOLERANCE_MM = 0.01
#: A slice step may differ from the median step by max(SPACING_ATOL_MM, SPACING_RTOL x median step).
SPACING_ATOL_MM = 0.01
SPACING_RTOL = 0.01
#: A step longer than this many median steps is a gap (missing slices), not irregular spacing.
GAP_FACTOR = 1.5
#: Sideways drift of slice positions (in-plane, as a fraction of the smallest pixel) tolerated as noise.
TILT_TOLERANCE_PIXELS = 0.1

#: The only tags medseg parses. Patient, study and institution tags are skipped unread, so they can
#: reach neither outputs nor log messages (pydicom's own validation warnings quote tag values).
HEADER_TAGS = [
    "SeriesInstanceUID", "Rows", "Columns", "NumberOfFrames", "SamplesPerPixel", "ImageType",
    "ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing",
]
PIXEL_TAGS = [
    *HEADER_TAGS, "RescaleSlope", "RescaleIntercept", "BitsAllocated", "BitsStored", "HighBit",
    "PixelRepresentation", "PhotometricInterpretation", "PlanarConfiguration", "PixelData",
]
#: Read only from files that carry NumberOfFrames: the functional groups that place each frame.
#: Inside them only the geometry, rescale and frame-content items named in :func:`_frames_of` are
#: decoded (never iterated whole), so acquisition dates and private items stay unread.
FRAME_TAGS = [
    *HEADER_TAGS, "RescaleSlope", "RescaleIntercept", "SharedFunctionalGroupsSequence",
    "PerFrameFunctionalGroupsSequence", "DimensionIndexSequence",
]

#: Packages that decode each compressed transfer syntax (pydicom picks whichever is installed).
_DECODER_PACKAGES = {
    "1.2.840.10008.1.2.4.50": "pylibjpeg pylibjpeg-libjpeg (or pillow, or python-gdcm)",
    "1.2.840.10008.1.2.4.51": "pylibjpeg pylibjpeg-libjpeg (or pillow, or python-gdcm)",
    "1.2.840.10008.1.2.4.57": "pylibjpeg pylibjpeg-libjpeg (or python-gdcm)",
    "1.2.840.10008.1.2.4.70": "pylibjpeg pylibjpeg-libjpeg (or python-gdcm)",
    "1.2.840.10008.1.2.4.80": "pylibjpeg pylibjpeg-libjpeg (or python-gdcm)",
    "1.2.840.10008.1.2.4.81": "pylibjpeg pylibjpeg-libjpeg (or python-gdcm)",
    "1.2.840.10008.1.2.4.90": "pylibjpeg pylibjpeg-openjpeg (or python-gdcm)",
    "1.2.840.10008.1.2.4.91": "pylibjpeg pylibjpeg-openjpeg (or python-gdcm)",
    "1.2.840.10008.1.2.4.201": "pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.202": "pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.203": "pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.5": "pylibjpeg pylibjpeg-rle",
}


@dataclass(frozen=True)
class SkippedFile:
    """A file, slice or frame left out of a volume, and why (no patient details: geometry and file names only).

    ``frame`` is the 1-based frame number when one frame of a multi-frame file was left out.
    """

    path: Path
    reason: str
    frame: int | None = None

    @property
    def name(self) -> str:
        """The file name, with the frame number for a frame of a multi-frame file."""
        return self.path.name if self.frame is None else f"{self.path.name} frame {self.frame}"


@dataclass(frozen=True)
class DicomSeriesRef:
    """One series found on disk: the folder it was found in and its files (sorted by name).

    ``skipped`` lists the files of that folder that are not DICOM images (empty, not DICOM, no series
    UID, no pixels), with the reason.
    """

    folder: Path
    series_uid: str
    files: tuple[Path, ...] = field(repr=False)
    skipped: tuple[SkippedFile, ...] = field(default=(), repr=False, compare=False)


@dataclass
class DicomReadReport:
    """What reading one series used, skipped (unreadable files) and excluded (readable but left out)."""

    folder: Path
    slices_used: int = 0
    shape: tuple[int, int, int] | None = None
    spacing_mm: tuple[float, float, float] | None = None
    skipped: list[SkippedFile] = field(default_factory=list)
    excluded: list[SkippedFile] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        """True when every file was used as it is."""
        return not (self.skipped or self.excluded or self.notes)

    def describe(self) -> str:
        """One paragraph for logs: counts, then each skipped/excluded file name with its reason."""
        lines = [f"{self.folder}: {self.slices_used} slices used"]
        if self.skipped:
            lines.append(f"  skipped {len(self.skipped)} file(s):")
            lines += [f"    {s.name}: {s.reason}" for s in self.skipped]
        if self.excluded:
            lines.append(f"  excluded {len(self.excluded)} slice(s):")
            lines += [f"    {s.name}: {s.reason}" for s in self.excluded]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Discovery


def _read_header(path: Path) -> tuple[pydicom.Dataset | None, str]:
    """The header of a DICOM image file, or None and the reason it is not one."""
    try:
        if path.stat().st_size == 0:
            return None, "empty file (0 bytes)"
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=HEADER_TAGS)
    except InvalidDicomError:
        return None, "not a DICOM file"
    except Exception as exc:  # truncated or corrupt header: pydicom raises many types
        return None, f"unreadable DICOM header ({type(exc).__name__})"
    if "SeriesInstanceUID" not in ds:
        return None, "DICOM file without SeriesInstanceUID (e.g. a DICOMDIR)"
    if "Rows" not in ds or "Columns" not in ds:
        return None, "DICOM file holds no image (no Rows/Columns)"
    return ds, ""


def find_dicom_series(folder: Path) -> list[DicomSeriesRef]:
    """Series under ``folder`` (recursively), one per (subfolder, SeriesInstanceUID).

    Files that are not DICOM images are skipped and recorded in each series of their folder.
    """
    folder = Path(folder)
    groups: dict[tuple[Path, str], list[Path]] = {}
    skipped: dict[Path, list[SkippedFile]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        if path.name.lower().endswith((".nii", ".nii.gz")):
            continue  # NIfTI files beside a series are scans of their own, not stray files of the series
        ds, reason = _read_header(path)
        if ds is None:
            skipped.setdefault(path.parent, []).append(SkippedFile(path, reason))
            continue
        groups.setdefault((path.parent, str(ds.SeriesInstanceUID)), []).append(path)
    return [
        DicomSeriesRef(parent, uid, tuple(files), tuple(skipped.get(parent, ())))
        for (parent, uid), files in sorted(groups.items())
    ]


def is_dicom_folder(folder: Path) -> bool:
    """True when ``folder`` holds at least one DICOM image file directly."""
    return any(
        _read_header(p)[0] is not None
        for p in sorted(Path(folder).iterdir())
        if p.is_file() and not p.name.startswith(".")
    )


# ----------------------------------------------------------------------------------------------
# Reading


@dataclass
class _Slice:
    """One image plane: a single-frame file, or one frame of a multi-frame file."""

    path: Path
    orientation: np.ndarray  # 6 direction cosines (row, column), LPS
    position: np.ndarray  # ImagePositionPatient, LPS mm
    pixel_spacing: tuple[float, float]  # (between rows, between columns) mm
    rows: int
    columns: int
    distance: float = 0.0  # along the slice normal, mm
    pixels: np.ndarray | None = None  # (rows, columns) float32, rescaled
    frame: int | None = None  # 1-based frame number in a multi-frame file; None for a single-frame file
    rescale: tuple[float, float] | None = None  # (slope, intercept) of a frame, from its functional groups

    @property
    def label(self) -> str:
        """How messages name this slice: the file name, and the frame for a multi-frame file."""
        return self.path.name if self.frame is None else f"{self.path.name} frame {self.frame}"

    def left_out(self, reason: str) -> SkippedFile:
        return SkippedFile(self.path, reason, self.frame)


def read_dicom_series(
    folder: Path,
    series: DicomSeriesRef | None = None,
    *,
    allow_gantry_tilt: bool = False,
    max_bytes: int | None = None,
) -> nib.Nifti1Image:
    """Read one series into a float32 volume (rescaled values, e.g. HU) with a RAS affine in mm.

    ``series`` picks one of :func:`find_dicom_series`; without it the folder must hold exactly one.
    Files left out are logged (warning); :func:`read_dicom_series_report` also returns them.
    """
    img, report = read_dicom_series_report(folder, series, allow_gantry_tilt=allow_gantry_tilt, max_bytes=max_bytes)
    if not report.clean:
        log.warning("DICOM series %s", report.describe())
    return img


def read_dicom_series_report(
    folder: Path,
    series: DicomSeriesRef | None = None,
    *,
    allow_gantry_tilt: bool = False,
    max_bytes: int | None = None,
) -> tuple[nib.Nifti1Image, DicomReadReport]:
    """Like :func:`read_dicom_series`, and also the record of what was skipped, excluded or corrected.

    ``allow_gantry_tilt``: resample a tilted series onto an orthogonal grid (linear interpolation)
    instead of refusing it. ``max_bytes``: size cap (default 4 GiB, ``$MEDSEG_MAX_SCAN_BYTES``).
    """
    folder = Path(folder)
    try:
        return _read_series(folder, series, allow_gantry_tilt, max_bytes)
    except MedsegError:
        raise
    except Exception as exc:  # anything pydicom/numpy raise on malformed input becomes one of ours
        raise DicomSeriesError(folder, f"cannot read the DICOM series ({type(exc).__name__}: {exc})") from None


def _select_series(folder: Path, series: DicomSeriesRef | None) -> DicomSeriesRef:
    """``series``, or the one series of ``folder`` (refused when it holds none or several)."""
    if series is not None:
        return series
    if not folder.is_dir():
        raise DicomSeriesError(folder, "not a folder")
    found_all = find_dicom_series(folder)
    found = [s for s in found_all if s.folder == folder] or found_all
    if not found:
        skipped = sum((list(s.skipped) for s in found_all), [])
        raise DicomSeriesError(folder, "no DICOM image files found" + (f" ({len(skipped)} other files)" if skipped else ""))
    if len(found) > 1:
        where = sorted({str(s.folder.relative_to(folder)) for s in found})
        raise DicomSeriesError(
            folder,
            f"holds {len(found)} DICOM series (different SeriesInstanceUID, in {where}); expected exactly one. "
            "find_scans lists them as separate scans (<name>_s1, _s2, ...); `medseg convert` takes --series N",
        )
    return found[0]


def _read_series(
    folder: Path, series: DicomSeriesRef | None, allow_gantry_tilt: bool, max_bytes: int | None
) -> tuple[nib.Nifti1Image, DicomReadReport]:
    series = _select_series(folder, series)
    report = DicomReadReport(folder, skipped=list(series.skipped))

    slices = _usable_slices(series.files, report)
    slices = _majority_orientation(folder, slices, report)
    first = slices[0]
    for s in slices[1:]:
        if (s.rows, s.columns) != (first.rows, first.columns) or not np.allclose(
            s.pixel_spacing, first.pixel_spacing, rtol=1e-4, atol=0
        ):
            raise DicomSeriesError(
                folder,
                f"slices of one orientation differ in size or pixel spacing: {first.label} is "
                f"{first.rows}x{first.columns} at {first.pixel_spacing} mm, {s.label} is {s.rows}x{s.columns} "
                f"at {s.pixel_spacing} mm",
            )
    row_cos, col_cos, normal = _directions(folder, first)
    check_size(folder, (first.columns, first.rows, len(slices)), 4, max_bytes)

    slices = _decode(folder, slices, report)
    _sort_along_normal(slices, normal)
    slices = _drop_duplicates(folder, slices, report)
    if len(slices) < MIN_SLICES:
        raise DicomSeriesError(
            folder,
            f"not a volume: {len(slices)} distinct slice position(s), at least {MIN_SLICES} are needed "
            "(a localizer, a single image or an incomplete export?)" + _skip_hint(report),
        )
    step = _uniform_step(folder, slices, report)
    volume = np.stack([s.pixels for s in slices], axis=-1).transpose(1, 0, 2)  # (columns i, rows j, slices k)
    volume = _correct_gantry_tilt(folder, slices, volume, normal, row_cos, col_cos, allow_gantry_tilt, report)

    row_spacing, col_spacing = first.pixel_spacing
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_cos * col_spacing  # i runs along a row: columns are col_spacing apart
    affine_lps[:3, 1] = col_cos * row_spacing
    affine_lps[:3, 2] = normal * step
    affine_lps[:3, 3] = slices[0].position
    affine = LPS_TO_RAS @ affine_lps
    check_affine(affine, folder)
    img = nib.Nifti1Image(np.ascontiguousarray(volume, dtype=np.float32), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    report.slices_used = len(slices)
    report.shape = tuple(int(v) for v in volume.shape)  # type: ignore[assignment]
    report.spacing_mm = (float(col_spacing), float(row_spacing), float(step))
    return img, report


def _sort_along_normal(slices: list[_Slice], normal: np.ndarray) -> None:
    """Order slices by position along the slice normal (mm), ties by file name and frame: the volume's k order."""
    for s in slices:
        s.distance = float(np.dot(s.position, normal))
    slices.sort(key=lambda s: (s.distance, s.path.name, s.frame or 0))


@dataclass(frozen=True)
class SourcePlane:
    """The source of one slice of a series' volume: its file, its frame (1-based, multi-frame files;
    None for a single-frame file) and its ImagePositionPatient (LPS mm)."""

    path: Path
    frame: int | None
    position: tuple[float, float, float]


def series_planes(folder: Path, series: DicomSeriesRef | None = None) -> list[SourcePlane]:
    """The planes of a series in the order of its volume's slices (k = 0, 1, ...), from headers only.

    Uses the reader's own selection (usable slices, majority orientation) and order (along the slice
    normal), so plane ``k`` is the source of slice ``k`` of :func:`read_dicom_series`'s volume. Of
    several planes at one position the first is kept, as the reader does. A writer that needs the
    source instances (DICOM-SEG) should still check each plane's position against the volume's affine:
    a file whose pixels could not be decoded is in this list but not in the volume.
    """
    folder = Path(folder)
    series = _select_series(folder, series)
    report = DicomReadReport(folder)
    slices = _majority_orientation(folder, _usable_slices(series.files, report), report)
    _sort_along_normal(slices, _directions(folder, slices[0])[2])
    planes: list[_Slice] = []
    for s in slices:
        if not planes or abs(s.distance - planes[-1].distance) > DUPLICATE_TOLERANCE_MM:
            planes.append(s)
    return [SourcePlane(s.path, s.frame, (float(s.position[0]), float(s.position[1]), float(s.position[2])))
            for s in planes]


def _skip_hint(report: DicomReadReport) -> str:
    left_out = report.skipped + report.excluded
    if not left_out:
        return ""
    shown = "; ".join(f"{s.name}: {s.reason}" for s in left_out[:5])
    return f" [left out: {shown}{' ...' if len(left_out) > 5 else ''}]"


def _floats(ds: pydicom.Dataset, keyword: str, count: int) -> np.ndarray | None:
    """A multi-valued decimal tag as ``count`` finite floats, or None when absent or malformed."""
    value = ds.get(keyword)
    if value is None:
        return None
    items = [value] if isinstance(value, str | bytes | float | int) else list(value)
    try:
        values = np.array([float(v) for v in items], dtype=float)
    except (TypeError, ValueError):
        return None
    return values if values.shape == (count,) and np.all(np.isfinite(values)) else None


def _usable_slices(files: Sequence[Path], report: DicomReadReport) -> list[_Slice]:
    """Headers of the series' files as slices; multi-frame files give one slice per frame.

    Files that cannot be slices of a volume are skipped or excluded.
    """
    slices: list[_Slice] = []
    for path in map(Path, files):
        ds, reason = _read_header(path)
        if ds is None:
            report.skipped.append(SkippedFile(path, reason))
            continue
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        if samples != 1:
            raise DicomSeriesError(path, f"expected a 3D scan of grey values, got {samples} samples per pixel (colour)")
        if _is_localizer(ds.get("ImageType")):
            report.excluded.append(SkippedFile(path, "localizer (ImageType LOCALIZER)"))
            continue
        rows, columns = int(ds.Rows), int(ds.Columns)
        if rows < 1 or columns < 1:
            report.skipped.append(SkippedFile(path, f"empty image ({rows}x{columns})"))
            continue
        if "NumberOfFrames" in ds:
            slices += _frames_of(path, rows, columns, report)
            continue
        geometry = _plane_geometry(path, ds, ds, ds)
        if isinstance(geometry, str):
            report.excluded.append(SkippedFile(path, f"no usable {geometry}: cannot be placed in space"))
            continue
        slices.append(_Slice(path, *geometry, rows, columns))
    if not slices:
        raise DicomSeriesError(report.folder, "no usable image slices in the series" + _skip_hint(report))
    return slices


def _is_localizer(image_type: object) -> bool:
    """True when an ImageType (or a frame's FrameType) marks a localizer (scout)."""
    if image_type is None:
        return False
    values = [image_type] if isinstance(image_type, str) else list(image_type)  # type: ignore[call-overload]
    return "LOCALIZER" in (str(v).upper() for v in values)


def _plane_geometry(
    path: Path, orientation_ds: pydicom.Dataset | None, position_ds: pydicom.Dataset | None,
    spacing_ds: pydicom.Dataset | None,
) -> tuple[np.ndarray, np.ndarray, tuple[float, float]] | str:
    """(ImageOrientationPatient, ImagePositionPatient, PixelSpacing) of one plane, each taken from its
    own dataset (the file itself, or a frame's functional group item); or the missing tags' names."""
    orientation = _floats(orientation_ds, "ImageOrientationPatient", 6) if orientation_ds is not None else None
    position = _floats(position_ds, "ImagePositionPatient", 3) if position_ds is not None else None
    spacing = _floats(spacing_ds, "PixelSpacing", 2) if spacing_ds is not None else None
    if orientation is None or position is None or spacing is None:
        return ", ".join(k for k, v in (("ImageOrientationPatient", orientation), ("ImagePositionPatient", position),
                                         ("PixelSpacing", spacing)) if v is None)
    check_spacing_values(spacing, path, "PixelSpacing")
    return orientation, position, (float(spacing[0]), float(spacing[1]))


#: The functional groups that place a frame in space, with the tag each must hold.
_GEOMETRY_GROUPS = {
    "PlaneOrientationSequence": "ImageOrientationPatient",
    "PlanePositionSequence": "ImagePositionPatient",
    "PixelMeasuresSequence": "PixelSpacing",
}
#: Frame type groups of the enhanced IODs (FrameType, and for MR ComplexImageComponent); the first
#: one a frame has is used.
_FRAME_TYPE_GROUPS = ("MRImageFrameTypeSequence", "CTImageFrameTypeSequence", "PETFrameTypeSequence")


def _group_item(frame_groups: pydicom.Dataset | None, shared: pydicom.Dataset | None, keyword: str) -> pydicom.Dataset | None:
    """The item of functional group ``keyword`` for one frame: its own, else the shared one, else None."""
    for groups in (frame_groups, shared):
        if groups is not None:
            sequence = groups.get(keyword)
            if sequence:
                return sequence[0]
    return None


def _frames_of(path: Path, rows: int, columns: int, report: DicomReadReport) -> list[_Slice]:
    """The frames of a multi-frame file as slices, placed by their functional groups.

    Each frame's plane position, plane orientation, pixel measures and pixel value transformation
    come from its own per-frame functional group, else from the shared one. A file whose frames
    cannot all be placed, whose frame count disagrees with its per-frame groups, or that holds
    several stacks, echoes, time points or complex components is refused: which frames make one
    volume would be a guess.
    """
    ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=FRAME_TAGS)
    try:
        count = int(ds.NumberOfFrames)
    except (TypeError, ValueError):
        raise DicomSeriesError(path, f"NumberOfFrames is not a number ({ds.get('NumberOfFrames')!r})") from None
    if count < 1:
        raise DicomSeriesError(path, f"NumberOfFrames is {count}: the file holds no frame")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else None
    if per_frame is None and shared is None:
        if count == 1:  # a classic image that states its single frame: placed by its own tags
            geometry = _plane_geometry(path, ds, ds, ds)
            if isinstance(geometry, str):
                report.excluded.append(SkippedFile(path, f"no usable {geometry}: cannot be placed in space"))
                return []
            return [_Slice(path, *geometry, rows, columns)]
        raise DicomSeriesError(
            path,
            f"multi-frame DICOM ({count} frames in one file) without functional groups "
            "(PerFrameFunctionalGroupsSequence / SharedFunctionalGroupsSequence): its frames cannot be placed in space",
        )
    frame_groups: list[pydicom.Dataset | None] = list(per_frame) if per_frame is not None else [None] * count
    if len(frame_groups) != count:
        raise DicomSeriesError(
            path, f"NumberOfFrames is {count} but PerFrameFunctionalGroupsSequence has {len(frame_groups)} item(s)"
        )
    _refuse_several_volumes(path, frame_groups, shared, ds.get("DimensionIndexSequence"))
    frames: list[_Slice] = []
    for number, groups in enumerate(frame_groups, start=1):
        items = {keyword: _group_item(groups, shared, keyword) for keyword in _GEOMETRY_GROUPS}
        missing = [f"{group} ({tag})" for group, tag in _GEOMETRY_GROUPS.items() if items[group] is None or tag not in items[group]]
        if missing:
            raise DicomSeriesError(
                path,
                f"frame {number} of {count} has no {', '.join(missing)} in its per-frame or shared functional "
                "groups: it cannot be placed in space",
            )
        frame_type = next((i for i in (_group_item(groups, shared, k) for k in _FRAME_TYPE_GROUPS) if i is not None), None)
        if frame_type is not None and _is_localizer(frame_type.get("FrameType")):
            report.excluded.append(SkippedFile(path, "localizer (FrameType LOCALIZER)", number))
            continue
        geometry = _plane_geometry(
            path, items["PlaneOrientationSequence"], items["PlanePositionSequence"], items["PixelMeasuresSequence"]
        )
        if isinstance(geometry, str):
            raise DicomSeriesError(path, f"frame {number} of {count} has an unusable {geometry}")
        transform = _group_item(groups, shared, "PixelValueTransformationSequence")
        rescale = _rescale(path, transform if transform is not None else ds, f"frame {number}: ")
        frames.append(_Slice(path, *geometry, rows, columns, frame=number, rescale=rescale))
    return frames


def _frame_values(
    frame_groups: Sequence[pydicom.Dataset | None], shared: pydicom.Dataset | None, group: str, tag: str
) -> list[object]:
    """The distinct values (in order of first appearance) of ``group``'s ``tag`` over the frames."""
    values: list[object] = []
    for groups in frame_groups:
        item = _group_item(groups, shared, group)
        value = item.get(tag) if item is not None else None
        if value is None or value == "":
            continue
        value = _hashable(value)
        if value not in values:
            values.append(value)
    return values


def _refuse_several_volumes(
    path: Path, frame_groups: Sequence[pydicom.Dataset | None], shared: pydicom.Dataset | None,
    dimensions: pydicom.Sequence | None,
) -> None:
    """Refuse a multi-frame file that holds more than one volume, naming what varies and its values.

    Stacks, echoes, time points and complex components (magnitude/phase) are named explicitly; any
    other dimension of DimensionIndexSequence than the position within a stack is named by its label.
    """
    found: list[str] = []
    stacks = _frame_values(frame_groups, shared, "FrameContentSequence", "StackID")
    if len(stacks) > 1:
        found.append(f"{len(stacks)} stacks (StackID {', '.join(map(str, stacks))})")
    echoes = _frame_values(frame_groups, shared, "MREchoSequence", "EffectiveEchoTime")
    if len(echoes) > 1:
        found.append(f"{len(echoes)} echo times ({', '.join(f'{float(e):g}' for e in echoes)} ms)")  # type: ignore[arg-type]
    times = _frame_values(frame_groups, shared, "FrameContentSequence", "TemporalPositionIndex")
    if len(times) > 1:
        found.append(f"{len(times)} time points (TemporalPositionIndex {', '.join(map(str, times))})")
    for group in _FRAME_TYPE_GROUPS:
        components = _frame_values(frame_groups, shared, group, "ComplexImageComponent")
        if len(components) > 1:
            found.append(f"{len(components)} complex image components ({', '.join(map(str, components))})")
            break
    found += _other_dimensions(frame_groups, shared, dimensions)
    if found:
        raise DicomSeriesError(
            path,
            f"multi-frame DICOM holds several volumes: {'; '.join(found)}. medseg reads one volume per scan; "
            "export each one as its own series (e.g. split it with dcm2niix or the scanner's export)",
        )


#: Dimensions that order frames within one volume (they may take one value per frame).
_SLICE_DIMENSIONS = {"InStackPositionNumber", "ImagePositionPatient", "SliceLocation"}
#: Dimensions refused by name in :func:`_refuse_several_volumes` already.
_NAMED_DIMENSIONS = {"StackID", "EffectiveEchoTime", "TemporalPositionIndex", "ComplexImageComponent"}


def _hashable(value: object) -> object:
    """A tag value usable in a set: multi-valued tags (pydicom lists or MultiValue) become tuples."""
    if isinstance(value, str | bytes | int | float):
        return value
    try:
        return tuple(value)  # type: ignore[call-overload]
    except TypeError:
        return value


def _other_dimensions(
    frame_groups: Sequence[pydicom.Dataset | None], shared: pydicom.Dataset | None, dimensions: pydicom.Sequence | None
) -> list[str]:
    """Dimensions of DimensionIndexSequence (other than the slice position) whose index takes several values."""
    if not dimensions:
        return []
    indices = []
    for groups in frame_groups:
        item = _group_item(groups, shared, "FrameContentSequence")
        value = item.get("DimensionIndexValues") if item is not None else None
        if value is not None:
            index = _hashable(value)
            indices.append(index if isinstance(index, tuple) else (index,))
    found = []
    for d, dimension in enumerate(dimensions):
        pointer = dimension.get("DimensionIndexPointer")
        keyword = pydicom.datadict.keyword_for_tag(pointer) if pointer is not None else ""
        if keyword in _SLICE_DIMENSIONS or keyword in _NAMED_DIMENSIONS:
            continue
        values = sorted({index[d] for index in indices if len(index) > d})
        if len(values) > 1:
            label = dimension.get("DimensionDescriptionLabel") or keyword or f"dimension {d + 1}"
            found.append(f"{len(values)} values of dimension {label} (index {', '.join(map(str, values))})")
    return found


def _some(slices: Sequence[_Slice], shown: int = 3) -> str:
    """A few slices' labels for a message: 'a.dcm' or 'f.dcm frame 1, f.dcm frame 2, ...'."""
    labels = [s.label for s in slices[:shown]]
    return ", ".join(labels) + (", ..." if len(slices) > shown else "")


def _majority_orientation(folder: Path, slices: list[_Slice], report: DicomReadReport) -> list[_Slice]:
    """Keep the slices of the orientation held by more than half of them; the rest (localizers,
    other planes) are excluded and recorded. Without such a majority, refuse: we cannot tell which plane is meant."""
    groups: list[list[_Slice]] = []
    for s in slices:
        for group in groups:
            if np.abs(group[0].orientation - s.orientation).max() <= ORIENTATION_TOLERANCE:
                group.append(s)
                break
        else:
            groups.append([s])
    if len(groups) == 1:
        return slices
    groups.sort(key=len, reverse=True)
    if 2 * len(groups[0]) <= len(slices):
        described = "; ".join(
            f"{len(g)} slice(s) with ImageOrientationPatient {np.round(g[0].orientation, 4).tolist()} (e.g. {_some(g)})"
            for g in groups
        )
        raise DicomSeriesError(
            folder, f"slices have {len(groups)} different orientations and none holds a majority: {described}"
        )
    for group in groups[1:]:
        for s in group:
            report.excluded.append(
                s.left_out(f"orientation differs from the {len(groups[0])} slices of the majority (localizer or other plane)")
            )
    return groups[0]


def _directions(folder: Path, first: _Slice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit row and column direction cosines and the slice normal (LPS) of ImageOrientationPatient."""
    row_cos, col_cos = first.orientation[:3], first.orientation[3:]
    norms = np.array([np.linalg.norm(row_cos), np.linalg.norm(col_cos)])
    if np.any(np.abs(norms - 1) > 0.01) or abs(float(np.dot(row_cos, col_cos))) > SHEAR_TOLERANCE:
        raise GeometryError(
            folder,
            f"ImageOrientationPatient {first.orientation.tolist()} (in {first.label}) is not two orthogonal "
            "unit vectors",
        )
    row_cos, col_cos = row_cos / norms[0], col_cos / norms[1]
    normal = np.cross(row_cos, col_cos)
    return row_cos, col_cos, normal / np.linalg.norm(normal)


def _decoder_problem(transfer_syntax: pydicom.uid.UID) -> str | None:
    """Why pixels of this transfer syntax cannot be decoded here, or None when they can."""
    from pydicom.pixels import get_decoder

    name = f"{transfer_syntax.name} ({transfer_syntax})" if transfer_syntax.name != transfer_syntax else str(transfer_syntax)
    try:
        decoder = get_decoder(transfer_syntax)
    except NotImplementedError:
        return f"pixel data use transfer syntax {name}, which pydicom cannot decode"
    if decoder.is_available:
        return None
    packages = _DECODER_PACKAGES.get(str(transfer_syntax), "pylibjpeg with its plugins, or python-gdcm")
    return f"pixel data are compressed with {name} and no decoder for it is installed: pip install {packages}"


def _rescale(path: Path, source: pydicom.Dataset, where: str = "") -> tuple[float, float]:
    """(RescaleSlope, RescaleIntercept) of a file or of a frame's PixelValueTransformation item.

    Absent tags mean (1, 0). This is the one intensity rule of medseg (docs/scans.md): the standard
    DICOM rescale, never vendor-private scale factors.
    """
    slope_value, intercept_value = source.get("RescaleSlope"), source.get("RescaleIntercept")
    slope = float(slope_value) if slope_value not in (None, "") else 1.0
    intercept = float(intercept_value) if intercept_value not in (None, "") else 0.0
    if not (np.isfinite(slope) and np.isfinite(intercept)) or slope == 0:
        raise DicomSeriesError(path, f"{where}unusable RescaleSlope/RescaleIntercept ({slope}, {intercept})")
    return slope, intercept


def _decode(folder: Path, slices: list[_Slice], report: DicomReadReport) -> list[_Slice]:
    """Pixel values of each slice, rescaled per slice or frame (RescaleSlope/Intercept) in float.

    Each file is decoded once, whether it holds one slice or many frames. A missing decoder refuses
    the series (every slice would fail the same way); a single-frame file whose pixel data alone are
    broken (truncated file) is skipped and recorded; a multi-frame file whose pixel data do not hold
    its NumberOfFrames frames is refused.
    """
    checked: dict[str, str | None] = {}
    by_file: dict[Path, list[_Slice]] = {}
    for s in slices:
        by_file.setdefault(s.path, []).append(s)
    decoded: list[_Slice] = []
    for path, planes in by_file.items():
        multi_frame = planes[0].frame is not None
        try:
            ds = pydicom.dcmread(str(path), specific_tags=PIXEL_TAGS)
        except Exception as exc:
            report.skipped += [s.left_out(f"unreadable DICOM file ({type(exc).__name__})") for s in planes]
            continue
        syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
        if syntax is None:
            report.skipped += [s.left_out("no TransferSyntaxUID: pixel encoding unknown") for s in planes]
            continue
        if syntax not in checked:
            checked[syntax] = _decoder_problem(syntax)
        if checked[syntax]:
            raise DicomSeriesError(path, checked[syntax])
        if "PixelData" not in ds:
            if multi_frame:
                raise DicomSeriesError(path, "multi-frame DICOM without pixel data")
            report.skipped.append(SkippedFile(path, "no pixel data"))
            continue
        if multi_frame:
            _check_frame_count(path, ds, syntax)
        try:
            pixels = ds.pixel_array
        except Exception as exc:  # truncated or corrupt pixel data
            if multi_frame:
                raise DicomSeriesError(path, f"pixel data cannot be decoded ({type(exc).__name__}: {exc})") from None
            report.skipped.append(SkippedFile(path, f"pixel data cannot be decoded ({type(exc).__name__}: {exc})"))
            continue
        first = planes[0]
        if multi_frame:
            count = int(ds.NumberOfFrames)
            pixels = pixels.reshape((count, *pixels.shape[-2:])) if pixels.ndim == 2 else pixels
            if pixels.shape != (count, first.rows, first.columns):
                raise DicomSeriesError(
                    path, f"pixel array of shape {pixels.shape}, expected {(count, first.rows, first.columns)} "
                    f"(NumberOfFrames, Rows, Columns)"
                )
        elif pixels.shape != (first.rows, first.columns):
            report.skipped.append(SkippedFile(path, f"pixel array of shape {pixels.shape}, expected {(first.rows, first.columns)}"))
            continue
        file_rescale = None if multi_frame else _rescale(path, ds)
        for s in planes:
            plane = pixels[s.frame - 1] if s.frame is not None else pixels
            slope, intercept = s.rescale or file_rescale or (1.0, 0.0)
            # float64 arithmetic, then float32: exact for 16-bit pixels, and the slope is applied per slice.
            s.pixels = (plane.astype(np.float64) * slope + intercept).astype(np.float32)
            decoded.append(s)
    if not decoded:
        raise DicomSeriesError(folder, "no slice has decodable pixel data" + _skip_hint(report))
    return decoded


def _check_frame_count(path: Path, ds: pydicom.Dataset, syntax: pydicom.uid.UID) -> None:
    """Refuse a multi-frame file whose pixel data hold more or fewer frames than NumberOfFrames says."""
    count = int(ds.NumberOfFrames)
    if syntax.is_encapsulated:
        from pydicom.encaps import generate_fragments

        try:
            fragments = sum(1 for _ in generate_fragments(ds.PixelData))
        except Exception:  # a broken encapsulation is reported when decoding
            return
        if fragments < count:  # a frame may span several fragments, never the reverse
            raise DicomSeriesError(path, f"NumberOfFrames is {count} but the pixel data hold {fragments} compressed fragment(s)")
        return
    frame_bits = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1) * int(ds.BitsAllocated)
    expected = -(-count * frame_bits // 8)  # bytes, rounded up for 1-bit pixels
    if len(ds.PixelData) not in (expected, expected + 1):  # + 1: padding to an even length
        raise DicomSeriesError(
            path,
            f"NumberOfFrames is {count} but the pixel data hold {len(ds.PixelData) * 8 / frame_bits:g} frame(s) of "
            f"{int(ds.Rows)}x{int(ds.Columns)} pixels ({len(ds.PixelData)} bytes, {expected} expected)",
        )


def _drop_duplicates(folder: Path, slices: list[_Slice], report: DicomReadReport) -> list[_Slice]:
    """Slices at the same position: identical pixels -> keep one (recorded); different pixels -> refuse."""
    kept = [slices[0]]
    for s in slices[1:]:
        previous = kept[-1]
        if abs(s.distance - previous.distance) > DUPLICATE_TOLERANCE_MM:
            kept.append(s)
        elif np.array_equal(s.pixels, previous.pixels):
            report.excluded.append(s.left_out(f"duplicate of {previous.label} (same position, same pixels)"))
        else:
            raise DicomSeriesError(
                folder,
                f"{previous.label} and {s.label} are at the same position ({s.distance:.3f} mm along the slice "
                f"normal, ImagePositionPatient {np.round(s.position, 3).tolist()} mm) but hold different pixels: "
                "several acquisitions, echoes or time points in one series, or not a volume",
            )
    return kept


def _uniform_step(folder: Path, slices: list[_Slice], report: DicomReadReport) -> float:
    """The slice spacing (mm) of a uniformly spaced stack; gaps and irregular spacing are refused."""
    distances = np.array([s.distance for s in slices])
    steps = np.diff(distances)
    median = float(np.median(steps))
    tolerance = max(SPACING_ATOL_MM, SPACING_RTOL * median)
    for k, step in enumerate(steps):
        if abs(step - median) <= tolerance:
            continue
        a, b = slices[k], slices[k + 1]
        where = (
            f"between {a.label} at {np.round(a.position, 3).tolist()} and {b.label} at "
            f"{np.round(b.position, 3).tolist()} (ImagePositionPatient, mm)"
        )
        if step > GAP_FACTOR * median:
            missing = round(step / median) - 1
            raise DicomSeriesError(
                folder,
                f"missing slice(s): a gap of {step:.3f} mm {where}, where the other slices are {median:.3f} mm apart "
                f"(about {missing} slice(s) missing)" + _skip_hint(report),
            )
        raise DicomSeriesError(
            folder,
            f"slice spacing is not uniform: a step of {step:.3f} mm {where}, where the median step is {median:.3f} mm "
            f"(tolerance {tolerance:.3f} mm)",
        )
    mean = float((distances[-1] - distances[0]) / (len(distances) - 1))
    drift = np.abs(distances - distances[0] - mean * np.arange(len(distances)))
    if drift.max() > tolerance:
        k = int(drift.argmax())
        raise DicomSeriesError(
            folder,
            f"slice spacing is not uniform: {slices[k].label} lies {drift[k]:.3f} mm off a uniform grid of "
            f"{mean:.3f} mm steps (tolerance {tolerance:.3f} mm)",
        )
    return mean


def _correct_gantry_tilt(
    folder: Path,
    slices: list[_Slice],
    volume: np.ndarray,
    normal: np.ndarray,
    row_cos: np.ndarray,
    col_cos: np.ndarray,
    allow: bool,
    report: DicomReadReport,
) -> np.ndarray:
    """Detect slices that step sideways (gantry tilt); refuse, or when ``allow`` shift each slice back.

    A tilted stack has a sheared voxel grid, which NIfTI consumers cannot represent consistently, so
    when allowed each slice is resampled (linear interpolation) onto the orthogonal grid through the
    first slice; voxels shifted in from outside the field of view get the scan's minimum value.
    """
    offsets = np.array([s.position - slices[0].position for s in slices])
    along = offsets @ normal
    sideways = offsets - np.outer(along, normal)
    row_spacing, col_spacing = slices[0].pixel_spacing
    tolerance = TILT_TOLERANCE_PIXELS * min(row_spacing, col_spacing)
    if np.linalg.norm(sideways, axis=1).max() <= tolerance:
        return volume
    per_mm = sideways[-1] / along[-1]  # sideways drift per mm travelled along the normal
    off_line = np.linalg.norm(sideways - np.outer(along, per_mm), axis=1)
    if off_line.max() > tolerance:
        raise DicomSeriesError(
            folder, f"slice positions do not lie on a straight line ({off_line.max():.3f} mm off it at most)"
        )
    angle = float(np.degrees(np.arctan(np.linalg.norm(per_mm))))
    if not allow:
        raise DicomSeriesError(
            folder,
            f"gantry tilt of {angle:.2f} degrees: each slice is shifted {np.linalg.norm(per_mm) * (along[1]):.3f} mm "
            "sideways from the previous one, so the voxel grid is sheared. Pass allow_gantry_tilt=True "
            "(`medseg convert --allow-gantry-tilt`) to resample it onto an orthogonal grid",
        )
    from scipy.ndimage import shift

    fill = float(volume.min())
    corrected = np.empty_like(volume)
    for k in range(volume.shape[2]):
        # Where voxel (i, j) of the orthogonal grid lies in slice k's own grid: i - di, j - dj.
        di = float(np.dot(sideways[k], row_cos)) / col_spacing
        dj = float(np.dot(sideways[k], col_cos)) / row_spacing
        corrected[:, :, k] = shift(volume[:, :, k], (di, dj), order=1, mode="constant", cval=fill)
    report.notes.append(f"gantry tilt of {angle:.2f} degrees corrected by resampling each slice (linear interpolation)")
    return corrected
