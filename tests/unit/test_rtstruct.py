"""RT structure set writer on synthetic series: exact contour coordinates of a known square, holes and
islands in one slice, valid per dciodvfy, the exact mask back after rasterising by pixel centres (single-
and multi-frame sources), ROIs of every class, references, copied attributes, UIDs stable over reruns,
and the SOP UIDs of a blanked source taken from the file meta or refused by name."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from medseg.data.labels import label_code, label_table
from medseg.errors import OutputError
from medseg.io.mask_writers import ModelInfo
from medseg.io.nifti import mask_like
from medseg.io.rtstruct import RtStructWriter, contour_data, slice_contours
from medseg.io.scans import Scan, find_scans, load_scan
from tests.unit.dicom_synth import write_multiframe, write_series
from tests.unit.rtstruct_raster import rasterise
from tests.unit.test_mask_writers import dciodvfy_errors

NAMES = {0: "background", 1: "left lung", 2: "nodule"}
MODEL = ModelInfo("tiny-lung", tuple(label.model_copy(update={"code": label_code(label)})
                                     for label in label_table(NAMES)), weights_sha256="ab" * 32)
FOR_UID = "1.2.826.0.1.3680043.8.498.77"


def _scan(root) -> Scan:
    scans = find_scans([root])
    assert len(scans) == 1
    return scans[0]


def _contours(ds: pydicom.Dataset, roi: int) -> list[pydicom.Dataset]:
    item = next(i for i in ds.ROIContourSequence if int(i.ReferencedROINumber) == roi)
    return list(item.get("ContourSequence", []))


def test_a_square_gives_its_marching_squares_outline_in_patient_mm_on_its_source_image(tmp_path):
    # 5 columns x 6 rows, 0.7 mm between columns, 0.8 mm between rows, slices 2.5 mm apart from (10, -20, 30).
    files = write_series(tmp_path / "in" / "series", 3, FrameOfReferenceUID=FOR_UID)
    scan = _scan(tmp_path / "in")
    image = load_scan(scan)
    labels = np.zeros(image.shape, np.uint8)
    labels[1:3, 2:5, 1] = 1  # columns 1-2, rows 2-4 of the middle slice
    path = tmp_path / "square.rtstruct.dcm"
    RtStructWriter(MODEL).write(scan, image, mask_like(labels, image), path)
    ds = pydicom.dcmread(str(path))
    (contour,) = _contours(ds, 1)
    points = np.reshape(np.array(contour.ContourData, float), (-1, 3))
    # Halfway between pixel centres: columns 0.5 and 2.5, rows 1.5 and 4.5, corners cut by half a pixel.
    expected = {(10.35, -18.4), (10.7, -18.8), (11.4, -18.8), (11.75, -18.4),
                (11.75, -16.8), (11.4, -16.4), (10.7, -16.4), (10.35, -16.8)}
    assert contour.ContourGeometricType == "CLOSED_PLANAR" and int(contour.NumberOfContourPoints) == 8
    assert {(round(x, 3), round(y, 3)) for x, y, _ in points} == expected
    assert np.all(points[:, 2] == 32.5)
    middle = pydicom.dcmread(str(files[1]))
    ref = contour.ContourImageSequence[0]
    assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (middle.SOPClassUID, middle.SOPInstanceUID)
    assert _contours(ds, 2) == []  # "nodule" is absent: an ROI without contours


def test_slice_contours_of_a_ring_with_an_island_in_its_hole_and_another_beside_it():
    mask = np.zeros((20, 16), bool)
    mask[2:12, 2:12] = True
    mask[4:10, 4:10] = False  # the hole
    mask[6:8, 6:8] = True  # an island in the hole
    mask[14:18, 3:6] = True  # an island beside the ring
    contours = slice_contours(mask)
    assert len(contours) == 4
    from skimage.draw import polygon

    filled = np.zeros_like(mask)
    for contour in contours:
        rr, cc = polygon(contour[:, 0], contour[:, 1], shape=mask.shape)
        filled[rr, cc] ^= True  # even-odd
    assert np.array_equal(filled, mask)
    assert slice_contours(np.ones((3, 4), bool))[0].min(axis=0).tolist() == [-0.5, -0.5]  # closed at the border


SOURCES = {
    "ascending": lambda d: write_series(d, 5, FrameOfReferenceUID=FOR_UID, StudyDate="20200101"),
    "descending_no_frame_of_reference": lambda d: write_series(d, 5, step=(0.0, 0.0, -2.5)),
    "oblique": lambda d: write_series(d, 4, orientation=(0.8, 0.6, 0, -0.6, 0.8, 0), step=(0.0, 0.0, 3.0)),
    "iso2022_charset": lambda d: write_series(d, 4, SpecificCharacterSet="ISO 2022 IR 100", PatientName="Müller^Jörg"),
    "multiframe_shuffled": lambda d: write_multiframe(d / "mf.dcm", 5, indices=[3, 0, 4, 2, 1]),
}


@pytest.mark.parametrize("source", list(SOURCES))
def test_rtstruct_is_valid_and_rasterises_back_to_exactly_the_mask(tmp_path, source):
    SOURCES[source](tmp_path / "in" / "series")
    scan = _scan(tmp_path / "in")
    image = load_scan(scan)
    labels = np.zeros(image.shape, np.uint8)
    labels[0:4, 0:5, 0] = 1
    labels[1:3, 2:4, 0] = 0  # a hole
    labels[4, 5, 0] = 2  # a one-pixel island in the corner
    labels[0, 0, 2] = labels[2:4, 3:5, 2] = 1  # two islands
    labels[:, :, 3] = 1  # the whole slice
    path = tmp_path / f"{scan.case_id}.rtstruct.dcm"
    RtStructWriter(MODEL).write(scan, image, mask_like(labels, image), path)
    assert dciodvfy_errors(path) == []
    back = rasterise(path, scan.path)
    assert np.array_equal(back["left lung"], labels == 1) and np.array_equal(back["nodule"], labels == 2)


def test_rois_references_and_copied_attributes(tmp_path):
    files = write_series(tmp_path / "in" / "series", 4, FrameOfReferenceUID=FOR_UID, InstitutionName="Somewhere",
                         StudyDate="20200101", AccessionNumber="ACC1", OtherPatientIDs="OTHER1")
    scan = _scan(tmp_path / "in")
    image = load_scan(scan)
    labels = np.zeros(image.shape, np.uint8)
    labels[1:4, 1:4, 1:3] = 1
    path = tmp_path / "a.rtstruct.dcm"
    RtStructWriter(MODEL).write(scan, image, mask_like(labels, image), path)
    ds = pydicom.dcmread(str(path))
    source = pydicom.dcmread(str(files[0]))
    assert ds.Modality == "RTSTRUCT" and ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.481.3"
    rois = {int(r.ROINumber): r for r in ds.StructureSetROISequence}
    assert {n: r.ROIName for n, r in rois.items()} == {1: "left lung", 2: "nodule"}
    assert all(r.ReferencedFrameOfReferenceUID == FOR_UID and r.ROIGenerationAlgorithm == "AUTOMATIC"
               for r in rois.values())
    colours = {int(i.ReferencedROINumber): tuple(int(c) for c in i.ROIDisplayColor) for i in ds.ROIContourSequence}
    assert colours == {label.value: label.color for label in MODEL.foreground}
    assert sorted(int(o.ReferencedROINumber) for o in ds.RTROIObservationsSequence) == [1, 2]
    assert len(_contours(ds, 1)) == 2 and _contours(ds, 2) == []
    frame = ds.ReferencedFrameOfReferenceSequence[0]
    study = frame.RTReferencedStudySequence[0]
    series = study.RTReferencedSeriesSequence[0]
    assert frame.FrameOfReferenceUID == FOR_UID and ds.FrameOfReferenceUID == FOR_UID
    assert study.ReferencedSOPInstanceUID == source.StudyInstanceUID == ds.StudyInstanceUID
    assert series.SeriesInstanceUID == source.SeriesInstanceUID != ds.SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in series.ContourImageSequence} == {
        pydicom.dcmread(str(p)).SOPInstanceUID for p in files}
    assert (ds.PatientName, ds.PatientID, ds.StudyDate, ds.AccessionNumber) == (
        source.PatientName, source.PatientID, "20200101", "ACC1")
    raw = path.read_bytes()
    assert b"Somewhere" not in raw and b"OTHER1" not in raw  # only the required patient/study attributes travel


def test_a_rerun_gives_the_same_uids_another_model_other_ones(tmp_path):
    write_series(tmp_path / "in" / "series", 3)
    scan = _scan(tmp_path / "in")
    image = load_scan(scan)
    mask = mask_like(np.zeros(image.shape, np.uint8), image)
    first, again = RtStructWriter(MODEL).build(scan, mask), RtStructWriter(MODEL).build(scan, mask)
    other = RtStructWriter(ModelInfo(MODEL.name, MODEL.labels, weights_sha256="cd" * 32)).build(scan, mask)
    assert (first.SeriesInstanceUID, first.SOPInstanceUID) == (again.SeriesInstanceUID, again.SOPInstanceUID)
    assert first.SOPInstanceUID == first.file_meta.MediaStorageSOPInstanceUID
    assert first.SeriesInstanceUID != other.SeriesInstanceUID and first.SOPInstanceUID != other.SOPInstanceUID
    assert all(uid.startswith("2.25.") and len(uid) <= 64 for uid in (first.SeriesInstanceUID, first.SOPInstanceUID))


def test_blank_sop_uids_are_taken_from_the_file_meta(tmp_path):
    files = write_series(tmp_path / "in" / "series", 3, SOPClassUID="", SOPInstanceUID="")
    scan = _scan(tmp_path / "in")
    image = load_scan(scan)
    labels = np.zeros(image.shape, np.uint8)
    labels[1:3, 1:3, :] = 1
    path = tmp_path / "blank.rtstruct.dcm"
    RtStructWriter(MODEL).write(scan, image, mask_like(labels, image), path)
    assert dciodvfy_errors(path) == []
    ds = pydicom.dcmread(str(path))
    metas = {pydicom.dcmread(str(p)).file_meta.MediaStorageSOPInstanceUID for p in files}
    refs = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert {i.ReferencedSOPInstanceUID for i in refs.ContourImageSequence} == metas
    assert {c.ContourImageSequence[0].ReferencedSOPClassUID for c in _contours(ds, 1)} == {"1.2.840.10008.5.1.4.1.1.2"}
    assert np.array_equal(rasterise(path, scan.path)["left lung"], labels == 1)


def test_a_source_without_any_sop_instance_uid_is_refused_by_name(tmp_path):
    files = write_series(tmp_path / "in" / "series", 3, SOPInstanceUID="")
    ds = pydicom.dcmread(str(files[1]))
    del ds.file_meta.MediaStorageSOPInstanceUID
    ds.save_as(str(files[1]), enforce_file_format=False)
    scan = _scan(tmp_path / "in")
    image = load_scan(scan)
    with pytest.raises(OutputError, match=r"SOPInstanceUID is empty and the file meta has no MediaStorageSOPInstanceUID"):
        RtStructWriter(MODEL).write(scan, image, mask_like(np.zeros(image.shape, np.uint8), image),
                                    tmp_path / "x.rtstruct.dcm")
    assert not list(tmp_path.glob("*.rtstruct.dcm")) and not list(tmp_path.glob(".*tmp*"))


def test_a_nifti_scan_or_unknown_classes_get_no_rtstruct(tmp_path):
    write_series(tmp_path / "in" / "series", 3)
    scan = _scan(tmp_path / "in")
    image = load_scan(scan)
    nifti_scan = Scan("n", tmp_path / "n.nii.gz", "nifti")
    with pytest.raises(OutputError, match="needs a DICOM series"):
        RtStructWriter(MODEL).build(nifti_scan, mask_like(np.zeros(image.shape, np.uint8), image))
    with pytest.raises(OutputError, match=r"mask values \[7\] are not classes"):
        RtStructWriter(MODEL).build(scan, mask_like(np.full(image.shape, 7, np.uint8), image))


def test_contour_data_is_three_decimals_without_negative_zero():
    element = contour_data(np.array([[1.23456, -0.0001, -7.5], [0.0, 2.0, 1e-9]]))
    assert element.value == b"1.235\\0.000\\-7.500\\0.000\\2.000\\0.000"  # even length: no pad needed


def test_a_contour_longer_than_explicit_vr_allows_makes_an_implicit_vr_file(tmp_path, monkeypatch):
    import medseg.io.rtstruct as rtstruct

    monkeypatch.setattr(rtstruct, "_MAX_DS_BYTES", 64)  # instead of a 2500-point outline
    write_series(tmp_path / "in" / "series", 3)
    scan = _scan(tmp_path / "in")
    image = load_scan(scan)
    labels = np.zeros(image.shape, np.uint8)
    labels[0:4, 0:5, 1] = 1
    labels[1:3, 2:4, 1] = 0
    labels[4, 5, 1] = 2
    path = tmp_path / "long.rtstruct.dcm"
    RtStructWriter(MODEL).write(scan, image, mask_like(labels, image), path)
    assert pydicom.dcmread(str(path)).file_meta.TransferSyntaxUID == pydicom.uid.ImplicitVRLittleEndian
    assert dciodvfy_errors(path) == []
    back = rasterise(path, scan.path)
    assert np.array_equal(back["left lung"], labels == 1) and np.array_equal(back["nodule"], labels == 2)
