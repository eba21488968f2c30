"""Mask writers: one interface for every file a predicted mask becomes.

- :class:`NiftiMaskWriter`: ``<case>.nii.gz``, uint8 labels on the scan's exact grid.
- :class:`ItkSnapLabelWriter` / :class:`SlicerColorTableWriter`: viewer sidecars beside the NIfTI mask
  (``<case>.itksnap.txt``, an ITK-SNAP label description file; ``<case>.ctbl``, a 3D Slicer colour
  table), so classes show with their names and colours.
- :class:`DicomSegWriter`: ``<case>.seg.dcm``, a DICOM Segmentation (binary, highdicom) that references
  the source instances of a DICOM series.

Which writers an ``--output-format`` runs, and every other per-format fact, is in the registry
:mod:`medseg.io.output_formats`. Every file is written atomically. File names come from the case id
(file and folder names), never from DICOM tags. Details and choices: docs/dicom.md.
"""

from __future__ import annotations

import logging
import uuid
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np

from medseg import __version__
from medseg.atomic import write_atomic, write_text_atomic
from medseg.errors import DicomSeriesError, OutputError
from medseg.io.nifti import save_atomic

if TYPE_CHECKING:  # io sits below data in the pipeline: label tables come in as values, not imports
    from medseg.labels import LabelInfo

log = logging.getLogger(__name__)

NIFTI_SUFFIX = ".nii.gz"
SEG_SUFFIX = ".seg.dcm"
ITKSNAP_SUFFIX = ".itksnap.txt"
SLICER_SUFFIX = ".ctbl"


@dataclass(frozen=True)
class ModelInfo:
    """What outputs say about the model that made a mask: its name, label table and medseg's version.

    Every foreground label must carry its coded concept (``code``; the caller resolves defaults with
    :func:`medseg.data.labels.label_code`). ``weights_sha256`` (the bundle's weights checksum) keys the
    UIDs derived for DICOM outputs; without it they are keyed by name and version.
    """

    name: str
    labels: tuple[LabelInfo, ...]
    version: str = field(default=__version__)
    weights_sha256: str = ""

    @property
    def foreground(self) -> list[LabelInfo]:
        return [label for label in self.labels if label.value > 0]


