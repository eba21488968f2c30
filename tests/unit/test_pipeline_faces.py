"""One per-scan pipeline for every face: the service takes multi-channel uploads and refuses scans over the
memory limit exactly as ``medseg predict`` does, its report is predict's, one output format failing costs no
other, and a format added to the registry shows up in the CLI's choices, in predict and in the service."""

from __future__ import annotations

import csv
import io
import json
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the service needs the serve extra (pip install medseg[serve])")

from fastapi.testclient import TestClient  # noqa: E402

from medseg.cli import build_parser, main  # noqa: E402
from medseg.data.phantom import make_phantom  # noqa: E402
from medseg.io.mask_writers import MaskWriter  # noqa: E402
from medseg.io.output_formats import OutputFormat, register_output_format, unregister_output_format  # noqa: E402
from medseg.serving.app import ServeSettings, create_app  # noqa: E402
from medseg.serving.auth import TokenSet  # noqa: E402
from tests.conftest import TINY_SPEC, tiny_config  # noqa: E402
from tests.unit.dicom_synth import write_series  # noqa: E402
from tests.unit.test_serving import TOKEN, _auth, _same_mask  # noqa: E402
from tests.unit.test_serving import _wait as wait_for_job  # noqa: E402

NAMES = {0: "background", 1: "lung", 2: "nodule"}


def _bundle(run: Path, in_channels: int) -> Path:
    """An untrained tiny 3D U-Net bundle taking ``in_channels`` channels (deterministic: equality is all we need)."""
    import torch

    from medseg.models import build_model
    from medseg.models.bundle import ModelBundle

    config = tiny_config(run.parent / "unused.json", run)
    torch.manual_seed(0)
    ModelBundle.from_config(config, NAMES, in_channels=in_channels).with_weights(
        build_model(config.model, in_channels, 3).state_dict()).save(run / "best.pt")
    return run


@pytest.fixture(scope="module")
def one_channel_run(tmp_path_factory) -> Path:
    return _bundle(tmp_path_factory.mktemp("one") / "run", 1)


@pytest.fixture(scope="module")
def two_channel_run(tmp_path_factory) -> Path:
    return _bundle(tmp_path_factory.mktemp("two") / "run", 2)


def _phantom(path: Path, seed: int, scale: float = 1.0) -> Path:
    """A phantom CT on an LPS grid (qform and sform), so a geometry slip would show."""
    image, _, affine, _ = make_phantom(np.random.default_rng(seed), TINY_SPEC)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    img = nib.Nifti1Image((image * scale).astype(np.float32), lps)
    img.set_qform(lps, code=1)
    img.set_sform(lps, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)
    return path


def _client(run: Path, data_dir: Path, **overrides) -> TestClient:
    settings = ServeSettings(model=run, data_dir=data_dir, tokens=TokenSet([TOKEN]), device="cpu", poll_s=0.05,
                             max_upload_bytes=16 * 1024 * 1024, rate_per_minute=0, **overrides)
    return TestClient(create_app(settings))


def _wait(client: TestClient, job_id: str) -> dict:
    return wait_for_job(client, job_id, timeout=120.0)  # whole-scan jobs on an untrained model: 2 CPU cores


def test_service_takes_a_two_channel_case_as_parts_or_zip_and_gives_predicts_mask(two_channel_run, tmp_path):
    from medseg.inference.runner import predict_paths

    case = tmp_path / "case"
    files = [_phantom(case / "pt_0000.nii.gz", 7), _phantom(case / "pt_0001.nii.gz", 7, scale=0.5)]
    summary = predict_paths(two_channel_run, [case], tmp_path / "predicted", device="cpu")
    assert not summary.failed and [p.name for p in summary.written] == ["pt.nii.gz"]
    reference = tmp_path / "predicted" / "pt.nii.gz"
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:  # in the archive out of order: the numbers give the channels
        zf.write(files[1], "upload/pt_0001.nii.gz")
        zf.write(files[0], "upload/pt_0000.nii.gz")
    with _client(two_channel_run, tmp_path / "data") as client:
        parts = [("scan", ("a.bin", files[0].read_bytes())), ("scan", ("b.bin", files[1].read_bytes()))]
        for upload in (parts, [("scan", ("case.zip", archive.getvalue()))]):
            r = client.post("/v1/segmentations", files=upload, headers=_auth())
            assert r.status_code == 202, r.text
            job = r.json()["job_id"]
            assert _wait(client, job)["status"] == "done"
            mask = client.get(f"/v1/jobs/{job}/mask", headers=_auth())
            assert mask.status_code == 200
            _same_mask(mask.content, reference, tmp_path)
        # Channels in the wrong count are refused at once, naming what the model takes.
        r = client.post("/v1/segmentations", files=parts[:1], headers=_auth())
        assert r.status_code == 400 and "takes 2 input channel(s)" in r.json()["error"]
        swapped = [("scan", ("a.bin", files[1].read_bytes())), ("scan", ("b.bin", files[0].read_bytes()))]
        r = client.post("/v1/segmentations", files=swapped, headers=_auth())
        assert r.status_code == 202
        state = _wait(client, r.json()["job_id"])
        got = client.get(f"/v1/jobs/{state['job_id']}/mask", headers=_auth())
        swapped_mask = np.asarray(nib.load(_save(got.content, tmp_path / "swapped.nii.gz")).dataobj)
        assert not np.array_equal(swapped_mask, np.asarray(nib.load(reference).dataobj))  # order matters


