"""`medseg import nnunet|msd DIR`: manifests that point at a data set's files in place, on tiny synthetic NIfTIs."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.cli import main
from medseg.data.importers import import_dataset, modality_of
from medseg.data.manifest import load_manifest
from medseg.errors import ManifestError, OutputError

TRAIN = ["case_a", "case_b", "case_c", "case_d"]


def _nifti(path: Path, shape: tuple[int, ...] = (4, 4, 3), value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.full(shape, value, dtype=np.int16), np.eye(4)), str(path))
    return path


def _nnunet(root: Path, channels: dict[str, str] | None = None, labels: dict | None = None) -> Path:
    channels = channels or {"0": "CT"}
    for case in TRAIN:
        for c in channels:
            _nifti(root / "imagesTr" / f"{case}_{int(c):04d}.nii.gz")
        _nifti(root / "labelsTr" / f"{case}.nii.gz", value=1)
    for c in channels:
        _nifti(root / "imagesTs" / f"new_case_{int(c):04d}.nii.gz")
    (root / "imagesTr" / "._case_a_0000.nii.gz").write_bytes(b"resource fork")
    raw = {"name": "Dataset001_Tiny", "channel_names": channels, "numTraining": len(TRAIN), "file_ending": ".nii.gz",
           "labels": labels or {"background": 0, "organ": 1, "tumour": 2}}
    (root / "dataset.json").write_text(json.dumps(raw))
    return root


def _msd(root: Path, modality: dict[str, str] | None = None, image_shape: tuple[int, ...] = (4, 4, 3)) -> Path:
    for case in TRAIN:
        _nifti(root / "imagesTr" / f"{case}.nii.gz", image_shape)
        _nifti(root / "labelsTr" / f"{case}.nii.gz", value=2)
        (root / "imagesTr" / f"._{case}.nii.gz").write_bytes(b"resource fork")  # as in real MSD downloads
    _nifti(root / "imagesTs" / "new_case.nii.gz", image_shape)
    raw = {"name": "Tiny", "description": "tiny task", "licence": "CC-BY-SA 4.0",
           "modality": modality or {"0": "MRI"}, "labels": {"0": "background", "1": "Anterior", "2": "Posterior"},
           "numTraining": len(TRAIN), "numTest": 1,
           "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in TRAIN],
           "test": ["./imagesTs/new_case.nii.gz"]}
    (root / "dataset.json").write_text(json.dumps(raw))
    return root


def test_nnunet_data_set_becomes_a_manifest_pointing_at_its_files_in_place(tmp_path):
    data = _nnunet(tmp_path / "Dataset001_Tiny")
    out = tmp_path / "manifests" / "tiny.json"
    manifest = import_dataset("nnunet", data, out, folds=2)
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny.json"]  # nothing copied
    loaded = load_manifest(out)
    assert loaded.labels == {0: "background", 1: "organ", 2: "tumour"} and loaded.modality == "CT"
    assert loaded.name == "Dataset001_Tiny" and loaded.allow_paths_outside_root
    by_id = {c.id: c for c in loaded.cases}
    assert set(by_id) == {*TRAIN, "new_case"}
    assert loaded.image_path(by_id["case_b"]) == (data / "imagesTr" / "case_b_0000.nii.gz").resolve()
    assert loaded.label_path(by_id["case_b"]) == (data / "labelsTr" / "case_b.nii.gz").resolve()
    assert by_id["case_b"].image == "../Dataset001_Tiny/imagesTr/case_b_0000.nii.gz"  # relative to the manifest
    assert by_id["new_case"].label is None and loaded.splits["test"] == ["new_case"]
    assert sorted(loaded.splits["train"] + loaded.splits["val"]) == TRAIN
    assert len(loaded.folds) == 2 and loaded.splits["val"] == loaded.folds[0]["val"]
    assert manifest.model_dump() == loaded.model_dump()


def test_msd_task_becomes_a_manifest_and_skips_macos_resource_forks(tmp_path):
    data = _msd(tmp_path / "Task04_Tiny")
    out = data / "manifest.json"  # inside the data set folder: no paths leave it
    manifest = import_dataset("msd", data, out, folds=0)
    assert manifest.modality == "MR" and manifest.labels == {0: "background", 1: "Anterior", 2: "Posterior"}
    assert not manifest.allow_paths_outside_root
    assert {c.id for c in manifest.cases} == {*TRAIN, "new_case"}
    assert all(not Path(c.image).name.startswith("._") for c in manifest.cases)
    assert manifest.splits == {"train": TRAIN, "val": [], "test": ["new_case"]} and manifest.folds == []
    assert "tiny task" in manifest.description and "CC-BY-SA 4.0" in manifest.description


def test_cli_import_writes_the_manifest_and_never_overwrites_it_silently(tmp_path, capsys):
    data = _nnunet(tmp_path / "ds")
    out = tmp_path / "m.json"
    assert main(["import", "nnunet", str(data), "--output", str(out), "--folds", "2"]) == 0
    assert f"wrote {out}: 5 cases" in capsys.readouterr().out
    before = out.read_text()
    assert main(["import", "nnunet", str(data), "--output", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_text() == before
    with pytest.raises(OutputError, match="already exists"):
        import_dataset("nnunet", data, out)
    assert main(["import", "nnunet", str(data), "--output", str(out), "--overwrite", "--folds", "0"]) == 0
    assert load_manifest(out).splits["val"] == []


def test_nnunet_regions_are_refused_with_the_reason(tmp_path):
    data = _nnunet(tmp_path / "ds", labels={"background": 0, "whole_tumor": [1, 2, 3], "enhancing": 3})
    with pytest.raises(ManifestError, match=r"dataset\.json: labels whole_tumor = \[1, 2, 3\] are nnU-Net regions"):
        import_dataset("nnunet", data, tmp_path / "m.json")
    assert not (tmp_path / "m.json").exists()


@pytest.mark.parametrize("labels, message", [
    ({"background": 0, "organ": 2}, r"0\.\.N-1 without gaps.*\[0, 2\]"),
    ({"background": 0, "organ": 1, "ignore": 2}, "'ignore' label"),
    ({"organ": 1}, "0..N-1"),
])
def test_labels_medseg_cannot_train_are_refused(tmp_path, labels, message):
    data = _nnunet(tmp_path / "ds", labels=labels)
    with pytest.raises(ManifestError, match=message):
        import_dataset("nnunet", data, tmp_path / "m.json")


def test_a_missing_dataset_json_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match=r"empty/dataset\.json: Decathlon dataset\.json not found"):
        import_dataset("msd", tmp_path / "empty", tmp_path / "m.json")


def test_a_listed_case_that_is_missing_is_named(tmp_path):
    data = _msd(tmp_path / "task")
    (data / "imagesTr" / "case_c.nii.gz").unlink()
    with pytest.raises(ManifestError, match=r"imagesTr/case_c\.nii\.gz: image of training\[2\] not found"):
        import_dataset("msd", data, tmp_path / "m.json")


def test_a_missing_label_file_is_named(tmp_path):
    data = _nnunet(tmp_path / "ds")
    (data / "labelsTr" / "case_d.nii.gz").unlink()
    with pytest.raises(ManifestError, match=r"labelsTr/case_d\.nii\.gz: label file of case 'case_d' not found"):
        import_dataset("nnunet", data, tmp_path / "m.json")


def test_a_missing_channel_file_and_a_wrong_case_count_are_named(tmp_path):
    data = _nnunet(tmp_path / "ds", channels={"0": "T2", "1": "ADC"})
    (data / "imagesTr" / "case_a_0001.nii.gz").unlink()
    with pytest.raises(ManifestError, match=r"case_a_0001\.nii\.gz: channel file of case 'case_a' not found"):
        import_dataset("nnunet", data, tmp_path / "m.json")
    data = _nnunet(tmp_path / "ds2")
    raw = json.loads((data / "dataset.json").read_text())
    (data / "dataset.json").write_text(json.dumps({**raw, "numTraining": 5}))
    with pytest.raises(ManifestError, match="numTraining is 5 but 4"):
        import_dataset("nnunet", data, tmp_path / "m.json")


def test_multi_channel_nnunet_cases_list_their_channel_files_and_decathlon_4d_is_refused(tmp_path):
    data = _nnunet(tmp_path / "ds", channels={"0": "T2", "1": "ADC"})
    manifest = import_dataset("nnunet", data, tmp_path / "two.json", folds=2)
    assert manifest.channels == ["T2", "ADC"] and manifest.num_channels == 2
    case = next(c for c in manifest.cases if c.id == "case_b")
    assert [p.name for p in manifest.image_paths(case)] == ["case_b_0000.nii.gz", "case_b_0001.nii.gz"]
    test_case = next(c for c in manifest.cases if c.id == "new_case")
    assert [p.name for p in manifest.image_paths(test_case)] == ["new_case_0000.nii.gz", "new_case_0001.nii.gz"]
    data = _msd(tmp_path / "prostate", modality={"0": "T2", "1": "ADC"}, image_shape=(4, 4, 3, 2))
    with pytest.raises(ManifestError, match=r"keeps 2 channels \(T2, ADC\) in the 4th dimension.*medseg import nnunet"):
        import_dataset("msd", data, tmp_path / "m.json")
    data = _msd(tmp_path / "four_d", image_shape=(4, 4, 3, 3))  # one modality named, but a 4D image
    with pytest.raises(ManifestError, match=r"keeps 3 channels"):
        import_dataset("msd", data, tmp_path / "m.json")


def test_the_wrong_layout_is_pointed_out(tmp_path):
    data = _msd(tmp_path / "task")
    with pytest.raises(ManifestError, match="try 'medseg import msd'"):
        import_dataset("nnunet", data, tmp_path / "m.json")


def test_too_few_cases_for_the_folds_says_what_to_pass(tmp_path):
    data = _nnunet(tmp_path / "ds")
    with pytest.raises(ManifestError, match="4 training cases are too few for 5 folds.*--folds 0"):
        import_dataset("nnunet", data, tmp_path / "m.json")


@pytest.mark.parametrize("names, modality", [
    (["CT"], "CT"), (["ct"], "CT"), (["MRI"], "MR"), (["T2"], "MR"), (["T1w"], "MR"), (["FLAIR"], "MR"),
    (["ADC"], "MR"), (["T2", "ADC"], "MR"), (["CT", "T2"], "other"), (["noNorm"], "other"), (["PET"], "other"),
])
def test_modality_comes_from_the_channel_names(names, modality):
    assert modality_of(names) == modality