@contextmanager
def counted_warnings(case_id: str, what: str) -> Iterator[None]:
    """Catch the warnings raised while encoding ``what`` (a DICOM output) and only count them in the log:
    their text may quote patient attributes (pydicom's on a malformed value, highdicom's on a PatientName
    of one component)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    if caught:
        kinds = ", ".join(sorted({w.category.__name__ for w in caught}))
        log.info("%s: %d warning(s) (%s) while encoding the %s; not shown, as they may quote patient attributes",
                 case_id, len(caught), kinds, what)


def derived_uid(name: str) -> str:
    """A new DICOM UID in the ``2.25.<UUID>`` form from a name-based UUID (version 5): the same ``name``
    always gives the same UID, so an output of one model for one series keeps its UIDs when redone."""
    # pydicom's generate_uid ignores its entropy sources when prefix is None (a random UUID), hence uuid5.
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, name).int}"


class MaskWriter(ABC):
    """Writes one file for a predicted mask; ``suffix`` names it: ``<case_id><suffix>``."""

    suffix: str = ""

    def path(self, output_dir: Path, case_id: str) -> Path:
        """Where this writer puts the file of ``case_id``."""
        return Path(output_dir) / f"{case_id}{self.suffix}"

    @abstractmethod
    def write(self, scan, image: nib.Nifti1Image, mask: nib.Nifti1Image, path: Path) -> None:
        """Write the file for ``mask`` (uint8 labels on ``image``'s grid) of ``scan`` to ``path``, atomically."""


class NiftiMaskWriter(MaskWriter):
    """The mask as NIfTI (uint8), with the scan's header geometry (see :func:`medseg.io.nifti.mask_like`)."""

    suffix = NIFTI_SUFFIX

    def write(self, scan, image: nib.Nifti1Image, mask: nib.Nifti1Image, path: Path) -> None:
        save_atomic(mask, path)


class ItkSnapLabelWriter(MaskWriter):
    """ITK-SNAP label description file (Segmentation > Import Label Descriptions, or ``itksnap -l``)."""

    suffix = ITKSNAP_SUFFIX

    def __init__(self, model: ModelInfo):
        self.model = model

    def write(self, scan, image: nib.Nifti1Image, mask: nib.Nifti1Image, path: Path) -> None:
        write_text_atomic(path, itksnap_label_text(self.model.labels))


class SlicerColorTableWriter(MaskWriter):
    """3D Slicer colour table (``.ctbl``): load it, then the mask as a labelmap with this colour table."""

    suffix = SLICER_SUFFIX

    def __init__(self, model: ModelInfo):
        self.model = model

    def write(self, scan, image: nib.Nifti1Image, mask: nib.Nifti1Image, path: Path) -> None:
        write_text_atomic(path, slicer_color_table_text(self.model.labels, path.name))


def itksnap_label_text(labels: tuple[LabelInfo, ...] | list[LabelInfo]) -> str:
    """An ITK-SNAP label description file: one line ``IDX R G B A VIS MSH "LABEL"`` per class.

    The background (0) is transparent and hidden; the other classes opaque, shown in 2D and 3D.
    """
    lines = [
        "################################################",
        "# ITK-SnAP Label Description File (written by medseg)",
        "# File format:",
        "# IDX   -R-  -G-  -B-  -A--  VIS MSH  LABEL",
        "# Fields:",
        "#    IDX:   Zero-based index",
        "#    -R-:   Red color component (0..255)",
        "#    -G-:   Green color component (0..255)",
        "#    -B-:   Blue color component (0..255)",
        "#    -A-:   Label transparency (0.00 .. 1.00)",
        "#    VIS:   Label visibility (0 or 1)",
        "#    MSH:   Label mesh visibility (0 or 1)",
        "#  LABEL:   Label description",
        "################################################",
    ]
    for label in sorted(labels, key=lambda item: item.value):
        shown = 0 if label.value == 0 else 1
        r, g, b = label.color
        name = label.name.replace('"', "'")  # the description is a double-quoted string
        lines.append(f"{label.value:5d} {r:5d} {g:4d} {b:4d} {shown:8d} {shown:2d} {shown:2d}    \"{name}\"")
    return "\n".join(lines) + "\n"


def slicer_color_table_text(labels: tuple[LabelInfo, ...] | list[LabelInfo], name: str = "") -> str:
    """A 3D Slicer discrete colour table: ``value name R G B A`` per class (spaces in names become ``_``)."""
    ordered = sorted(labels, key=lambda item: item.value)
    lines = [f"# Color table file {name}".rstrip(), f"# {len(ordered)} values"]
    for label in ordered:
        r, g, b = label.color
        alpha = 0 if label.value == 0 else 255
        lines.append(f"{label.value} {'_'.join(label.name.split())} {r} {g} {b} {alpha}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# DICOM-SEG

#: Source attributes the SEG needs to reference and place its frames (no patient or study data).
_REFERENCE_TAGS = (
    "SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID",
    "Modality", "Rows", "Columns", "NumberOfFrames", "ImageOrientationPatient", "ImagePositionPatient",
    "PixelSpacing", "SliceThickness", "SpacingBetweenSlices",
)
#: The Patient and General Study module attributes of type 1 and 2 (DICOM PS3.3 C.7.1.1, C.7.2.1): the
#: only patient and study data copied into a SEG. Type 2 attributes missing in the source are left empty.
PATIENT_STUDY_TAGS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
)
SEG_SERIES_NUMBER = 1000
#: A mask slice and a source plane are the same plane when their positions differ by less than this
#: fraction of the slice step.
_PLANE_TOLERANCE = 0.1


def minimal_source(path: Path, for_uid: str, step_mm: float):
    """The header of a source file reduced to what a SEG (or RT structure set) may take from it: references, geometry and
    the required patient and study attributes. Everything else (institution, equipment, acquisition
    dates, private tags) stays behind, so highdicom cannot copy it. A missing or empty SliceThickness
    (type 2 in the source, needed by the SEG's pixel measures) becomes the slice step ``step_mm``."""
    import pydicom

    ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    out = pydicom.Dataset()
    for keyword in (*_REFERENCE_TAGS, *PATIENT_STUDY_TAGS):
        if keyword in ds:
            out[keyword] = ds[keyword]
        elif keyword in PATIENT_STUDY_TAGS:
            setattr(out, keyword, "")
    out.SOPClassUID, out.SOPInstanceUID = sop_identity(ds, path)
    if "PerFrameFunctionalGroupsSequence" in ds:
        _frame_geometry(ds, out, step_mm)
    charset = out.get("SpecificCharacterSet")
    if isinstance(charset, str) and charset.startswith("ISO 2022 IR "):
        # One character set named with code extensions (e.g. "ISO 2022 IR 100"), which highdicom refuses
        # alone: the same repertoire without extensions ("ISO_IR 100"; IR 6 is the default repertoire).
        number = charset.rsplit(" ", 1)[-1]
        if number == "6":
            del out.SpecificCharacterSet
        else:
            out.SpecificCharacterSet = f"ISO_IR {number}"
    if "FrameOfReferenceUID" not in out:
        out.FrameOfReferenceUID = for_uid
    if "NumberOfFrames" not in out and not out.get("SliceThickness"):
        out.SliceThickness = round(step_mm, 6)
    return out


def dicom_source_labels(scan, mask: nib.Nifti1Image, model: ModelInfo, what: str) -> np.ndarray:
    """The label array of ``mask`` for a DICOM object (``what``: "a DICOM-SEG", "an RT structure set") that
    references ``scan``'s series; refused with :class:`OutputError` for a NIfTI scan or values that are not
    the model's classes."""
    if scan.kind != "dicom":
        raise OutputError(f"{scan.path}: {what} needs a DICOM series as source; this scan is NIfTI "
                          "(use --output-format nifti)")
    labels = np.asarray(mask.dataobj)
    unknown = sorted(set(np.unique(labels).tolist()) - {label.value for label in model.labels})
    if unknown:
        raise OutputError(f"{scan.path}: mask values {unknown} are not classes of model {model.name}")
    return labels


#: (data set keyword, file meta keyword): the same identity, stored twice (PS3.10 7.1).
_SOP_IDENTITY = (("SOPClassUID", "MediaStorageSOPClassUID"), ("SOPInstanceUID", "MediaStorageSOPInstanceUID"))


def sop_identity(ds, path: Path) -> tuple[str, str]:
    """The SOP Class and SOP Instance UID a DICOM-SEG or RTSTRUCT references for source file ``path``.

    Some anonymisers blank them in the data set but keep the file meta, which by the standard holds the same
    values (Media Storage SOP Class/Instance UID): those are taken then, and the substitution is logged.
    A file with neither is refused with :class:`OutputError` naming the attribute.
    """
    values = []
    for keyword, meta_keyword in _SOP_IDENTITY:
        value = str(ds.get(keyword) or "").strip()
        if not value:
            meta = getattr(ds, "file_meta", None)
            value = str(meta.get(meta_keyword) or "").strip() if meta is not None else ""
            if not value:
                raise OutputError(f"{path}: {keyword} is empty and the file meta has no {meta_keyword}; a DICOM "
                                  "object referencing this image cannot be written")
            log.info("%s: %s is empty in the data set; the file meta's %s is used", path.name, keyword, meta_keyword)
        values.append(value)
    return values[0], values[1]


def frame_of_reference(path: Path, case_id: str) -> str:
    """The source's FrameOfReferenceUID; for a source without one (anonymised exports often drop it;
    highdicom needs one) a UID derived from its SeriesInstanceUID, so every SEG and RT structure set of the
    series shares it."""
    import pydicom

    header = pydicom.dcmread(str(path), stop_before_pixels=True,
                             specific_tags=["SeriesInstanceUID", "FrameOfReferenceUID"])
    uid = str(header.get("FrameOfReferenceUID") or "")
    if uid:
        return uid
    log.warning("%s: the source series has no FrameOfReferenceUID; the DICOM output carries one derived from its "
                "series UID (viewers place it by its referenced images)", case_id)
    return pydicom.uid.generate_uid(entropy_srcs=["medseg-frame-of-reference", str(header.SeriesInstanceUID)])


def _frame_geometry(ds, out, step_mm: float) -> None:
    """Copy a multi-frame source's frame geometry into ``out`` in the layout highdicom reads: pixel measures
    and orientation shared (the reader has checked that the frames agree on them), positions per frame.
    Vendors put them either way (Philips and Siemens store all three per frame)."""
    import pydicom

    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else pydicom.Dataset()
    frames = list(ds.PerFrameFunctionalGroupsSequence)

    def first(group: str):
        for item in (shared, *frames):
            if group in item and item[group].value:
                return item[group].value[0]
        return None

    measures, orientation = first("PixelMeasuresSequence"), first("PlaneOrientationSequence")
    new_shared = pydicom.Dataset()
    if measures is not None:
        measures = pydicom.Dataset(measures)  # a copy: the source dataset is not changed
        if not measures.get("SliceThickness"):
            measures.SliceThickness = round(step_mm, 6)
        new_shared.PixelMeasuresSequence = pydicom.Sequence([measures])
    if orientation is not None:
        new_shared.PlaneOrientationSequence = pydicom.Sequence([pydicom.Dataset(orientation)])
    out.SharedFunctionalGroupsSequence = pydicom.Sequence([new_shared])
    per_frame = []
    for item in frames:
        kept = pydicom.Dataset()
        position = item.get("PlanePositionSequence") or shared.get("PlanePositionSequence")
        if position:
            kept.PlanePositionSequence = pydicom.Sequence([pydicom.Dataset(position[0])])
        per_frame.append(kept)
    out.PerFrameFunctionalGroupsSequence = pydicom.Sequence(per_frame)


class DicomSegWriter(MaskWriter):
    """A binary DICOM Segmentation of a DICOM series' mask, one segment per foreground class.

    Segments are numbered by label value and named by the model's label names, with their coded
    concepts (:func:`medseg.data.labels.label_code`); the algorithm is the model (name, medseg version).
    Each frame references its source instance (and frame, for a multi-frame source). The SEG is a new
    series (new UIDs) in the source's study and frame of reference; of the source it copies only the
    required Patient and General Study attributes (:data:`PATIENT_STUDY_TAGS`).
    """

    suffix = SEG_SUFFIX

    def __init__(self, model: ModelInfo):
        self.model = model

    def write(self, scan, image: nib.Nifti1Image, mask: nib.Nifti1Image, path: Path) -> None:
        seg = self.build(scan, mask)
        write_atomic(path, lambda tmp: seg.save_as(str(tmp)))

    def build(self, scan, mask: nib.Nifti1Image):
        """The SEG dataset (highdicom ``Segmentation``) of ``mask`` on the grid of DICOM ``scan``.

        Warnings of pydicom and highdicom are caught and only counted in the log: their text may quote
        patient attributes (e.g. highdicom's remark on a PatientName of one component).
        """
        with counted_warnings(scan.case_id, "DICOM-SEG"):
            return self._build(scan, mask)

    def _build(self, scan, mask: nib.Nifti1Image):
        import highdicom as hd
        import pydicom
        from pydicom.sr.codedict import codes

        from medseg.io.dicom import LPS_TO_RAS, series_planes

        labels = dicom_source_labels(scan, mask, self.model, "a DICOM-SEG")
        planes = series_planes(scan.path, scan.series)
        order = planes_of_slices(scan.path, planes, np.asarray(mask.affine, float), labels.shape, LPS_TO_RAS)
        step_mm = float(np.linalg.norm(np.asarray(mask.affine, float)[:3, 2]))
        for_uid = frame_of_reference(planes[order[0]].path, scan.case_id)
        sources: dict[Path, pydicom.Dataset] = {}
        for plane in (planes[i] for i in order):
            if plane.path not in sources:
                sources[plane.path] = minimal_source(plane.path, for_uid, step_mm)
        multi_frame = planes[order[0]].frame is not None
        if multi_frame:
            source_images = list(sources.values())
            if len(source_images) != 1:
                raise DicomSeriesError(scan.path, "a DICOM-SEG of a series spread over several multi-frame files "
                                                  "is not supported")
            count = int(source_images[0].NumberOfFrames)
            if count != labels.shape[2]:
                raise DicomSeriesError(scan.path, f"the multi-frame source has {count} frames but the volume "
                                                  f"{labels.shape[2]} slices (frames left out): no DICOM-SEG written")
            pixels = np.zeros((count, labels.shape[1], labels.shape[0]), np.uint8)
            for k, i in enumerate(order):
                pixels[planes[i].frame - 1] = labels[:, :, k].T  # type: ignore[operator]
        else:
            source_images = [sources[planes[i].path] for i in order]
            pixels = np.ascontiguousarray(labels.transpose(2, 1, 0))  # (slice k, row j, column i)
        algorithm = hd.AlgorithmIdentificationSequence(
            name=self.model.name[:64], family=codes.cid7162.ArtificialIntelligence, version=f"medseg {self.model.version}",
            source="medseg")
        descriptions = []
        for label in self.model.foreground:
            code = label.code
            if code is None:
                raise ValueError(f"label {label.value} ({label.name}) has no coded concept; resolve it with label_code")
            descriptions.append(hd.seg.SegmentDescription(
                segment_number=label.value, segment_label=label.name[:64],
                segmented_property_category=hd.sr.CodedConcept(code.category.value, code.category.scheme,
                                                               code.category.meaning),
                segmented_property_type=hd.sr.CodedConcept(code.type.value, code.type.scheme, code.type.meaning),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
                display_color=hd.color.CIELabColor.from_rgb(*label.color),
            ))
        return hd.seg.Segmentation(
            source_images=source_images, pixel_array=pixels,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
            series_instance_uid=hd.UID(), series_number=SEG_SERIES_NUMBER, sop_instance_uid=hd.UID(),
            instance_number=1, manufacturer="medseg", manufacturer_model_name=self.model.name[:64],
            software_versions=f"medseg {self.model.version}", device_serial_number="none",
            series_description=f"{self.model.name} segmentation"[:64], content_label="MEDSEG",
            content_description=f"{self.model.name} (medseg {self.model.version})"[:64],
        )


def planes_of_slices(folder: Path, planes, affine_ras: np.ndarray, shape: tuple[int, ...],
                      lps_to_ras: np.ndarray) -> list[int]:
    """For each slice k of a mask (NIfTI, RAS affine), the index of the source plane at its position.

    Refuses a mask whose slices do not all lie on source planes (a resampled or tilt-corrected grid).
    """
    affine_lps = lps_to_ras @ affine_ras  # the flip is its own inverse
    step = float(np.linalg.norm(affine_lps[:3, 2]))
    positions = np.array([p.position for p in planes])
    order = []
    for k in range(shape[2]):
        where = affine_lps[:3, :3] @ np.array([0.0, 0.0, float(k)]) + affine_lps[:3, 3]
        distances = np.linalg.norm(positions - where, axis=1)
        best = int(distances.argmin())
        if distances[best] > _PLANE_TOLERANCE * step:
            raise DicomSeriesError(
                folder, f"mask slice {k} at {np.round(where, 3).tolist()} mm (LPS) lies on no source image "
                f"(nearest {distances[best]:.3f} mm away): the mask is not on the series' grid, no DICOM output written")
        order.append(best)
    if len(set(order)) != len(order):
        raise DicomSeriesError(folder, "two mask slices map to one source image: no DICOM output written")
    return order
