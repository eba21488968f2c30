"""Mask writers: DICOM-SEG on synthetic series (valid per dciodvfy, exact round trip through highdicom on the
source grid, for ascending, descending, oblique, compressed and multi-frame sources and an empty mask),
viewer sidecars, label codes, and ``--output-format`` in the batch runner."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEGLSLossless, RLELossless, generate_uid

from medseg.data.labels import KNOWN_CODES, LabelCode, default_label_code, label_code, label_table
from medseg.errors import DicomSeriesError, ManifestError, OutputError
from medseg.inference.runner import predict_paths
from medseg.io.dicom import series_planes
from medseg.io.mask_writers import (
    DicomSegWriter,
    ModelInfo,
    itksnap_label_text,
    slicer_color_table_text,
)
from medseg.io.nifti import mask_like
from medseg.io.output_formats import formats_for
from medseg.io.scans import Scan, find_scans, load_scan
from tests.unit.dicom_synth import write_multiframe, write_series

hd = pytest.importorskip("highdicom", reason="DICOM-SEG needs highdicom (pip install medseg[dicom])")

NAMES = {0: "background", 1: "left lung", 2: "nodule"}
LABELS = tuple(label.model_copy(update={"code": label_code(label)}) for label in label_table(NAMES))
MODEL = ModelInfo("tiny-lung", LABELS)
FOR_UID = "1.2.826.0.1.3680043.8.498.77"


def dciodvfy_errors(path: Path) -> list[str]:
    """The "Error" lines dciodvfy prints for ``path`` (the check skips when dicom3tools is missing)."""
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy not installed (Debian package dicom3tools)")
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if "Error" in line]


def _pattern(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Labels 0..2 with every class present in most slices; slice 1 left empty (omitted frames)."""
    labels = np.random.default_rng(seed).integers(0, 3, shape).astype(np.uint8)
    labels[:, :, 1] = 0
    return labels


def _scan(root: Path) -> Scan:
    scans = find_scans([root])
    assert len(scans) == 1
    return scans[0]


def _read_back(seg_path: Path, scan: Scan, shape: tuple[int, int, int]) -> np.ndarray:
    """The SEG's label map as a (columns, rows, slices) array, slices ordered by the sources' z position
    (the synthetic series are axial), read by highdicom from the source references alone."""
    seg = hd.seg.segread(seg_path)
    headers = [(pydicom.dcmread(str(p), stop_before_pixels=True), p) for p in scan.series.files]
    if "NumberOfFrames" in headers[0][0]:
        ds = headers[0][0]
        z = [float(f.PlanePositionSequence[0].ImagePositionPatient[2]) for f in ds.PerFrameFunctionalGroupsSequence]
        frames = [int(f) + 1 for f in np.argsort(z)]
        pixels = seg.get_pixels_by_source_frame(ds.SOPInstanceUID, frames, combine_segments=True,
                                                assert_missing_frames_are_empty=True)
    else:
        headers.sort(key=lambda h: float(h[0].ImagePositionPatient[2]))
        pixels = seg.get_pixels_by_source_instance([h[0].SOPInstanceUID for h in headers], combine_segments=True,
                                                   assert_missing_frames_are_empty=True)
    assert pixels.shape == (shape[2], shape[1], shape[0])
    return np.asarray(pixels).transpose(2, 1, 0)


SOURCES = {
    "ascending": lambda d: write_series(d, 5, FrameOfReferenceUID=FOR_UID, StudyDate="20200101"),
    "descending": lambda d: write_series(d, 5, step=(0.0, 0.0, -2.5)),
    "oblique": lambda d: write_series(d, 4, orientation=(0.8, 0.6, 0, -0.6, 0.8, 0), step=(0.0, 0.0, 3.0)),
    "rle": lambda d: write_series(d, 4, transfer_syntax=RLELossless),
    "iso2022_charset": lambda d: write_series(d, 4, SpecificCharacterSet="ISO 2022 IR 100", PatientName="Müller^Jörg"),
    "jpegls": lambda d: write_series(d, 4, transfer_syntax=JPEGLSLossless),
    "multiframe_shuffled": lambda d: write_multiframe(d / "mf.dcm", 5, indices=[3, 0, 4, 2, 1]),
}


@pytest.mark.parametrize("source", list(SOURCES))
def test_seg_is_valid_and_gives_back_exactly_the_mask_on_the_source_grid(tmp_path, source):
    if source == "jpegls":
        pytest.importorskip("jpeg_ls", reason="JPEG-LS encoding needs pyjpegls")
    SOURCES[source](tmp_path / "in" / "series")
    scan = _scan(tmp_path / "in")
    image = load_scan(scan)
    labels = _pattern(image.shape)
    path = tmp_path / f"{scan.case_id}.seg.dcm"
    DicomSegWriter(MODEL).write(scan, image, mask_like(labels, image), path)
    assert dciodvfy_errors(path) == []
    assert np.array_equal(_read_back(path, scan, image.shape), labels)


