"""DICOM RT Structure Set output: ``<case>.rtstruct.dcm``, the predicted mask of a DICOM series as one
ROI per foreground class of the model, each a set of closed planar contours per slice in patient
coordinates (LPS mm), referencing the source series (frame of reference, study, series, and every
source image a contour lies on).

Contours come from scikit-image's marching squares (``skimage.measure.find_contours`` at level 0.5 on
the zero-padded binary slice): every vertex lies halfway between a foreground and a background pixel
centre, so filling the contours by pixel centres (the usual rasterisation of planar contours) gives back
exactly the mask. Holes and nested islands are written as further contours on the same slice; a viewer filling
with the even-odd rule subtracts a hole's contour from the island around it (docs/dicom.md, "RTSTRUCT").
We chose this over rt-utils 1.2.7 after measuring both on real CT and MR (docs/decisions.md,
bench/rtstruct_libraries.py): rt-utils' contours run through boundary pixel centres, so a pixel-centre
rasteriser loses half a pixel all round (Dice 0.90-0.95 per ROI on the CT, 0.57 for a speckled MR class,
against 1.0 here); it writes coordinates of float32 noise longer than DS allows (16k-51k dciodvfy Error
lines per file); it cannot place contours on multi-frame sources; and its wheel brings OpenCV and a
top-level ``tests`` package that hides ours. This module needs only pydicom and scikit-image, which
medseg already has.
"""

from __future__ import annotations

import datetime
import logging
from pathlib import Path

import nibabel as nib
import numpy as np

from medseg.atomic import write_atomic
from medseg.errors import OutputError
from medseg.io.mask_writers import (
    PATIENT_STUDY_TAGS,
    MaskWriter,
    ModelInfo,
    counted_warnings,
    derived_uid,
    dicom_source_labels,
    frame_of_reference,
    minimal_source,
    planes_of_slices,
    sop_identity,
)

log = logging.getLogger(__name__)

RTSTRUCT_SUFFIX = ".rtstruct.dcm"
RTSTRUCT_SERIES_NUMBER = 1001
#: RT Structure Set Storage; the Study Component Management SOP class that RT Referenced Study items name
#: (PS3.3 C.8.8.5: the value every RT object uses, though the class itself is retired).
RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
STUDY_COMPONENT_MANAGEMENT = "1.2.840.10008.3.1.2.3.1"
#: Contour points are written in mm with this many decimals (a micrometre: far below any pixel spacing).
_DECIMALS = 3
#: Explicit VR stores a DS value's length in 2 bytes: a longer ContourData needs implicit VR.
_MAX_DS_BYTES = 0xFFFE


def slice_contours(mask: np.ndarray) -> list[np.ndarray]:
    """Closed contours of a binary slice ``mask`` (axes i, j), as (n, 2) arrays of fractional (i, j) indices.

    Marching squares at 0.5 on the zero-padded slice, so contours close at the image border and each
    vertex lies halfway between a foreground and a background pixel centre; diagonal neighbours of the
    foreground are joined (``fully_connected="high"``). Collinear vertices are dropped (a staircase at
    45 degrees is one segment), the closing vertex is not repeated (DICOM CLOSED_PLANAR). Outer borders,
    hole borders and the borders of islands in holes all come out as contours: the region is what the
    even-odd rule encloses.
    """
    from skimage.measure import find_contours

    mask = np.asarray(mask, bool)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not rows.size:
        return []
    # Only the foreground's bounding box, padded by one background pixel so every contour closes.
    box = mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    offset = np.array([rows[0] - 1.0, cols[0] - 1.0])
    contours = []
    for contour in find_contours(np.pad(box, 1).astype(np.float64), 0.5, fully_connected="high"):
        if np.array_equal(contour[0], contour[-1]):
            contour = contour[:-1]
        contour = _without_collinear(contour)
        if len(contour) >= 3:
            contours.append(contour + offset)
    return contours


def _without_collinear(points: np.ndarray) -> np.ndarray:
    """A closed polygon without the vertices that lie on the straight line through their neighbours.

    Marching-squares vertices are multiples of 0.5, so the cross products are exact: nothing that bends
    is dropped. (skimage's ``approximate_polygon`` does the same with tolerance ~0, 20x slower per call.)
    """
    before, after = np.roll(points, 1, axis=0), np.roll(points, -1, axis=0)
    incoming, outgoing = points - before, after - points
    cross = incoming[:, 0] * outgoing[:, 1] - incoming[:, 1] * outgoing[:, 0]
    straight = (cross == 0) & ((incoming * outgoing).sum(axis=1) > 0)
    return points[~straight]


def source_sop_uids(path: Path) -> tuple[str, str]:
    """(SOPClassUID, SOPInstanceUID) of a source file, the file meta's when the data set's are empty
    (:func:`medseg.io.mask_writers.sop_identity`, which the SEG uses too)."""
    import pydicom

    ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
    return sop_identity(ds, Path(path))


