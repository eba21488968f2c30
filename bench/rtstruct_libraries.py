"""RT structure set writers compared on real series: medseg's (pydicom + scikit-image marching squares)
and rt-utils' (OpenCV contours), on the same masks with holes and several islands per slice.

For each series (../shared/data/dicom/series) the mask of ``tests/unit/rtstruct_raster.structures``
(``ring``: an annulus and a separate disc; ``core``: a disc in the ring's hole; ``bright``: the scan's
brightest tenth, ragged) is written by both writers; each file is then checked by dciodvfy and rasterised
back onto the source grid two ways: by pixel centres with the even-odd rule (``rtstruct_raster.rasterise``,
the usual rasterisation of planar contours) and by rt-utils' own reader (OpenCV ``fillPoly``, which also
fills the pixels the contour runs through). Prints per-ROI Dice, write time (best of ``--repeats``), file
size and the count of dciodvfy error lines as Markdown; ``--json`` stores them. Also times medseg's
writer alone on a 512x512x300 mask (the synthetic CT and two spheres of bench/dicom_seg_encode.py).

rt-utils (and OpenCV) are not medseg dependencies: install them apart, e.g.
``pip install --no-deps --target /tmp/rtu rt-utils==1.2.7 opencv-python-headless`` and delete
``/tmp/rtu/tests`` (rt-utils' wheel ships a top-level ``tests`` package that would hide ours), then

    PYTHONPATH=$PWD:/tmp/rtu python bench/rtstruct_libraries.py --json docs/benchmarks/rtstruct_libraries.json
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench.dicom_seg_encode import timed
from medseg.data.labels import label_code, label_table
from medseg.io.mask_writers import ModelInfo
from medseg.io.nifti import mask_like
from medseg.io.rtstruct import RtStructWriter
from medseg.io.scans import find_scans, load_scan
from tests.unit.rtstruct_raster import dice, rasterise, structures

SERIES = ("torchio_ct_17", "philips_anatomical_001", "siemens_anatomical_001")
NAMES = {1: "ring", 2: "core", 3: "bright"}
MODEL = ModelInfo("bench", tuple(label.model_copy(update={"code": label_code(label)})
                                 for label in label_table({0: "background", **NAMES})))


def dciodvfy_errors(path: Path) -> list[str]:
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def write_rt_utils(folder: Path, labels: np.ndarray, path: Path) -> None:
    """rt-utils' writer with its defaults (approximated contours, no pin holes); its masks are (rows,
    columns, slices), slices along the normal like ours."""
    from rt_utils import RTStructBuilder

    rt = RTStructBuilder.create_new(dicom_series_path=str(folder))
    for value, name in NAMES.items():
        rt.add_roi(mask=(labels == value).transpose(1, 0, 2), name=name, color=[255, 0, 0])
    rt.save(str(path))


def read_rt_utils(folder: Path, path: Path) -> dict[str, np.ndarray]:
    """rt-utils' reader: ROI name -> (columns, rows, slices) mask."""
    from rt_utils import RTStructBuilder

    rt = RTStructBuilder.create_from(dicom_series_path=str(folder), rt_struct_path=str(path))
    return {name: np.asarray(rt.get_roi_mask_by_name(name), bool).transpose(1, 0, 2) for name in NAMES.values()}


def measure(folder: Path, out: Path, repeats: int) -> dict[str, dict]:
    scan = find_scans([folder])[0]
    image = load_scan(scan)
    labels = structures(image.shape, np.asarray(image.dataobj))
    mask = mask_like(labels, image)
    writers = {"medseg": lambda p: RtStructWriter(MODEL).write(scan, image, mask, p),
               "rt-utils": lambda p: write_rt_utils(folder, labels, p)}
    results: dict[str, dict] = {}
    for writer, write in writers.items():
        path = out / f"{folder.name}.{writer}.rtstruct.dcm"
        seconds = timed(lambda: write(path), repeats)  # noqa: B023 (called at once)
        errors = dciodvfy_errors(path)
        row: dict = {"write_s": round(seconds, 3), "bytes": path.stat().st_size, "dciodvfy_errors": len(errors),
                     "dciodvfy_error_examples": errors[:3]}
        for reader, read in (("pixel_centre", lambda p: rasterise(p, folder)), ("rt_utils_reader",
                                                                                 lambda p: read_rt_utils(folder, p))):
            try:
                back = read(path)
                row[f"dice_{reader}"] = {name: round(dice(back[name], labels == value), 4)
                                         for value, name in NAMES.items()}
            except Exception as exc:  # a reader failing on the other library's file is a result too
                row[f"dice_{reader}"] = f"{type(exc).__name__}: {exc}"[:200]
        results[writer] = row
    results["voxels"] = {name: int((labels == value).sum()) for value, name in NAMES.items()}
    results["shape"] = list(image.shape)
    return results


def measure_large(out: Path, repeats: int) -> dict[str, object]:
    """medseg's writer on a 512x512x300 synthetic CT with two nested spheres (one contour per class per slice)."""
    from bench.dicom_seg_encode import spheres, write_ct_series

    write_ct_series(out / "large" / "series", 512, 300)
    scan = find_scans([out / "large"])[0]
    image = load_scan(scan)
    labels = spheres(image.shape)
    model = ModelInfo("bench", MODEL.labels[:3])
    path = out / "large.rtstruct.dcm"
    seconds = timed(lambda: RtStructWriter(model).write(scan, image, mask_like(labels, image), path), repeats)
    back = rasterise(path, scan.path)
    return {"shape": list(image.shape), "write_s": round(seconds, 3), "bytes": path.stat().st_size,
            "dciodvfy_errors": len(dciodvfy_errors(path)),
            "dice_pixel_centre": {name: round(dice(back[name], labels == value), 4)
                                  for value, name in ((1, "ring"), (2, "core"))}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/dicom/series"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    import cv2
    import rt_utils  # noqa: F401  (imported before timing)

    if shutil.which("dciodvfy") is None:
        print("dciodvfy not found (dicom3tools)", file=sys.stderr)
        return 1
    figures: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in SERIES:
            figures[name] = measure(args.data / name, Path(tmp), args.repeats)
        figures["large"] = measure_large(Path(tmp), args.repeats)
    print("| series | writer | write s | KiB | dciodvfy errors | Dice pixel centres (ring/core/bright) | "
          "Dice rt-utils reader |")
    print("|---|---|---|---|---|---|---|")
    for name in SERIES:
        for writer in ("medseg", "rt-utils"):
            row = figures[name][writer]

            def fmt(value):
                return " / ".join(f"{v:.4f}" for v in value.values()) if isinstance(value, dict) else value

            print(f"| {name} | {writer} | {row['write_s']:.2f} | {row['bytes'] / 1024:.0f} | "
                  f"{row['dciodvfy_errors']} | {fmt(row['dice_pixel_centre'])} | {fmt(row['dice_rt_utils_reader'])} |")
    large = figures["large"]
    print(f"\nmedseg on a 512x512x300 mask (two spheres): {large['write_s']:.2f} s, "
          f"{large['bytes'] / 2**20:.1f} MiB, {large['dciodvfy_errors']} dciodvfy errors, Dice {large['dice_pixel_centre']}")
    if args.json:
        from importlib.metadata import version

        import pydicom
        import skimage

        figures["environment"] = {"machine": platform.machine(), "python": platform.python_version(),
                                  "pydicom": pydicom.__version__, "scikit-image": skimage.__version__,
                                  "rt-utils": version("rt-utils"), "opencv": cv2.__version__}
        figures["command"] = "PYTHONPATH=$PWD:/tmp/rtu python " + " ".join(sys.argv)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
