"""Real MR scans through the multi-channel path: hippocampus cases (../shared/data) as a two-channel nnU-Net
data set (channel 0 the scan, channel 1 a contrast-inverted copy on the same grid), imported, trained
briefly, and predicted from channel files; a channel cropped off the grid is refused."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.cli import main
from medseg.config import config_from_dict
from medseg.data.manifest import load_manifest
from medseg.errors import ScanError
from medseg.inference.runner import predict_paths
from medseg.io.scans import load_channels
from tests.conftest import link_file

CASES = ["hippocampus_001", "hippocampus_003", "hippocampus_004", "hippocampus_006"]
TEST_CASE = "hippocampus_008"


@pytest.fixture
def hippocampus(shared_data: Path) -> Path:
    folder = shared_data / "hippocampus"
    if not all((folder / sub / f"{c}.nii.gz").is_file() for c in [*CASES, TEST_CASE] for sub in ("images", "labels")):
        pytest.skip(f"hippocampus cases {CASES + [TEST_CASE]} not found in {folder}")
    return folder


def _second_channel(source: Path, target: Path) -> None:
    """A contrast-inverted copy of a real scan on exactly its grid (header geometry kept)."""
    img = nib.load(str(source))
    data = np.asarray(img.dataobj, dtype=np.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data.max() - data, img.affine, img.header), str(target))


def test_real_two_channel_cases_import_train_and_predict(hippocampus, tmp_path):
    data = tmp_path / "Dataset904_HippocampusTwoChannel"
    for case in CASES:
        link_file(data / "imagesTr" / f"{case}_0000.nii.gz", hippocampus / "images" / f"{case}.nii.gz")
        _second_channel(hippocampus / "images" / f"{case}.nii.gz", data / "imagesTr" / f"{case}_0001.nii.gz")
        link_file(data / "labelsTr" / f"{case}.nii.gz", hippocampus / "labels" / f"{case}.nii.gz")
    link_file(data / "imagesTs" / f"{TEST_CASE}_0000.nii.gz", hippocampus / "images" / f"{TEST_CASE}.nii.gz")
    _second_channel(hippocampus / "images" / f"{TEST_CASE}.nii.gz", data / "imagesTs" / f"{TEST_CASE}_0001.nii.gz")
    (data / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T2", "1": "T2_inverted"}, "labels": {"background": 0, "Anterior": 1, "Posterior": 2},
        "numTraining": len(CASES), "file_ending": ".nii.gz"}))
    manifest_path = tmp_path / "two.json"
    assert main(["import", "nnunet", str(data), "--output", str(manifest_path), "--folds", "0"]) == 0
    manifest = load_manifest(manifest_path)
    assert manifest.channels == ["T2", "T2_inverted"] and manifest.modality == "MR"

    from medseg.training.trainer import train

    run = tmp_path / "run"
    config = config_from_dict({
        "name": "hippo2ch", "seed": 0, "data": {"manifest": str(manifest_path)},
        "model": {"name": "unet", "spatial_dims": 3, "channels": [8, 16, 32], "num_res_units": 1},
        "preprocessing": {"spacing": [1.0, 1.0, 1.0], "intensity": {"kind": "zscore"}},
        "optim": {"lr": 0.01, "schedule": "constant"},
        "train": {"epochs": 2, "iterations_per_epoch": 4, "patch_size": [32, 32, 32], "batch_size": 2,
                  "samples_per_volume": 1, "output_dir": str(run), "choose_postprocessing": False},
        "infer": {"sw_batch_size": 2, "overlap": 0.25},
    }, source="two-channel hippocampus test config")
    train(config, device="cpu")

    # Channel files given one by one, as `medseg predict --input A_0000.nii.gz A_0001.nii.gz` would.
    files = [data / "imagesTs" / f"{TEST_CASE}_0001.nii.gz", data / "imagesTs" / f"{TEST_CASE}_0000.nii.gz"]
    summary = predict_paths(run, files, tmp_path / "pred", device="cpu")
    assert not summary.failed and [p.name for p in summary.written] == [f"{TEST_CASE}.nii.gz"]
    mask = nib.load(str(summary.written[0]))
    scan = nib.load(str(hippocampus / "images" / f"{TEST_CASE}.nii.gz"))
    assert mask.shape == scan.shape and np.allclose(mask.affine, scan.affine)
    assert set(np.unique(np.asarray(mask.dataobj)).tolist()) <= {0, 1, 2}


def test_a_real_channel_cropped_off_the_grid_is_refused(hippocampus, tmp_path):
    source = hippocampus / "images" / f"{CASES[0]}.nii.gz"
    img = nib.load(str(source))
    cropped = tmp_path / "cropped.nii.gz"
    nib.save(img.slicer[:, :, 1:], str(cropped))  # one slice fewer, origin moved: another grid
    with pytest.raises(ScanError, match=r"cropped\.nii\.gz.*differs from .*hippocampus_001\.nii\.gz's"):
        load_channels([source, cropped])
