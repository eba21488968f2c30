"""Manifests: cases with paths relative to the manifest, label names, splits and folds."""

import json

import pytest

from medseg.data.manifest import load_manifest
from medseg.errors import ManifestError


def make(tmp_path, **overrides):
    (tmp_path / "img").mkdir(exist_ok=True)
    for name in ("a", "b"):
        (tmp_path / "img" / f"{name}.nii.gz").write_bytes(b"x")
        (tmp_path / "img" / f"{name}_seg.nii.gz").write_bytes(b"x")
    data = {
        "name": "toy",
        "labels": {"0": "background", "1": "liver"},
        "cases": [{"id": n, "image": f"img/{n}.nii.gz", "label": f"img/{n}_seg.nii.gz"} for n in ("a", "b")],
        "splits": {"train": ["a"], "val": ["b"]},
    }
    data.update(overrides)
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(data))
    return path


def test_paths_are_relative_to_the_manifest_and_splits_resolve(tmp_path):
    manifest = load_manifest(make(tmp_path))
    assert manifest.labels == {0: "background", 1: "liver"} and manifest.num_classes == 2
    (train,) = manifest.split("train")
    assert manifest.image_path(train) == (tmp_path / "img" / "a.nii.gz").resolve()
    assert [c.id for c in manifest.split("val")] == ["b"]
    assert manifest.split("test") == []


def test_missing_file_is_an_error_naming_it(tmp_path):
    path = make(tmp_path)
    (tmp_path / "img" / "b_seg.nii.gz").unlink()
    with pytest.raises(ManifestError, match="b_seg.nii.gz"):
        load_manifest(path)


def test_split_naming_an_unknown_case_is_an_error(tmp_path):
    with pytest.raises(ManifestError, match="unknown cases"):
        load_manifest(make(tmp_path, splits={"train": ["zzz"]}))


def test_labels_must_start_at_background(tmp_path):
    with pytest.raises(ManifestError, match="labels"):
        load_manifest(make(tmp_path, labels={"1": "liver"}))


def test_folds_select_cases(tmp_path):
    manifest = load_manifest(make(tmp_path, folds=[{"train": ["a"], "val": ["b"]}, {"train": ["b"], "val": ["a"]}]))
    assert [c.id for c in manifest.split("train", fold=1)] == ["b"]
    with pytest.raises(ManifestError, match="fold 2"):
        manifest.split("train", fold=2)


def test_bad_json_names_the_file(tmp_path):
    path = tmp_path / "m.json"
    path.write_text("{")
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_manifest(path)