def _save(content: bytes, path: Path) -> Path:
    path.write_bytes(content)
    return path


def test_service_refuses_a_scan_over_the_memory_limit_with_predicts_message(one_channel_run, tmp_path, monkeypatch):
    from medseg.inference.runner import predict_paths

    scan = _phantom(tmp_path / "in" / "big.nii.gz", 3)
    monkeypatch.setenv("MEDSEG_MAX_MEMORY_GIB", "0.001")  # less than the loaded model already uses
    summary = predict_paths(one_channel_run, [scan], tmp_path / "predicted", device="cpu")
    assert [f.error for f in summary.failed] == ["ScanTooLargeError"]
    predict_message = summary.failed[0].message
    assert predict_message.startswith(f"{scan}: scan of shape ")
    with _client(one_channel_run, tmp_path / "data") as client:
        r = client.post("/v1/segmentations", files={"scan": ("x", scan.read_bytes())}, headers=_auth())
        assert r.status_code == 202
        state = _wait(client, r.json()["job_id"])
    assert state["status"] == "failed" and state["error"]["class"] == "ScanTooLargeError", state
    served = state["error"]["message"]
    # The same refusal, up to the scan's name (the service never shows its storage paths) and the bytes left.
    assert served.startswith("scan.nii.gz: scan of shape ")
    assert served.split(" GiB left under ")[-1] == predict_message.split(" GiB left under ")[-1]
    assert served.split("more than")[0].split(":", 1)[1] == predict_message.split("more than")[0].split(":", 1)[1]
    assert str(tmp_path) not in served


def test_predict_report_and_the_service_report_are_one_report(one_channel_run, tmp_path, capsys):
    scan = _phantom(tmp_path / "in" / "case.nii.gz", 5)
    assert main(["predict", "--model", str(one_channel_run), "--input", str(scan), "--output", str(tmp_path / "out"),
                 "--device", "cpu", "--report"]) == 0
    predicted = json.loads((tmp_path / "out" / "case.report.json").read_text())
    # The model config names no lesion classes: both faces take every foreground class.
    assert set(predicted["lesion_inventory"]["classes"]) == {"lung", "nodule"}
    with _client(one_channel_run, tmp_path / "data") as client:
        r = client.post("/v1/segmentations", files={"scan": ("x", scan.read_bytes())}, headers=_auth())
        job = r.json()["job_id"]
        assert _wait(client, job)["status"] == "done"
        served = client.get(f"/v1/jobs/{job}/report", headers=_auth()).json()
    assert served == predicted


class _FailingSegWriter(MaskWriter):
    suffix = ".seg.dcm"

    def __init__(self, model):
        self.model = model

    def write(self, scan, image, mask, path):
        raise KeyError("")  # what highdicom raised on an anonymised series before medseg read the file meta


