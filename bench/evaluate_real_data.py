"""Evaluate perturbed copies of real reference masks against the originals (../shared/data), end to end.

Not a benchmark of a model: it checks that ``medseg evaluate`` reports on real geometry what the
perturbations should produce. Cases:

* lung CT (0.57 x 0.57 x 5 mm, one ~1.36 mL lesion): ``lung1_dilated_fp`` (lesion dilated by one voxel
  in-plane, plus a planted 3 mm-radius false positive 28 mm away in the lung), ``lung1_shifted`` (moved one
  voxel along x), ``lung1_eroded`` (eroded by one voxel in-plane).
* hippocampus MR (1 mm): four cases, each with one perturbation (class 1 dilated, class 2 eroded, all
  shifted one voxel, class 2 deleted so its prediction is empty).

Usage: ``python bench/evaluate_real_data.py [OUTPUT_DIR] [--json FILE]`` (default ``runs/eval_real_data``);
prints both summaries and where the reports are. ``--json`` writes a bench/harness.py record (machine,
load average before and after, command, commit) with both evaluations' per-class summaries (Dice,
HD95, NSD: medians, means, counts) and lesion detection; a relative path goes under docs/benchmarks/. It
measures agreement, not time: nothing is timed, and the figures do not depend on the machine's load.
``--docs`` rewrites its section of docs/benchmarks.md from the record. It takes about a minute of CPU, so
it is its own smoke run:

    PYTHONPATH=$PWD python bench/evaluate_real_data.py OUT --json evaluate_real_data.json --docs

Real data: see ../shared/data/README.md for licences and attribution.
"""

from __future__ import annotations

import argparse
import json
import sys
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
DOCS_BEGIN, DOCS_END = "<!-- evaluate_real_data:begin -->", "<!-- evaluate_real_data:end -->"


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


def _summary(output: Path) -> dict:
    """The per-class and lesion summaries, and each case's mean Dice, of the evaluation written in ``output``."""
    document = json.loads((output / "evaluation.json").read_text())
    return {"per_class": document["summary"], "lesions": document["lesion_summary"],
            "case_mean_dice": {c["case_id"]: c["mean_dice"] for c in document["cases"]}}


def _class_table(summary: dict) -> str:
    """Per class: Dice (mean, median, sd, n), the empty-case counts, HD95 median and NSD mean."""
    lines = ["| class | Dice mean | Dice median | Dice sd | cases | both empty | prediction empty | reference empty | "
             "HD95 median (mm) | NSD mean (1 mm) |", "|---|---|---|---|---|---|---|---|---|---|"]

    def f(value: float | None, digits: int) -> str:
        return "undefined" if value is None else f"{value:.{digits}f}"

    for name, c in summary["per_class"].items():
        m, n = c["metrics"], c["status_counts"]
        lines.append(f"| {name} | {f(m['dice']['mean'], 4)} | {f(m['dice']['median'], 4)} | {f(m['dice']['std'], 4)} | "
                     f"{m['dice']['n'] + m['dice']['n_undefined']} | {n['both_empty']} | {n['prediction_empty']} | "
                     f"{n['reference_empty']} | {f(m['hd95_mm']['median'], 2)} | {f(m['nsd']['mean'], 4)} |")
    return "\n".join(lines)


def docs_section(data: dict) -> str:
    """The section of docs/benchmarks.md, from the record."""
    lesion = data["lung_ct"]["lesions"]["lesion"]["detection"]["all"]
    hd95 = data["hippocampus"]["per_class"]["posterior"]["metrics"]["hd95_mm"]
    m = data["machine"]
    commit = data["commit"][:12] + ("-dirty" if data["commit"].endswith("-dirty") else "")
    return f"""{DOCS_BEGIN}
## Evaluation on real labels (`bench/evaluate_real_data.py`)

Measured {data['date']} at commit `{commit}` with `{data['command']}` ({m['cores']} cores, {m['cpu_model']};
load average {data['load_average_before']} before, {data['load_average_after']} after). Agreement, not time: the
figures are deterministic and do not depend on the load. The reference is a real label; the "predictions" are that
label perturbed in known ways, so the metrics can be read against what was done to them.

Lung CT (`lung_ct/lung1_lesion.nii.gz`, 0.57×0.57×5 mm): three predictions, dilated by one voxel in-plane plus a
planted false positive of {FP_RADIUS_MM:g} mm radius, shifted one voxel, eroded by one voxel in-plane. Per-class
Dice and surface figures:

{_class_table(data['lung_ct'])}

Lesion detection (all sizes): TP {lesion['tp']}, FN {lesion['fn']}, FP {lesion['fp']}: sensitivity {lesion['sensitivity']:.3f},
precision {lesion['precision']:.3f}, F1 {lesion['f1']:.3f}.

Hippocampus MR (4 labels, each perturbed once: anterior dilated, posterior eroded, all shifted one voxel, posterior
deleted). Per-class Dice and surface figures:

{_class_table(data['hippocampus'])}

A deleted class scores Dice 0 (prediction empty, reference not); its HD95 is undefined and counted apart
({hd95['n']} defined, {hd95['n_undefined']} undefined), as `docs/evaluation.md` specifies.

All figures: [`benchmarks/evaluate_real_data.json`](benchmarks/evaluate_real_data.json).

Data attribution: lung CT from the pyradiomics 3.1.0 test data (BSD 3-clause, Computational Imaging
and Bioinformatics Lab, Harvard); hippocampus: MSD Task04 (CC BY-SA 4.0, Antonelli et al. 2022; Simpson et al. 2019).
{DOCS_END}
"""


def main(output: Path, json_path: Path | None = None, docs: bool = False) -> int:
    from medseg.evaluation.runner import evaluate_folders

    if not SHARED.is_dir():
        print(f"real data not found at {SHARED}", file=sys.stderr)
        return 1
    sys.path.insert(0, str(REPO / "bench"))
    import harness

    before = harness.load_average()
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
    if json_path is not None or docs:
        from docs_section import replace_section

        data = harness.record(
            "evaluate_real_data", {"load_average_before": before, "load_average_after": harness.load_average()},
            what="perturbed copies of real reference masks evaluated against the originals (Dice, HD95, NSD at 1 mm; "
                 "lesion detection on the lung CT): agreement, not time",
            lung_ct=_summary(output / "lung"), hippocampus=_summary(output / "hippocampus"))
        if json_path is not None:
            print("written:", harness.write_record(data, json_path))
        if docs:
            replace_section(REPO / "docs" / "benchmarks.md", docs_section(data), DOCS_BEGIN, DOCS_END)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path, nargs="?", default=REPO / "runs" / "eval_real_data")
    parser.add_argument("--json", type=Path, default=None,
                        help="write the record here (a relative path goes under docs/benchmarks/)")
    parser.add_argument("--docs", action="store_true", help="rewrite the section in docs/benchmarks.md")
    cli = parser.parse_args()
    sys.exit(main(cli.output, cli.json, cli.docs))
