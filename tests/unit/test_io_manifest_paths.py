"""Manifest case paths must stay inside the manifest's folder unless the manifest allows otherwise."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.data.manifest import check_case_geometry, load_manifest
from medseg.errors import GeometryError, ManifestError, ScanError


def _nifti(path: Path, data: np.ndarray | None = None, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.uint8) if data is None else data, np.eye(4) if affine is None else affine), str(path))
    return path


def _manifest(folder: Path, image: str, label: str | None = None, **extra: object) -> Path:
    case = {"id": "c0", "image": image, **({"label": label} if label else {})}
    data = {"name": "t", "labels": {"0": "background", "1": "organ"}, "cases": [case], "splits": {"train": ["c0"]}, **extra}
    path = folder / "manifest.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def layout(tmp_path: Path) -> Path:
    """``root/`` holds a manifest and an image; ``outside/`` holds another image."""
    _nifti(tmp_path / "root" / "images" / "a.nii.gz")
    _nifti(tmp_path / "outside" / "b.nii.gz")
    (tmp_path / "root" / "link.nii.gz").symlink_to(tmp_path / "outside" / "b.nii.gz")
    return tmp_path


def test_paths_inside_the_root_are_accepted(layout: Path) -> None:
    manifest = load_manifest(_manifest(layout / "root", "images/a.nii.gz", str(layout / "root" / "images" / "a.nii.gz")))
    assert manifest.image_path(manifest.cases[0]).name == "a.nii.gz"


@pytest.mark.parametrize("which", ["dotdot", "absolute", "symlink"])
def test_paths_escaping_the_root_are_refused(layout: Path, which: str) -> None:
    image = {"dotdot": "../outside/b.nii.gz", "absolute": str(layout / "outside" / "b.nii.gz"), "symlink": "link.nii.gz"}[which]
    with pytest.raises(ManifestError, match=r"case 'c0' image .* outside the manifest's folder .*allow_paths_outside_root"):
        load_manifest(_manifest(layout / "root", image))


def test_label_escaping_the_root_is_refused(layout: Path) -> None:
    with pytest.raises(ManifestError, match="case 'c0' label"):
        load_manifest(_manifest(layout / "root", "images/a.nii.gz", "../outside/b.nii.gz"))


def test_paths_outside_the_root_are_accepted_when_the_manifest_allows_it(layout: Path) -> None:
    manifest = load_manifest(_manifest(layout / "root", "../outside/b.nii.gz", "link.nii.gz", allow_paths_outside_root=True))
    assert manifest.allow_paths_outside_root
    assert manifest.image_path(manifest.cases[0]) == (layout / "outside" / "b.nii.gz").resolve()


def test_case_geometry_check_refuses_a_label_off_the_grid(tmp_path: Path) -> None:
    _nifti(tmp_path / "img.nii.gz")
    _nifti(tmp_path / "lab.nii.gz", affine=np.diag([1.0, 1.0, 2.0, 1.0]))
    manifest = load_manifest(_manifest(tmp_path, "img.nii.gz", "lab.nii.gz"))
    with pytest.raises(GeometryError, match="label spacing"):
        check_case_geometry(manifest, manifest.cases[0])
    _nifti(tmp_path / "lab.nii.gz", data=np.full((4, 5, 6), 2, np.uint8))
    with pytest.raises(ScanError, match=r"values \[2\] not declared"):
        check_case_geometry(manifest, manifest.cases[0])
    _nifti(tmp_path / "lab.nii.gz", data=np.ones((4, 5, 6), np.uint8))
    check_case_geometry(manifest, manifest.cases[0])
