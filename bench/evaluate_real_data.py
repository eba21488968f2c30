"""Evaluate perturbed copies of real reference masks against the originals (../shared/data), end to end.

Not a benchmark of a model: it checks that ``medseg evaluate`` reports on real geometry what the
perturbations should produce. Cases:

* lung CT (0.57 x 0.57 x 5 mm, one ~1.36 mL lesion): ``lung1_dilated_fp`` (lesion dilated by one voxel
  in-plane, plus a planted 3 mm-radius false positive 28 mm away in the lung), ``lung1_shifted`` (moved one
  voxel along x), ``lung1_eroded`` (eroded by one voxel in-plane).
* hippocampus MR (1 mm): four cases, each with one perturbation (class 1 dilated, class 2 eroded, all
  shifted one voxel, class 2 deleted so its prediction is empty).

Usage: ``python bench/evaluate_real_data.py [OUTPUT_DIR]`` (default ``runs/eval_real_data``); prints both
summaries and where the reports are. Real data: see ../shared/data/README.md for licences and attribution.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"  # beside the repository, as the shipped manifests expect
HIPPOCAMPUS_CASES = ("hippocampus_001", "hippocampus_003", "hippocampus_004", "hippocampus_006")
# Planted false positive: voxel centre and radius (mm), in lung parenchyma (about -875 HU) beside the lesion.
FP_CENTRE = (168, 360, 33)
FP_RADIUS_MM = 3.0


def _in_plane(mask: np.ndarray, op) -> np.ndarray:
    """Dilate or erode by one voxel within each axial slice (5 mm slices: a through-plane step is too big)."""
    structure = np.zeros((3, 3, 3), bool)
    structure[:, :, 1] = ndimage.generate_binary_structure(2, 1)
    return op(mask, structure=structure)


def _save_like(data: np.ndarray, like: nib.Nifti1Image, path: Path) -> None:
    out = nib.Nifti1Image(data.astype(np.uint8), like.affine, like.header)
    out.set_data_dtype(np.uint8)
    nib.save(out, str(path))


def build_lung_cases(shared: Path, root: Path) -> dict[str, Path]:
    """Reference, prediction and image folders for the three lung cases; returns them by role."""
    folders = {k: root / k for k in ("ref", "pred", "images")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    ref_img = nib.load(str(shared / "lung_ct" / "lung1_lesion.nii.gz"))
    lesion = np.asarray(ref_img.dataobj) > 0
    spacing = np.linalg.norm(ref_img.affine[:3, :3], axis=0)
    grid = np.ogrid[tuple(slice(0, n) for n in lesion.shape)]
    planted = sum(((g - c) * s) ** 2 for g, c, s in zip(grid, FP_CENTRE, spacing, strict=True)) <= FP_RADIUS_MM**2
    preds = {
        "lung1_dilated_fp": _in_plane(lesion, ndimage.binary_dilation) | planted,
        "lung1_shifted": np.roll(lesion, 1, axis=0),
        "lung1_eroded": _in_plane(lesion, ndimage.binary_erosion),
    }
    for case, pred in preds.items():
        _save_like(lesion, ref_img, folders["ref"] / f"{case}.nii.gz")
        _save_like(pred, ref_img, folders["pred"] / f"{case}.nii.gz")
        link = folders["images"] / f"{case}.nii.gz"
        if not link.exists():
            link.symlink_to((shared / "lung_ct" / "lung1_ct.nii.gz").resolve())
    return folders


def build_hippocampus_cases(shared: Path, root: Path) -> dict[str, Path]:
    """Prediction folder and a manifest (labels anterior/posterior, images) for four hippocampus cases."""
    pred_dir = root / "pred"
    pred_dir.mkdir(parents=True, exist_ok=True)
    cases = []
    for i, case in enumerate(HIPPOCAMPUS_CASES):
        label_path = shared / "hippocampus" / "labels" / f"{case}.nii.gz"
        img = nib.load(str(label_path))
        ref = np.asarray(img.dataobj).astype(np.uint8)
        pred = ref.copy()
        if i == 0:
            pred[ndimage.binary_dilation(ref == 1) & (ref == 0)] = 1
        elif i == 1:
            pred[(ref == 2) & ~ndimage.binary_erosion(ref == 2)] = 0
        elif i == 2:
            pred = np.roll(ref, 1, axis=1)
        else:
            pred[ref == 2] = 0
        _save_like(pred, img, pred_dir / f"{case}.nii.gz")
        cases.append({"id": case, "image": str((shared / "hippocampus" / "images" / f"{case}.nii.gz").resolve()),
                      "label": str(label_path.resolve())})
    manifest = {"name": "hippocampus-perturbed", "modality": "MR",
                "labels": {"0": "background", "1": "anterior", "2": "posterior"}, "cases": cases,
                "allow_paths_outside_root": True}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return {"pred": pred_dir, "manifest": root / "manifest.json"}


def main(output: Path) -> int:
    from medseg.evaluation.runner import evaluate_folders

    if not SHARED.is_dir():
        print(f"real data not found at {SHARED}", file=sys.stderr)
        return 1
    start = time.perf_counter()
    lung = build_lung_cases(SHARED, output / "lung_inputs")
    lung_result = evaluate_folders(lung["pred"], lung["ref"], output / "lung", images_dir=lung["images"],
                                   lesion_classes=[1], nsd_tolerance_mm=1.0,
                                   label_names={0: "background", 1: "lesion"})
    print("== lung CT (reference lung1_lesion, perturbed predictions)")
    print(lung_result.describe())
    hip = build_hippocampus_cases(SHARED, output / "hippocampus_inputs")
    hip_result = evaluate_folders(hip["pred"], hip["manifest"], output / "hippocampus", nsd_tolerance_mm=1.0)
    print("== hippocampus MR (4 labels, each perturbed once)")
    print(hip_result.describe())
    print(f"total {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "runs" / "eval_real_data"))
