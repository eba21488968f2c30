"""`medseg import` on real MSD Task04 hippocampus cases (../shared/data), laid out as a Decathlon task and as
an nnU-Net v2 raw data set with symlinks: the manifests load and their cases are the real files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medseg.cli import main
from medseg.data.manifest import load_manifest
from tests.conftest import link_file

CASES = ["hippocampus_001", "hippocampus_003", "hippocampus_004", "hippocampus_006"]
UNLABELLED = "hippocampus_008"  # stands in for a test image of the task


@pytest.fixture
def hippocampus(shared_data: Path) -> Path:
    folder = shared_data / "hippocampus"
    if not all((folder / "images" / f"{c}.nii.gz").is_file() for c in [*CASES, UNLABELLED]):
        pytest.skip(f"hippocampus cases {CASES} not found in {folder}")
    return folder


def test_msd_layout_of_real_cases_imports_to_a_manifest_of_the_real_files(hippocampus, tmp_path):
    task = tmp_path / "Task04_Hippocampus"
    for case in CASES:
        link_file(task / "imagesTr" / f"{case}.nii.gz", hippocampus / "images" / f"{case}.nii.gz")
        link_file(task / "labelsTr" / f"{case}.nii.gz", hippocampus / "labels" / f"{case}.nii.gz")
    link_file(task / "imagesTs" / f"{UNLABELLED}.nii.gz", hippocampus / "images" / f"{UNLABELLED}.nii.gz")
    (task / "imagesTr" / "._hippocampus_001.nii.gz").write_bytes(b"\x00\x05\x16\x07")  # macOS resource fork
    (task / "dataset.json").write_text(json.dumps({
        "name": "Hippocampus", "tensorImageSize": "3D", "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "Anterior", "2": "Posterior"}, "numTraining": len(CASES), "numTest": 1,
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in CASES],
        "test": [f"./imagesTs/{UNLABELLED}.nii.gz"],
    }))
    out = tmp_path / "hippocampus_msd.json"
    assert main(["import", "msd", str(task), "--output", str(out), "--folds", "2"]) == 0
    manifest = load_manifest(out)
    assert manifest.modality == "MR" and manifest.labels == {0: "background", 1: "Anterior", 2: "Posterior"}
    by_id = {c.id: c for c in manifest.cases}
    for case in CASES:
        assert manifest.image_path(by_id[case]) == (hippocampus / "images" / f"{case}.nii.gz").resolve()
        assert manifest.label_path(by_id[case]) == (hippocampus / "labels" / f"{case}.nii.gz").resolve()
        assert by_id[case].image == f"Task04_Hippocampus/imagesTr/{case}.nii.gz"  # the layout's path, as given
    assert manifest.splits["test"] == [UNLABELLED] and by_id[UNLABELLED].label is None
    assert manifest.allow_paths_outside_root  # the symlinks lead out of tmp_path, into ../shared


def test_nnunet_layout_of_real_cases_imports_to_a_manifest_of_the_real_files(hippocampus, tmp_path):
    data = tmp_path / "nnUNet_raw" / "Dataset004_Hippocampus"
    for case in CASES:
        link_file(data / "imagesTr" / f"{case}_0000.nii.gz", hippocampus / "images" / f"{case}.nii.gz")
        link_file(data / "labelsTr" / f"{case}.nii.gz", hippocampus / "labels" / f"{case}.nii.gz")
    link_file(data / "imagesTs" / f"{UNLABELLED}_0000.nii.gz", hippocampus / "images" / f"{UNLABELLED}.nii.gz")
    (data / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MRI"}, "labels": {"background": 0, "Anterior": 1, "Posterior": 2},
        "numTraining": len(CASES), "file_ending": ".nii.gz",
    }))
    out = data / "manifest.json"
    assert main(["import", "nnunet", str(data), "--output", str(out), "--folds", "2"]) == 0
    manifest = load_manifest(out)
    assert manifest.name == "Dataset004_Hippocampus" and manifest.modality == "MR"
    assert manifest.labels == {0: "background", 1: "Anterior", 2: "Posterior"}
    by_id = {c.id: c for c in manifest.cases}
    assert set(by_id) == {*CASES, UNLABELLED}
    for case in CASES:
        assert by_id[case].image == f"imagesTr/{case}_0000.nii.gz"
        assert manifest.image_path(by_id[case]) == (hippocampus / "images" / f"{case}.nii.gz").resolve()
        assert manifest.label_path(by_id[case]) == (hippocampus / "labels" / f"{case}.nii.gz").resolve()
    assert [len(f["val"]) for f in manifest.folds] == [2, 2] and manifest.splits["test"] == [UNLABELLED]