def test_empty_prediction_gives_a_valid_seg_that_reads_back_empty(tmp_path):
    write_series(tmp_path / "in" / "series", 4)
    scan = _scan(tmp_path / "in")
    image = load_scan(scan)
    path = tmp_path / "empty.seg.dcm"
    DicomSegWriter(MODEL).write(scan, image, mask_like(np.zeros(image.shape, np.uint8), image), path)
    assert dciodvfy_errors(path) == []
    assert not _read_back(path, scan, image.shape).any()


def test_seg_names_segments_codes_them_and_identifies_the_model(tmp_path):
    write_series(tmp_path / "in" / "series", 4, FrameOfReferenceUID=FOR_UID, InstitutionName="Somewhere",
                 StudyDate="20200101", AccessionNumber="ACC1", OtherPatientIDs="OTHER1")
    scan = _scan(tmp_path / "in")
    image = load_scan(scan)
    path = tmp_path / "a.seg.dcm"
    DicomSegWriter(MODEL).write(scan, image, mask_like(_pattern(image.shape), image), path)
    seg = pydicom.dcmread(str(path))
    source = pydicom.dcmread(str(scan.series.files[0]))
    segments = {int(s.SegmentNumber): s for s in seg.SegmentSequence}
    assert sorted(segments) == [1, 2]
    assert segments[1].SegmentLabel == "left lung" and segments[2].SegmentLabel == "nodule"
    lung = segments[1].SegmentedPropertyTypeCodeSequence[0]
    assert (lung.CodingSchemeDesignator, lung.CodeValue, lung.CodeMeaning) == ("SCT", "39607008", "Lung")
    assert segments[2].SegmentedPropertyCategoryCodeSequence[0].CodeMeaning == "Morphologically Abnormal Structure"
    algorithm = segments[1].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "tiny-lung" and algorithm.AlgorithmVersion.startswith("medseg ")
    assert seg.SegmentationType == "BINARY" and seg.Modality == "SEG"
    assert seg.SeriesInstanceUID != source.SeriesInstanceUID and seg.SOPInstanceUID != source.SOPInstanceUID
    assert seg.StudyInstanceUID == source.StudyInstanceUID and seg.FrameOfReferenceUID == FOR_UID
    assert (seg.PatientName, seg.PatientID, seg.StudyDate, seg.AccessionNumber) == (
        source.PatientName, source.PatientID, "20200101", "ACC1")
    raw = path.read_bytes()
    assert b"Somewhere" not in raw and b"OTHER1" not in raw  # only the required patient/study attributes travel
    referenced = {item.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {pydicom.dcmread(str(p)).SOPInstanceUID for p in scan.series.files}


def test_series_planes_follow_the_volume_slices(tmp_path):
    files = write_series(tmp_path / "s", 5, step=(0.0, 0.0, -2.5))
    planes = series_planes(tmp_path / "s")
    assert [p.path for p in planes] == files[::-1]  # descending files: the volume starts at the last one
    volume = np.asarray(load_scan(tmp_path / "s").dataobj)
    for k, plane in enumerate(planes):  # slice k's pixels encode the index of the file they came from
        assert volume[0, 0, k] == 100 * files.index(plane.path) - 1024


def test_a_mask_off_the_source_grid_or_a_nifti_scan_gets_no_seg(tmp_path):
    write_series(tmp_path / "in" / "series", 4)
    scan = _scan(tmp_path / "in")
    image = load_scan(scan)
    affine = image.affine.copy()
    affine[2, 3] += 1.0  # 1 mm off slices 2.5 mm apart
    moved = nib.Nifti1Image(np.zeros(image.shape, np.uint8), affine)
    with pytest.raises(DicomSeriesError, match="lies on no source image"):
        DicomSegWriter(MODEL).write(scan, image, moved, tmp_path / "x.seg.dcm")
    nifti_scan = Scan("n", tmp_path / "n.nii.gz", "nifti")
    with pytest.raises(OutputError, match="needs a DICOM series"):
        DicomSegWriter(MODEL).write(nifti_scan, image, mask_like(np.zeros(image.shape, np.uint8), image),
                                    tmp_path / "y.seg.dcm")
    assert not list(tmp_path.glob("*.seg.dcm"))


# --- sidecars -----------------------------------------------------------------------------------

ITKSNAP_LINE = re.compile(r'^\s*(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+([0-9.]+)\s+([01])\s+([01])\s+"([^"]*)"\s*$')


def test_itksnap_label_file_lists_every_class_with_its_colour_and_name():
    rows = [ITKSNAP_LINE.match(line) for line in itksnap_label_text(LABELS).splitlines() if not line.startswith("#")]
    assert all(rows)
    parsed = {int(m[1]): (tuple(int(m[i]) for i in (2, 3, 4)), float(m[5]), m[8]) for m in rows}
    assert parsed == {label.value: (label.color, 0.0 if label.value == 0 else 1.0, label.name) for label in LABELS}


def test_slicer_color_table_lists_every_class_without_spaces_in_names():
    text = slicer_color_table_text(LABELS, "case.ctbl")
    assert text.startswith("# Color table file case.ctbl\n# 3 values\n")
    rows = [line.split() for line in text.splitlines() if not line.startswith("#")]
    assert [row[:2] for row in rows] == [["0", "background"], ["1", "left_lung"], ["2", "nodule"]]
    assert [tuple(map(int, row[2:5])) for row in rows] == [label.color for label in LABELS]
    assert [row[5] for row in rows] == ["0", "255", "255"]


# --- label codes ----------------------------------------------------------------------------------

def test_known_codes_are_those_of_the_dicom_code_dictionary():
    from pydicom.sr.codedict import codes

    for code in {c.type for c in KNOWN_CODES.values()} | {c.category for c in KNOWN_CODES.values()}:
        entry = getattr(codes.SCT, "".join(w.capitalize() for w in code.meaning.split()))
        assert (entry.value, entry.scheme_designator) == (code.value, code.scheme), code


def test_default_code_follows_the_name_and_a_manifest_code_wins(tmp_path):
    import json

    from medseg.data.manifest import load_manifest
    from medseg.models.bundle import ModelBundle
    from tests.conftest import tiny_config

    assert default_label_code("Lesions").type.meaning == "Lesion"
    assert default_label_code("right lung").type.meaning == "Lung"
    assert default_label_code("anterior").type.meaning == "Tissue"
    hippocampus = {"category": {"scheme": "SCT", "value": "91723000", "meaning": "Anatomical Structure"},
                   "type": {"scheme": "SCT", "value": "5366008", "meaning": "Hippocampus"}}
    raw = {"name": "m", "labels": {"0": "background", "1": "anterior"}, "label_codes": {"1": hippocampus}, "cases": []}
    (tmp_path / "m.json").write_text(json.dumps(raw))
    manifest = load_manifest(tmp_path / "m.json")
    bundle = ModelBundle.from_config(tiny_config(tmp_path / "m.json", tmp_path), manifest.labels, 1,
                                     label_codes=manifest.label_codes)
    assert label_code(bundle.spec.labels[1]) == LabelCode.model_validate(hippocampus)
    raw["label_codes"] = {"5": hippocampus}
    (tmp_path / "m.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match="label_codes name values that are not labels"):
        load_manifest(tmp_path / "m.json")


# --- the runner's --output-format --------------------------------------------------------------------

class _FixedPredictor:
    """Stands in for a model: a bundle with the label table, and a fixed label pattern as prediction."""

    def __init__(self, tmp_path: Path):
        from medseg.models.bundle import ModelBundle
        from tests.conftest import tiny_config

        self.bundle = ModelBundle.from_config(tiny_config(tmp_path / "none.json", tmp_path), NAMES, 1)

    def predict_image(self, image, **kwargs):
        return mask_like(_pattern(image.shape), image)


@pytest.mark.parametrize(("output_format", "expected"), [
    ("auto", ["a.ctbl", "a.itksnap.txt", "a.nii.gz", "a.seg.dcm"]),
    ("nifti", ["a.ctbl", "a.itksnap.txt", "a.nii.gz"]),
    ("dicom-seg", ["a.seg.dcm"]),
])
def test_output_format_chooses_the_files_and_the_last_one_marks_the_scan_done(tmp_path, output_format, expected):
    write_series(tmp_path / "a", 4)
    out = tmp_path / "out"
    summary = predict_paths(None, [tmp_path / "a"], out, predictor=_FixedPredictor(tmp_path),
                            output_format=output_format, statistics=False)
    assert sorted(p.name for p in out.iterdir()) == expected
    assert summary.written == [out / ("a.seg.dcm" if output_format == "dicom-seg" else "a.nii.gz")]
    again = predict_paths(None, [tmp_path / "a"], out, predictor=_FixedPredictor(tmp_path), output_format=output_format,
                          statistics=False)
    assert again.skipped == summary.written and not again.written


def test_dicom_seg_for_nifti_inputs_is_refused_before_any_work(tmp_path):
    write_series(tmp_path / "a", 4)
    image = load_scan(tmp_path / "a")
    nib.save(image, tmp_path / "b.nii.gz")
    with pytest.raises(OutputError, match="needs DICOM series as input"):
        predict_paths(None, [tmp_path / "a", tmp_path / "b.nii.gz"], tmp_path / "out",
                      predictor=_FixedPredictor(tmp_path), output_format="both")
    assert not (tmp_path / "out").exists()
    assert formats_for("auto", "nifti") == ("nifti",) and formats_for("auto", "dicom") == ("dicom-seg", "nifti")
    assert formats_for("both", "dicom") == ("dicom-seg", "nifti")


def test_seg_encode_handles_a_fresh_series_uid_each_time(tmp_path):
    write_series(tmp_path / "in" / "series", 4, series_uid=generate_uid())
    scan = _scan(tmp_path / "in")
    image = load_scan(scan)
    mask = mask_like(_pattern(image.shape), image)
    first, second = (DicomSegWriter(MODEL).build(scan, mask) for _ in range(2))
    assert first.SeriesInstanceUID != second.SeriesInstanceUID and first.SOPInstanceUID != second.SOPInstanceUID
    assert first.FrameOfReferenceUID == second.FrameOfReferenceUID  # derived from the series, the same every time
