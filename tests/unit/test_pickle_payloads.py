"""A model file is untrusted input: a pickle payload that would create a file when unpickled is refused by
every loader — ``medseg predict --model``, ``read_bundle_spec``, ``train.init_from``, ``--resume``,
``medseg export`` and ``medseg serve``'s model load — and the file is never created.

The payload is checked to be live first (``torch.load(weights_only=False)`` does create the file), so these
tests fail the day a loader unpickles arbitrary objects.
"""

from __future__ import annotations

import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medseg.cli import main
from medseg.errors import CheckpointError
from medseg.models.bundle import BUNDLE_FORMAT, read_bundle_spec
from medseg.training.trainer import train
from tests.conftest import TINY_SPEC, tiny_config


class _Payload:
    """Unpickling this runs ``exec`` of code that writes ``sentinel`` (a classic pickle attack)."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return exec, (f"open({str(self.sentinel)!r}, 'w').write('pwned')",)


def _evil_bundle(path: Path, sentinel: Path, legacy_format: bool = False) -> Path:
    """A file shaped like a bundle (format tag, weights) whose spec entry is the payload."""
    entries = {"format": BUNDLE_FORMAT, "model_state": {"w": torch.zeros(1)}, "bundle": _Payload(sentinel)}
    path.parent.mkdir(parents=True, exist_ok=True)
    # torch's pre-1.6 (non-zip) format is one torch.load still reads: both must be refused
    torch.save(entries, path, _use_new_zipfile_serialization=not legacy_format)
    return path


@pytest.fixture(params=["zip", "legacy"])
def evil(request, tmp_path) -> tuple[Path, Path]:
    """(run folder whose best.pt and last.pt carry the payload, sentinel path that must stay absent)."""
    sentinel = tmp_path / "sentinel"
    run = tmp_path / "evil_run"
    for name in ("best.pt", "last.pt"):
        _evil_bundle(run / name, sentinel, legacy_format=request.param == "legacy")
    return run, sentinel


def test_the_payload_is_live(evil):
    run, sentinel = evil
    torch.load(run / "best.pt", weights_only=False)  # what an unsafe loader would do
    assert sentinel.read_text() == "pwned"


def test_read_bundle_spec_refuses_it(evil):
    run, sentinel = evil
    for model in (run, run / "best.pt"):
        with pytest.raises(CheckpointError, match="not a readable medseg model"):
            read_bundle_spec(model)
    assert not sentinel.exists()


def test_predict_refuses_it(evil, tmp_path, capsys):
    run, sentinel = evil
    inputs = tmp_path / "in"
    inputs.mkdir()
    image = np.zeros(TINY_SPEC.shape, np.float32)
    nib.save(nib.Nifti1Image(image, np.eye(4)), inputs / "scan.nii.gz")
    for model in (run, run / "best.pt"):
        code = main(["predict", "--model", str(model), "--input", str(inputs), "--output", str(tmp_path / "out"),
                     "--device", "cpu"])
        assert code != 0
        assert "not a readable medseg model" in capsys.readouterr().err
    assert not sentinel.exists()
    assert not any((tmp_path / "out").glob("*.nii.gz"))


def test_export_refuses_it(evil, tmp_path, capsys):
    run, sentinel = evil
    for fmt in ("onnx", "torchscript"):
        assert main(["export", str(run), "--format", fmt]) != 0
        assert "not a readable medseg model" in capsys.readouterr().err
    assert not sentinel.exists()
    assert not (run / "export").exists()


def test_training_refuses_it_as_init_from_and_as_the_checkpoint_to_resume(evil, phantom_manifest, tmp_path):
    run, sentinel = evil
    with pytest.raises(CheckpointError, match="not a readable medseg model"):
        train(tiny_config(phantom_manifest, tmp_path / "fresh", epochs=1, init_from=str(run / "best.pt")), device="cpu")
    with pytest.raises(CheckpointError, match="not a readable medseg model"):
        train(tiny_config(phantom_manifest, run, epochs=1), resume=True, device="cpu")
    assert not sentinel.exists()


def test_serve_refuses_it_and_is_not_ready(evil, tmp_path):
    pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")
    from fastapi.testclient import TestClient

    from medseg.serving.app import ServeSettings, create_app
    from medseg.serving.auth import TokenSet

    run, sentinel = evil
    settings = ServeSettings(model=run, data_dir=tmp_path / "serve", tokens=TokenSet(["t" * 32]), device="cpu",
                             poll_s=0.05, rate_per_minute=0)
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 60  # the model loads in the background: poll until it has failed
        while True:
            ready = client.get("/readyz")
            if "failed to load" in ready.text or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert ready.status_code == 503 and "failed to load" in ready.json()["error"]
    assert not sentinel.exists()
