"""``medseg export`` and ``medseg predict --backend``: an export is written only when it matches the eager
network, each backend then segments like torch, and an export that is not the model's is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medseg.cli import main
from medseg.data.manifest import load_manifest
from medseg.deploy.export import export_model, mask_agreement
from medseg.errors import CheckpointError, ExportError
from medseg.inference.backends import sidecar_path
from medseg.inference.runner import predict_paths
from medseg.models import build_model
from medseg.models.bundle import ModelBundle, load_bundle, weights_sha256
from tests.conftest import tiny_config


def _run(manifest: Path, folder: Path, seed: int) -> Path:
    """A run folder holding a tiny 3D U-Net bundle with seeded random weights (no training: fast)."""
    config = tiny_config(manifest, folder)
    torch.manual_seed(seed)
    bundle = ModelBundle.from_config(config, load_manifest(manifest).labels, in_channels=1)
    bundle.with_weights(build_model(config.model, 1, 3).state_dict()).save(folder / "best.pt")
    return folder


@pytest.fixture(scope="module")
def run(phantom_manifest, tmp_path_factory) -> Path:
    return _run(phantom_manifest, tmp_path_factory.mktemp("export") / "run", seed=0)


@pytest.fixture(scope="module")
def scans(phantom_manifest) -> Path:
    return phantom_manifest.parent / "images"


@pytest.fixture(scope="module")
def onnx_export(run) -> Path:
    pytest.importorskip("onnxscript", reason="ONNX export needs onnxscript (medseg[export])")
    pytest.importorskip("onnxruntime", reason="the export's parity check needs onnxruntime (medseg[export])")
    assert main(["export", str(run), "--format", "onnx"]) == 0
    return run / "exports" / "model.onnx"


def _masks(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(nib.load(p).dataobj) for p in sorted(folder.glob("*.nii.gz"))}


@pytest.fixture(scope="module")
def torch_masks(run, scans, tmp_path_factory) -> dict[str, np.ndarray]:
    out = tmp_path_factory.mktemp("pred_torch")
    predict_paths(run, [scans], out, device="cpu")
    masks = _masks(out)
    assert len(masks) == 6
    assert all(len(np.unique(m)) > 1 for m in masks.values()), "a one-class mask would make agreement trivial"
    return masks


def _agreement(masks: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    assert masks.keys() == reference.keys()
    names = {0: "background", 1: "lung", 2: "nodule"}
    return min(min(mask_agreement(masks[k], reference[k], names).values()) for k in reference)


def test_onnx_export_records_its_parity_and_provenance(run, onnx_export):
    side = json.loads(sidecar_path(onnx_export).read_text())
    assert side["format"] == "onnx" and side["precision"] == "float32" and side["opset"] >= 17
    assert side["weights_sha256"] == weights_sha256(load_bundle(run).weights)
    assert side["roi_size"] == [32, 32, 16]
    runtimes = {p["runtime"]: p for p in side["parity"]}
    assert "onnxruntime" in runtimes
    for parity in runtimes.values():
        assert parity["passed"] and parity["max_abs_logit_diff"] <= 1e-3 and min(parity["dice"].values()) >= 0.99


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_predict_with_an_onnx_backend_gives_the_torch_masks(run, scans, onnx_export, torch_masks, backend, tmp_path):
    pytest.importorskip(backend, reason=f"backend {backend} needs the {backend} package (medseg[export])")
    out = tmp_path / backend
    assert main(["predict", "--model", str(run), "--input", str(scans), "--output", str(out), "--device", "cpu",
                 "--backend", backend]) == 0
    assert _agreement(_masks(out), torch_masks) >= 0.99


def test_torchscript_export_predicts_like_torch(run, scans, torch_masks, tmp_path):
    result = export_model(run, "torchscript", output=tmp_path / "model.pt")
    assert result.parity and result.parity[0].max_abs_logit_diff <= 1e-3
    summary = predict_paths(run, [scans], tmp_path / "out", device="cpu", backend="torchscript",
                            model_file=result.path)
    assert not summary.failed
    assert _agreement(_masks(tmp_path / "out"), torch_masks) >= 0.99


def test_an_export_that_differs_from_eager_is_refused_and_nothing_is_written(run, tmp_path, monkeypatch):
    import medseg.deploy.export as export

    real = export._export_torchscript

    def drifted(network, example, path):  # an exporter that loses precision in the last layer
        network = export.MainOutput(load_bundle(run).build_network())
        with torch.no_grad():
            last = [p for p in network.parameters() if p.ndim == 1][-1]
            last += 0.5
        real(network, example, path)

    monkeypatch.setattr(export, "_export_torchscript", drifted)
    target = tmp_path / "exports" / "model.pt"
    with pytest.raises(ExportError, match="differs from the eager model"):
        export_model(run, "torchscript", output=target)
    assert not target.parent.exists() or not any(target.parent.iterdir()), "a refused export left files behind"


def test_a_tampered_export_is_refused(run, scans, onnx_export, tmp_path):
    pytest.importorskip("onnxruntime")
    copy = tmp_path / "model.onnx"
    shutil.copy(onnx_export, copy)
    shutil.copy(sidecar_path(onnx_export), sidecar_path(copy))
    data = bytearray(copy.read_bytes())
    data[-100] ^= 0xFF  # one byte of the weights
    copy.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256 differs"):
        predict_paths(run, [scans], tmp_path / "out", device="cpu", backend="onnxruntime", model_file=copy)


def test_an_export_of_other_weights_is_refused(run, phantom_manifest, onnx_export, scans, tmp_path):
    pytest.importorskip("onnxruntime")
    other = _run(phantom_manifest, tmp_path / "other", seed=1)
    shutil.copytree(onnx_export.parent, other / "exports")
    assert main(["predict", "--model", str(other), "--input", str(scans), "--output", str(tmp_path / "out"),
                 "--backend", "onnxruntime"]) == 2
    with pytest.raises(CheckpointError, match="exported from other weights"):
        predict_paths(other, [scans], tmp_path / "out", device="cpu", backend="onnxruntime")


def test_a_backend_without_an_export_says_how_to_make_one(phantom_manifest, scans, tmp_path):
    bare = _run(phantom_manifest, tmp_path / "bare", seed=2)
    with pytest.raises(CheckpointError, match="medseg export"):
        predict_paths(bare, [scans], tmp_path / "out", device="cpu", backend="onnxruntime")


def test_int8_quantization_gives_a_working_model(run, scans, torch_masks, tmp_path):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    target = tmp_path / "model.int8.onnx"
    # A random-weight network has small logit margins, so int8 flips more voxels than a trained one would.
    result = export_model(run, "onnx", output=target, int8=True, calibration_patches=4, min_dice=0.9)
    side = json.loads(sidecar_path(target).read_text())
    assert side["precision"] == "int8" and side["int8_calibration_patches"] == 4
    import onnx

    ops = {node.op_type for node in onnx.load(str(target)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops, "no quantized operators in the int8 model"
    assert all(p.passed for p in result.parity)
    predict_paths(run, [scans], tmp_path / "out", device="cpu", backend="onnxruntime", model_file=target)
    assert _agreement(_masks(tmp_path / "out"), torch_masks) >= 0.9
