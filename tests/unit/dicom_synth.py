"""Tiny synthetic DICOM slices and multi-frame (enhanced) objects written with pydicom, for unit
tests of the series reader.

Each slice's pixels encode its own index along the stack (``base + 100 * index``), so a test can
tell from the volume which slice (or frame) landed where.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    CTImageStorage,
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

ROWS, COLS = 6, 5


def slice_pixels(index: int, rows: int = ROWS, cols: int = COLS) -> np.ndarray:
    """Stored pixels of slice ``index``: a ramp plus 100 x index, int16."""
    return (np.arange(rows * cols, dtype=np.int16).reshape(rows, cols) + 100 * index).astype(np.int16)


def write_slice(
    path: Path,
    *,
    position: Sequence[float],
    pixels: np.ndarray,
    series_uid: str,
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
    pixel_spacing: Sequence[float] = (0.8, 0.7),
    slope: float = 1.0,
    intercept: float = -1024.0,
    instance: int = 1,
    transfer_syntax: str = ExplicitVRLittleEndian,
    **tags: object,
) -> Path:
    """Write one CT slice; extra keyword arguments become DICOM tags (e.g. ``ImageType=[...]``)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.PatientName = "Synthetic^Phantom"
    ds.PatientID = "SYNTH0001"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.SeriesInstanceUID = series_uid
    ds.InstanceNumber = instance
    ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.PixelSpacing = [float(v) for v in pixel_spacing]
    ds.SliceThickness = 1.0
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.int16).tobytes()
    for key, value in tags.items():
        setattr(ds, key, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    if transfer_syntax == ImplicitVRLittleEndian:
        meta.TransferSyntaxUID = ImplicitVRLittleEndian
        ds.save_as(str(path), implicit_vr=True, little_endian=True, enforce_file_format=True)
        return path
    if transfer_syntax != ExplicitVRLittleEndian:
        ds.compress(transfer_syntax)
    ds.save_as(str(path), enforce_file_format=True)
    return path


def write_series(
    folder: Path,
    count: int = 5,
    *,
    origin: Sequence[float] = (10.0, -20.0, 30.0),
    step: Sequence[float] = (0.0, 0.0, 2.5),
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
    series_uid: str | None = None,
    names: Sequence[str] | None = None,
    **kwargs: object,
) -> list[Path]:
    """``count`` slices at ``origin + k * step`` (LPS mm); slice k holds :func:`slice_pixels` (k)."""
    series_uid = series_uid or generate_uid()
    names = names or [f"slice_{k:03d}.dcm" for k in range(count)]
    origin_v, step_v = np.asarray(origin, float), np.asarray(step, float)
    return [
        write_slice(
            folder / names[k],
            position=origin_v + k * step_v,
            pixels=slice_pixels(k),
            series_uid=series_uid,
            orientation=orientation,
            instance=k + 1,
            **kwargs,
        )
        for k in range(count)
    ]


def _item(**tags: object) -> DicomSequence:
    """A one-item sequence holding ``tags`` (a functional group)."""
    item = pydicom.Dataset()
    for key, value in tags.items():
        setattr(item, key, value)
    return DicomSequence([item])


def write_multiframe(
    path: Path,
    count: int = 5,
    *,
    origin: Sequence[float] = (10.0, -20.0, 30.0),
    step: Sequence[float] = (0.0, 0.0, 2.5),
    positions: Sequence[Sequence[float]] | None = None,
    indices: Sequence[int] | None = None,
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
    orientations: Sequence[Sequence[float]] | None = None,
    pixel_spacing: Sequence[float] = (0.8, 0.7),
    slope: float = 1.0,
    intercept: float = -1024.0,
    slopes: Sequence[float] | None = None,
    stack_ids: Sequence[str] | None = None,
    echo_times: Sequence[float] | None = None,
    components: Sequence[str] | None = None,
    temporal_positions: Sequence[int] | None = None,
    number_of_frames: int | None = None,
    pixel_frames: int | None = None,
    missing: Sequence[tuple[int | None, str]] = (),
    series_uid: str | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
) -> Path:
    """Write one Enhanced MR object of ``count`` frames; frame f holds :func:`slice_pixels` (indices[f]).

    Frame f lies at ``positions[f]`` (default ``origin + indices[f] * step``, LPS mm); ``indices``
    defaults to 0, 1, ... (ascending). Orientation, pixel measures and the pixel value transformation
    are shared functional groups, unless ``orientations`` / ``slopes`` give one per frame.
    ``stack_ids``, ``echo_times``, ``components`` (ComplexImageComponent) and ``temporal_positions``
    (TemporalPositionIndex) set per-frame values.
    ``number_of_frames`` overrides NumberOfFrames; ``pixel_frames`` how many frames of pixel data are
    stored. ``missing`` lists (frame index or None for the shared groups, functional group keyword)
    to leave out.
    """
    indices = list(indices) if indices is not None else list(range(count))
    origin_v, step_v = np.asarray(origin, float), np.asarray(step, float)
    positions = positions if positions is not None else [origin_v + k * step_v for k in indices]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = EnhancedMRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = EnhancedMRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    ds.PatientName = "Synthetic^Phantom"
    ds.PatientID = "SYNTH0001"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.NumberOfFrames = number_of_frames if number_of_frames is not None else count
    shared = pydicom.Dataset()
    shared.PixelMeasuresSequence = _item(PixelSpacing=[float(v) for v in pixel_spacing], SliceThickness=1.0)
    if orientations is None:
        shared.PlaneOrientationSequence = _item(ImageOrientationPatient=[float(v) for v in orientation])
    if slopes is None:
        shared.PixelValueTransformationSequence = _item(RescaleSlope=slope, RescaleIntercept=intercept, RescaleType="US")
    frames = []
    for f in range(count):
        groups = pydicom.Dataset()
        groups.FrameContentSequence = _item(
            StackID=stack_ids[f] if stack_ids is not None else "1", InStackPositionNumber=f + 1,
            TemporalPositionIndex=temporal_positions[f] if temporal_positions is not None else 1,
            DimensionIndexValues=[1, f + 1],
        )
        groups.PlanePositionSequence = _item(ImagePositionPatient=[float(v) for v in positions[f]])
        if orientations is not None:
            groups.PlaneOrientationSequence = _item(ImageOrientationPatient=[float(v) for v in orientations[f]])
        if slopes is not None:
            groups.PixelValueTransformationSequence = _item(RescaleSlope=slopes[f], RescaleIntercept=intercept, RescaleType="US")
        if echo_times is not None:
            groups.MREchoSequence = _item(EffectiveEchoTime=float(echo_times[f]))
        groups.MRImageFrameTypeSequence = _item(
            FrameType=["ORIGINAL", "PRIMARY", "M", "NONE"],
            ComplexImageComponent=components[f] if components is not None else "MAGNITUDE",
        )
        frames.append(groups)
    for where, keyword in missing:
        delattr(shared if where is None else frames[where], keyword)
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = ROWS, COLS
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    stored = pixel_frames if pixel_frames is not None else count
    pixels = np.stack([slice_pixels(indices[f % count]) for f in range(stored)])
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.int16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if transfer_syntax != ExplicitVRLittleEndian:
        ds.compress(transfer_syntax)
    ds.save_as(str(path), enforce_file_format=True)
    return path