def contour_data(points: np.ndarray):
    """The ContourData element of ``points`` (n, 3; LPS mm), with :data:`_DECIMALS` decimals.

    Encoded here once as the bytes of the file (a pydicom ``RawDataElement``, explicit VR little endian):
    pydicom would otherwise make and validate a number object per coordinate, which took most of the
    writer's time on a mask with many small islands.
    """
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    rounded = np.round(np.asarray(points, float), _DECIMALS) + 0.0  # + 0.0 turns -0.0 into 0.0
    text = "\\".join(f"{v:.{_DECIMALS}f}" for v in rounded.ravel().tolist()).encode("ascii")
    if len(text) % 2:
        text += b" "  # DICOM values have even length; DS pads with a space
    tag = Tag(0x3006, 0x0050)
    return RawDataElement(tag, "DS", len(text), text, 0, False, True)


def _implicit_if_too_long(ds, case_id: str) -> None:
    """Switch ``ds`` to implicit VR little endian when a ContourData is longer than explicit VR's 2-byte
    length allows (:data:`_MAX_DS_BYTES`: about 2500 points, a very ragged outline). Implicit VR has
    4-byte lengths and is the transfer syntax every DICOM application must read."""
    from pydicom.charset import default_encoding
    from pydicom.tag import Tag
    from pydicom.uid import ImplicitVRLittleEndian

    tag = Tag(0x3006, 0x0050)
    items = [c for roi in ds.ROIContourSequence for c in roi.get("ContourSequence", [])]
    if not any(item.get_item(tag).length > _MAX_DS_BYTES for item in items):
        return
    for item in items:
        item[tag] = item.get_item(tag)._replace(is_implicit_VR=True)
        item.set_original_encoding(True, True, default_encoding)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    log.info("%s: a contour is longer than explicit VR can hold; the RT structure set is written in implicit VR",
             case_id)


