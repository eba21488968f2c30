"""RT structure set writers compared on real series: medseg's (pydicom + scikit-image marching squares)
and rt-utils' (OpenCV contours), on the same masks with holes and several islands per slice.

For each series (../shared/data/dicom/series) the mask of ``tests/unit/rtstruct_raster.structures``
(``ring``: an annulus and a separate disc; ``core``: a disc in the ring's hole; ``bright``: the scan's
brightest tenth, ragged) is written by both writers; each file is then checked by dciodvfy and rasterised
back onto the source grid two ways: by pixel centres with the even-odd rule (``rtstruct_raster.rasterise``,
the usual rasterisation of planar contours) and by rt-utils' own reader (OpenCV ``fillPoly``, which also
fills the pixels the contour runs through). Prints per-ROI Dice, write time, file size and the count of
dciodvfy error lines as Markdown; ``--json`` stores the record (a relative path goes under
docs/benchmarks/). Also times medseg's writer alone on a 512x512x300 mask (the synthetic CT and two
spheres of bench/dicom_seg_encode.py). Every write (series x writer, and the large mask) is a variant of
bench/harness.py: interleaved, ``--repeats`` rounds, median and min-max.

rt-utils (and OpenCV) are not medseg dependencies: install them apart, e.g.
``pip install --no-deps --target RT_UTILS_DIR rt-utils==1.2.7 opencv-python-headless`` and delete
``RT_UTILS_DIR/tests`` (rt-utils' wheel ships a top-level ``tests`` package that would hide ours), then

    PYTHONPATH=$PWD:RT_UTILS_DIR python bench/rtstruct_libraries.py --json rtstruct_libraries.json
    PYTHONPATH=$PWD python bench/rtstruct_libraries.py --smoke --without-rt-utils --json /tmp/rtstruct.json  # checks the script
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import harness  # bench/ is this script's folder, first on sys.path
import numpy as np
from dicom_seg_encode import spheres, write_ct_series

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


def prepare(folder: Path, writer: str, out: Path, rt_utils_reader: bool = True):
    """``(write, check)`` of one writer on one series: ``write(repeat)`` writes the file (the timed part),
    ``check()`` measures the last file written (size, dciodvfy, Dice by pixel centres and, with
    ``rt_utils_reader``, by rt-utils' reader)."""
    scan = find_scans([folder])[0]
    image = load_scan(scan)
    labels = structures(image.shape, np.asarray(image.dataobj))
    mask = mask_like(labels, image)
    path = out / f"{folder.name}.{writer}.rtstruct.dcm"

    def write(repeat: int) -> None:
        if writer == "medseg":
            RtStructWriter(MODEL).write(scan, image, mask, path)
        else:
            write_rt_utils(folder, labels, path)

    def check() -> dict:
        errors = dciodvfy_errors(path)
        row: dict = {"bytes": path.stat().st_size, "dciodvfy_errors": len(errors), "dciodvfy_error_examples": errors[:3],
                     "voxels": {name: int((labels == value).sum()) for value, name in NAMES.items()},
                     "shape": list(image.shape)}
        for reader, read in (("pixel_centre", lambda p: rasterise(p, folder)),
                             ("rt_utils_reader", lambda p: read_rt_utils(folder, p))):
            if reader == "rt_utils_reader" and not rt_utils_reader:
                continue
            try:
                back = read(path)
                row[f"dice_{reader}"] = {name: round(dice(back[name], labels == value), 4)
                                         for value, name in NAMES.items()}
            except Exception as exc:  # a reader failing on the other library's file is a result too
                row[f"dice_{reader}"] = f"{type(exc).__name__}: {exc}"[:200]
        return row
    return write, check


def prepare_large(out: Path, size: int, slices: int):
    """``(write, check)`` of medseg's writer on a size x size x slices synthetic CT with two nested spheres
    (one contour per class per slice)."""
    write_ct_series(out / "large" / "series", size, slices)
    scan = find_scans([out / "large"])[0]
    image = load_scan(scan)
    labels = spheres(image.shape)
    model = ModelInfo("bench", MODEL.labels[:3])
    mask = mask_like(labels, image)
    path = out / "large.rtstruct.dcm"

    def write(repeat: int) -> None:
        RtStructWriter(model).write(scan, image, mask, path)

    def check() -> dict:
        back = rasterise(path, scan.path)
        return {"shape": list(image.shape), "bytes": path.stat().st_size, "dciodvfy_errors": len(dciodvfy_errors(path)),
                "dice_pixel_centre": {name: round(dice(back[name], labels == value), 4)
                                      for value, name in ((1, "ring"), (2, "core"))}}
    return write, check


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/dicom/series"))
    parser.add_argument("--repeats", type=int, default=harness.MIN_REPEATS)
    parser.add_argument("--json", type=Path, default=None,
                        help="write the record here (a relative path goes under docs/benchmarks/)")
    parser.add_argument("--without-rt-utils", action="store_true", help="medseg's writer only (rt-utils not installed)")
    parser.add_argument("--smoke", action="store_true",
                        help="torchio_ct_17 only and a 64x64x8 large mask: checks the script, measures nothing")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    versions: dict[str, str] = {}
    if not args.without_rt_utils:
        from importlib.metadata import version

        import cv2
        import rt_utils  # noqa: F401  (imported before timing)

        versions |= {"rt-utils": version("rt-utils"), "opencv": cv2.__version__}
    import pydicom
    import skimage

    versions |= {"pydicom": pydicom.__version__, "scikit-image": skimage.__version__}
    if shutil.which("dciodvfy") is None:
        print("dciodvfy not found (dicom3tools)", file=sys.stderr)
        return 1
    series = SERIES[:1] if args.smoke else SERIES
    writers = ("medseg",) if args.without_rt_utils else ("medseg", "rt-utils")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        prepared = {f"{name}/{writer}": prepare(args.data / name, writer, out, not args.without_rt_utils)
                    for name in series for writer in writers}
        prepared["large/medseg"] = prepare_large(out, *((64, 8) if args.smoke else (512, 300)))
        measured = harness.run_interleaved({name: write for name, (write, _) in prepared.items()}, args.repeats)
        files = {name: check() for name, (_, check) in prepared.items()}
    data = harness.record("rtstruct_libraries", measured, smoke=args.smoke, versions=versions, files=files)

    def fmt(value) -> str:
        return " / ".join(f"{v:.4f}" for v in value.values()) if isinstance(value, dict) else str(value)

    print(harness.conditions(data))
    print("| series | writer | write (s), median (min–max) | KiB | dciodvfy Error lines | "
          "Dice, pixel centres (ring / core / bright) | Dice, rt-utils' reader |")
    print("|---|---|---|---|---|---|---|")
    for name in series:
        for writer in writers:
            key = f"{name}/{writer}"
            row = files[key]
            print(f"| {name} | {writer} | {harness.cell(measured['variants'][key]['seconds'])} | {row['bytes'] / 1024:.0f} | "
                  f"{row['dciodvfy_errors']} | {fmt(row['dice_pixel_centre'])} | {fmt(row.get('dice_rt_utils_reader', '—'))} |")
    large = files["large/medseg"]
    print(f"\nmedseg on a {'x'.join(map(str, large['shape']))} mask (two spheres): "
          f"{harness.cell(measured['variants']['large/medseg']['seconds'])} s, {large['bytes'] / 2**20:.1f} MiB, "
          f"{large['dciodvfy_errors']} dciodvfy Error lines, Dice {large['dice_pixel_centre']}")
    if args.json:
        print("written:", harness.write_record(data, args.json))
    return 0


if __name__ == "__main__":
    sys.exit(main())