def test_a_failing_seg_costs_neither_the_nifti_mask_nor_its_sidecars(one_channel_run, tmp_path, monkeypatch):
    from medseg.io import output_formats

    series = tmp_path / "in" / "series"
    write_series(series, count=6, step=(0.0, 0.0, 3.0))
    entry = output_formats.output_format("dicom-seg")
    monkeypatch.setitem(output_formats._REGISTRY, "dicom-seg",
                        OutputFormat(**{**entry.__dict__, "writers": lambda model: [_FailingSegWriter(model)]}))
    out = tmp_path / "out"
    code = main(["predict", "--model", str(one_channel_run), "--input", str(series), "--output", str(out),
                 "--device", "cpu"])
    assert code == 1  # a format failed: the run says so
    assert sorted(p.name for p in out.iterdir()) == ["failures.csv", "series.ctbl", "series.itksnap.txt",
                                                     "series.nii.gz", "statistics.csv", "statistics.json"]
    with (out / "failures.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["mask"], r["format"], r["error"]) for r in rows] == [("series.seg.dcm", "dicom-seg", "KeyError")]
    # Fixed and rerun: the SEG is written and its row leaves the failure record.
    monkeypatch.setitem(output_formats._REGISTRY, "dicom-seg", entry)
    assert main(["predict", "--model", str(one_channel_run), "--input", str(series), "--output", str(out),
                 "--device", "cpu", "--overwrite"]) == 0
    assert (out / "series.seg.dcm").is_file() and not (out / "failures.csv").exists()


class _VoxelCountWriter(MaskWriter):
    """A throwaway format: the foreground voxel count as text."""

    suffix = ".count.txt"

    def write(self, scan, image, mask, path):
        path.write_text(f"{int(np.count_nonzero(np.asarray(mask.dataobj)))}\n")


@pytest.fixture
def count_format():
    register_output_format(OutputFormat("voxel-count", lambda model: [_VoxelCountWriter()], (".count.txt",),
                                        "foreground voxel count (test)", route="count", media_type="text/plain"))
    yield
    unregister_output_format("voxel-count")


def test_a_registered_format_reaches_the_cli_predict_and_the_service(count_format, one_channel_run, tmp_path, capsys):
    parser = build_parser()
    predict = parser.parse_args(["predict", "--model", "m", "--input", "x", "--output", "o",
                                 "--output-format", "nifti,voxel-count"])
    assert predict.output_format == "nifti,voxel-count"
    with pytest.raises(SystemExit):
        parser.parse_args(["predict", "--model", "m", "--input", "x", "--output", "o", "--output-format", "nope"])
    assert "unknown output format 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    assert "voxel-count: foreground voxel count (test)" in " ".join(capsys.readouterr().out.split())

    scan = _phantom(tmp_path / "in" / "case.nii.gz", 9)
    out = tmp_path / "out"
    assert main(["predict", "--model", str(one_channel_run), "--input", str(scan), "--output", str(out),
                 "--device", "cpu", "--output-format", "nifti,voxel-count"]) == 0
    count = (out / "case.count.txt").read_text()
    assert int(count) == int(np.count_nonzero(np.asarray(nib.load(out / "case.nii.gz").dataobj)))
    with _client(one_channel_run, tmp_path / "data") as client:  # the service's default: every format
        r = client.post("/v1/segmentations", files={"scan": ("x", scan.read_bytes())}, headers=_auth())
        assert r.json()["links"]["count"] == f"/v1/jobs/{r.json()['job_id']}/count"
        job = r.json()["job_id"]
        assert _wait(client, job)["status"] == "done"
        got = client.get(f"/v1/jobs/{job}/count", headers=_auth())
    assert got.status_code == 200 and got.text == count


def test_service_serves_predicts_rtstruct_for_a_dicom_upload(one_channel_run, tmp_path):
    import pydicom

    from medseg.inference.runner import predict_paths

    series = tmp_path / "in" / "series"
    write_series(series, count=6, step=(0.0, 0.0, 3.0))
    summary = predict_paths(one_channel_run, [series], tmp_path / "predicted", device="cpu", output_format="all")
    assert not summary.failed
    want = pydicom.dcmread(tmp_path / "predicted" / "series.rtstruct.dcm")
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(series.iterdir()):
            zf.write(f, f"upload/{f.name}")
    with _client(one_channel_run, tmp_path / "data") as client:
        r = client.post("/v1/segmentations", files={"scan": ("s.zip", archive.getvalue())}, headers=_auth())
        job = r.json()["job_id"]
        assert r.json()["links"]["rtstruct"] == f"/v1/jobs/{job}/rtstruct"
        assert _wait(client, job)["status"] == "done"
        got = client.get(f"/v1/jobs/{job}/rtstruct", headers=_auth())
    assert got.status_code == 200 and got.headers["content-type"] == "application/dicom"
    served = pydicom.dcmread(io.BytesIO(got.content))
    assert served.SOPClassUID == want.SOPClassUID == "1.2.840.10008.5.1.4.1.1.481.3"
    assert [r.ROIName for r in served.StructureSetROISequence] == [r.ROIName for r in want.StructureSetROISequence]

    def contours(ds):
        return [[(c.ContourImageSequence[0].ReferencedSOPInstanceUID, list(c.ContourData))
                 for c in getattr(roi, "ContourSequence", [])] for roi in ds.ROIContourSequence]

    assert contours(served) == contours(want)
