"""Time predict-time statistics (and their parts) on a 512x512x192 CT, beside the lesion inventory.

The CT is the real lung CT of ../shared/data (512x512x48) stacked four times along z, so it has the size
the issue names; the mask has two classes: "low density" (every voxel below -400 HU: lungs and the air
around the body, a worst case of several litres) and the real lesion (four copies). The variants, run
through bench/harness.py (interleaved, ``--repeats`` rounds, median and min-max): the statistics of both
classes, of a lesion-only mask, the QC percentiles, the components with cc3d on the whole mask, by slabs
(medseg.inference.statistics.count_components, what the statistics run) and with scipy.ndimage.label,
and the evaluation's lesion finder (find_lesions, what the lesion inventory runs) on the lesion class.

    PYTHONPATH=$PWD python bench/predict_statistics.py --json predict_statistics.json
    PYTHONPATH=$PWD python bench/predict_statistics.py --stack 1 --json /tmp/predict_statistics.json   # smoke
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cc3d
import harness  # bench/ is this script's folder, first on sys.path
import nibabel as nib
import numpy as np
from scipy import ndimage

from medseg.evaluation.lesions import find_lesions
from medseg.inference.qc import intensity_percentiles
from medseg.inference.statistics import class_statistics, count_components

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "lung_ct"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=harness.MIN_REPEATS)
    parser.add_argument("--stack", type=int, default=4, help="copies of the CT along z (1: a quick smoke run)")
    parser.add_argument("--json", type=Path, default=None,
                        help="write the record here (a relative path goes under docs/benchmarks/)")
    args = parser.parse_args()

    ct = nib.load(DATA / "lung1_ct.nii.gz")
    lesion = np.asarray(nib.load(DATA / "lung1_lesion.nii.gz").dataobj)
    # Fortran order, as nibabel gives NIfTI data to predict.
    image = np.asfortranarray(np.concatenate([np.asanyarray(ct.dataobj)] * args.stack, axis=2))
    labels = np.asfortranarray(np.where(image < -400, 1, 0).astype(np.uint8))
    lesions = np.asfortranarray(np.concatenate([lesion] * args.stack, axis=2) > 0)
    labels[lesions] = 2
    lesion_only = lesions.astype(np.uint8)
    affine = ct.affine
    names = {0: "background", 1: "low_density", 2: "lesion"}

    stats = class_statistics(labels, image, affine, names)
    whole = cc3d.connected_components(labels == 1, connectivity=26, return_N=True)[1]
    if count_components(labels.T, 1) != whole:
        raise SystemExit("count_components differs from cc3d on the whole mask")

    def variant(fn):
        def run(repeat: int) -> None:
            fn()
        return run

    measured = harness.run_interleaved({name: variant(fn) for name, fn in {
        "statistics_all_classes": lambda: class_statistics(labels, image, affine, names),
        "statistics_lesion_only_mask": lambda: class_statistics(lesion_only, image, affine, {0: "background", 1: "lesion"}),
        "qc_intensity_percentiles": lambda: intensity_percentiles(image),
        "components_low_density_cc3d": lambda: cc3d.connected_components(labels == 1, connectivity=26, return_N=True),
        "components_low_density_scipy": lambda: ndimage.label(labels == 1, structure=np.ones((3, 3, 3))),
        # What class_statistics runs: cc3d on slabs joined through shared planes (C-ordered view, as it uses).
        "components_low_density_slabs": lambda: count_components(labels.T, 1),
        "lesion_inventory_find_lesions": lambda: find_lesions(labels == 2, affine, image=image),
    }.items()}, args.repeats)
    result = harness.record(
        "predict_statistics", measured, volume_shape=list(image.shape),
        spacing_mm=[float(z) for z in ct.header.get_zooms()[:3]],
        classes=[{"name": s.name, "voxels": s.voxels, "volume_ml": round(s.volume_ml, 2), "components": s.components,
                  "intensity_mean_hu": round(s.intensity_mean, 1)} for s in stats],
        ratio_scipy_over_cc3d=harness.ratio(measured, "components_low_density_scipy", "components_low_density_cc3d"),
        ratio_slabs_over_cc3d=harness.ratio(measured, "components_low_density_slabs", "components_low_density_cc3d"))
    print(json.dumps(result, indent=1))
    print(harness.conditions(result))
    for name, v in measured["variants"].items():
        print(f"| {name} | {harness.cell(v['seconds'], 3)} |")
    if args.json:
        print("written:", harness.write_record(result, args.json))


if __name__ == "__main__":
    main()
