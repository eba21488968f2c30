"""Time predict-time statistics (and their parts) on a 512x512x192 CT, beside the lesion inventory.

The CT is the real lung CT of ../shared/data (512x512x48) stacked four times along z, so it has the size
the issue names; the mask has two classes: "low density" (every voxel below -400 HU: lungs and the air
around the body, a worst case of several litres) and the real lesion (four copies). Measured side by side
in one run: the statistics of both classes, the QC percentiles, the components with cc3d versus
scipy.ndimage.label, and the evaluation's lesion finder (find_lesions, what the lesion inventory runs) on
the lesion class.

    PYTHONPATH=$PWD python bench/predict_statistics.py --json docs/benchmarks/predict_statistics.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import cc3d
import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

from medseg.evaluation.lesions import find_lesions
from medseg.inference.qc import intensity_percentiles
from medseg.inference.statistics import class_statistics

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "lung_ct"


def _best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    ct = nib.load(DATA / "lung1_ct.nii.gz")
    lesion = np.asarray(nib.load(DATA / "lung1_lesion.nii.gz").dataobj)
    # Fortran order, as nibabel gives NIfTI data to predict.
    image = np.asfortranarray(np.concatenate([np.asanyarray(ct.dataobj)] * 4, axis=2))
    labels = np.asfortranarray(np.where(image < -400, 1, 0).astype(np.uint8))
    lesions = np.asfortranarray(np.concatenate([lesion] * 4, axis=2) > 0)
    labels[lesions] = 2
    lesion_only = lesions.astype(np.uint8)
    affine = ct.affine
    names = {0: "background", 1: "low_density", 2: "lesion"}

    stats = class_statistics(labels, image, affine, names)
    timings = {
        "statistics_all_classes_s": _best_of(lambda: class_statistics(labels, image, affine, names), args.repeats),
        "statistics_lesion_only_mask_s": _best_of(lambda: class_statistics(lesion_only, image, affine,
                                                                           {0: "background", 1: "lesion"}), args.repeats),
        "qc_intensity_percentiles_s": _best_of(lambda: intensity_percentiles(image), args.repeats),
        "components_low_density_cc3d_s": _best_of(lambda: cc3d.connected_components(labels == 1, connectivity=26,
                                                                                    return_N=True), args.repeats),
        "components_low_density_scipy_s": _best_of(lambda: ndimage.label(labels == 1, structure=np.ones((3, 3, 3))),
                                                   args.repeats),
        "lesion_inventory_find_lesions_s": _best_of(lambda: find_lesions(labels == 2, affine, image=image), 1),
    }
    result = {
        "volume_shape": list(image.shape), "spacing_mm": [float(z) for z in ct.header.get_zooms()[:3]],
        "classes": [{"name": s.name, "voxels": s.voxels, "volume_ml": round(s.volume_ml, 2), "components": s.components,
                     "intensity_mean_hu": round(s.intensity_mean, 1)} for s in stats],
        **{k: round(v, 3) for k, v in timings.items()},
        "ratio_scipy_over_cc3d": round(timings["components_low_density_scipy_s"] / timings["components_low_density_cc3d_s"], 2),
        "machine": f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
                   f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end",
        "command": "PYTHONPATH=$PWD python " + " ".join(sys.argv),
    }
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