class RtStructWriter(MaskWriter):
    """An RT Structure Set of a DICOM series' mask: one ROI per foreground class of the model.

    ROI numbers are label values, ROI names and display colours the labels' names and colours. Every
    foreground class of the model gets an ROI, also when the mask lacks it (an ROI without contours: the
    model looked and found none; a case's ROI list and numbers are the same for every case of a model, as
    the SEG's segments are). Each contour references the source image it lies on (and its frame, for a
    multi-frame source). The structure set is a new series in the source's study and frame of reference,
    its UIDs derived from the source series UID and the model (:func:`derived_uid`), so a rerun makes the
    same UIDs. Of the source it copies only the Patient and General Study attributes
    (:data:`~medseg.io.mask_writers.PATIENT_STUDY_TAGS`).
    """

    suffix = RTSTRUCT_SUFFIX

    def __init__(self, model: ModelInfo):
        self.model = model

    def write(self, scan, image: nib.Nifti1Image, mask: nib.Nifti1Image, path: Path) -> None:
        ds = self.build(scan, mask)
        write_atomic(path, lambda tmp: ds.save_as(str(tmp), enforce_file_format=True))

    def build(self, scan, mask: nib.Nifti1Image):
        """The RT Structure Set (a pydicom ``FileDataset``) of ``mask`` on the grid of DICOM ``scan``.

        pydicom's warnings are only counted in the log (:func:`counted_warnings`): they may quote patient
        attributes."""
        with counted_warnings(scan.case_id, "RT structure set"):
            return self._build(scan, mask)

    def _build(self, scan, mask: nib.Nifti1Image):
        import pydicom
        from pydicom.dataset import FileDataset, FileMetaDataset
        from pydicom.sequence import Sequence
        from pydicom.uid import ExplicitVRLittleEndian

        from medseg.io.dicom import LPS_TO_RAS, series_planes

        labels = dicom_source_labels(scan, mask, self.model, "an RT structure set")
        affine_lps = LPS_TO_RAS @ np.asarray(mask.affine, float)
        planes = series_planes(scan.path, scan.series)
        order = planes_of_slices(scan.path, planes, np.asarray(mask.affine, float), labels.shape, LPS_TO_RAS)
        step_mm = float(np.linalg.norm(affine_lps[:3, 2]))
        first = planes[order[0]]
        for_uid = frame_of_reference(first.path, scan.case_id)
        source = minimal_source(first.path, for_uid, step_mm)
        if not str(source.get("StudyInstanceUID") or ""):
            raise OutputError(f"{first.path}: StudyInstanceUID is empty: an RT structure set cannot name the "
                              "source's study")
        series_uid = str(scan.series.series_uid)
        sop_uids = {path: source_sop_uids(path) for path in dict.fromkeys(planes[i].path for i in order)}

        def image_ref(k: int):
            plane = planes[order[k]]
            item = pydicom.Dataset()
            item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = sop_uids[plane.path]
            if plane.frame is not None:
                item.ReferencedFrameNumber = plane.frame
            return item

        now = datetime.datetime.now()
        key = self.model.weights_sha256 or f"{self.model.name}/{self.model.version}"
        instance_uid = derived_uid(f"medseg-rtstruct/{series_uid}/{key}/instance")
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = RT_STRUCTURE_SET_STORAGE
        meta.MediaStorageSOPInstanceUID = instance_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        if "SpecificCharacterSet" in source:
            ds.SpecificCharacterSet = source.SpecificCharacterSet
        ds.SOPClassUID = RT_STRUCTURE_SET_STORAGE
        ds.SOPInstanceUID = instance_uid
        ds.InstanceCreationDate = now.strftime("%Y%m%d")
        ds.InstanceCreationTime = now.strftime("%H%M%S")
        for keyword in PATIENT_STUDY_TAGS:  # minimal_source left missing ones empty (type 2)
            ds[keyword] = source[keyword]
        # RT Series and General Equipment
        ds.Modality = "RTSTRUCT"
        ds.SeriesInstanceUID = derived_uid(f"medseg-rtstruct/{series_uid}/{key}/series")
        ds.SeriesNumber = RTSTRUCT_SERIES_NUMBER
        ds.SeriesDescription = f"{self.model.name} structures"[:64]
        ds.OperatorsName = ""
        ds.Manufacturer = "medseg"
        ds.ManufacturerModelName = self.model.name[:64]
        ds.SoftwareVersions = f"medseg {self.model.version}"
        # Structure Set
        ds.StructureSetLabel = "MEDSEG"
        ds.StructureSetName = self.model.name[:64]
        ds.StructureSetDescription = f"{self.model.name} (medseg {self.model.version}), automatic"[:1024]
        ds.InstanceNumber = 1
        ds.StructureSetDate = now.strftime("%Y%m%d")
        ds.StructureSetTime = now.strftime("%H%M%S")
        series_ref = pydicom.Dataset()
        series_ref.SeriesInstanceUID = series_uid
        series_ref.ContourImageSequence = Sequence([image_ref(k) for k in range(labels.shape[2])])
        study_ref = pydicom.Dataset()
        study_ref.ReferencedSOPClassUID = STUDY_COMPONENT_MANAGEMENT
        study_ref.ReferencedSOPInstanceUID = source.StudyInstanceUID
        study_ref.RTReferencedSeriesSequence = Sequence([series_ref])
        for_ref = pydicom.Dataset()
        for_ref.FrameOfReferenceUID = for_uid
        for_ref.RTReferencedStudySequence = Sequence([study_ref])
        ds.ReferencedFrameOfReferenceSequence = Sequence([for_ref])
        ds.FrameOfReferenceUID = for_uid  # Frame of Reference module
        ds.PositionReferenceIndicator = ""

        rois, roi_contours, observations = [], [], []
        counts = {}
        for label in self.model.foreground:
            roi = pydicom.Dataset()
            roi.ROINumber = label.value
            roi.ReferencedFrameOfReferenceUID = for_uid
            roi.ROIName = label.name[:64]
            roi.ROIGenerationAlgorithm = "AUTOMATIC"
            rois.append(roi)
            item = pydicom.Dataset()
            item.ROIDisplayColor = [int(c) for c in label.color]
            item.ReferencedROINumber = label.value
            contours = self._contours(labels == label.value, affine_lps, planes, order, image_ref)
            counts[label.name] = len(contours)
            if contours:  # Contour Sequence is type 3: an ROI the mask lacks has none
                item.ContourSequence = Sequence(contours)
            roi_contours.append(item)
            observation = pydicom.Dataset()
            observation.ObservationNumber = label.value
            observation.ReferencedROINumber = label.value
            observation.RTROIInterpretedType = ""  # type 2: an automatic result claims no clinical role
            observation.ROIInterpreter = ""
            observations.append(observation)
        ds.StructureSetROISequence = Sequence(rois)
        ds.ROIContourSequence = Sequence(roi_contours)
        ds.RTROIObservationsSequence = Sequence(observations)
        ds.ApprovalStatus = "UNAPPROVED"
        _implicit_if_too_long(ds, scan.case_id)
        log.debug("%s: RT structure set with contours per ROI %s", scan.case_id, counts)
        return ds

    @staticmethod
    def _contours(binary: np.ndarray, affine_lps: np.ndarray, planes, order: list[int], image_ref) -> list:
        """Contour Sequence items of one class: closed planar contours of each slice, in LPS mm on the plane
        of the source image (its ImagePositionPatient, the mask's in-plane axes)."""
        import pydicom
        from pydicom.charset import default_encoding
        from pydicom.sequence import Sequence

        axes = affine_lps[:3, :2]  # mm per step of i and of j
        items = []
        for k in np.flatnonzero(binary.any(axis=(0, 1))):
            origin = np.asarray(planes[order[k]].position, float)
            for contour in slice_contours(binary[:, :, k]):
                points = origin + contour @ axes.T
                element = contour_data(points)
                item = pydicom.Dataset()
                item.ContourImageSequence = Sequence([image_ref(int(k))])
                item.ContourGeometricType = "CLOSED_PLANAR"
                item.NumberOfContourPoints = len(points)
                item.ContourNumber = len(items) + 1
                item[element.tag] = element
                # Marks the item as explicit VR little endian in the default character set (ContourData is
                # ASCII) already, so pydicom writes the raw ContourData as it is (the documented use) instead
                # of decoding it to numbers and encoding them again.
                item.set_original_encoding(False, True, default_encoding)
                items.append(item)
        return items
