"""Time to encode a DICOM-SEG for a 512x512x300 mask (synthetic 300-slice CT series, two classes).

Writes a synthetic series (512x512 int16 slices, 1 mm apart), then times :class:`DicomSegWriter` on it:
``build`` (reading the source headers, mapping slices to sources, highdicom encoding) and the atomic
write, for a mask with two spheres (lung-sized and nodule-sized) and for an empty mask. The NIfTI writer
on the same mask is timed beside it for scale. The six variants (3 writers x 2 masks) run through
bench/harness.py: interleaved, ``--repeats`` rounds, median and min-max. Prints a Markdown table;
``--json`` stores the record (a relative path goes under docs/benchmarks/).

    PYTHONPATH=$PWD python bench/dicom_seg_encode.py --json dicom_seg_encode.json
    PYTHONPATH=$PWD python bench/dicom_seg_encode.py --smoke --json /tmp/dicom_seg_encode.json   # checks the script
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import harness  # bench/ is this script's folder, first on sys.path
import numpy as np
import pydicom
from pydicom.uid import generate_uid

from medseg.data.labels import label_code, label_table
from medseg.io.mask_writers import DicomSegWriter, ModelInfo, NiftiMaskWriter
from medseg.io.nifti import mask_like
from medseg.io.scans import find_scans, load_scan
from tests.unit.dicom_synth import write_slice  # the synthetic CT slices the DICOM tests use


def write_ct_series(folder: Path, size: int, slices: int) -> None:
    """``slices`` axial CT slices of size x size pixels (0.7 mm pixels, 1 mm apart), constant pixels."""
    series, frame = generate_uid(), generate_uid()
    pixels = np.zeros((size, size), np.int16)
    for k in range(slices):
        write_slice(folder / f"slice_{k:04d}.dcm", position=[-180.0, -180.0, float(k)], pixels=pixels,
                    series_uid=series, pixel_spacing=(0.7, 0.7), instance=k + 1, FrameOfReferenceUID=frame)


def spheres(shape: tuple[int, int, int]) -> np.ndarray:
    """Class 1: a sphere of radius 0.35 x the in-plane size; class 2: a small sphere inside it."""
    i, j, k = np.ogrid[: shape[0], : shape[1], : shape[2]]
    centre = np.array(shape) / 2
    r2 = (i - centre[0]) ** 2 + (j - centre[1]) ** 2 + (k - centre[2]) ** 2
    labels = (r2 < (0.35 * shape[0]) ** 2).astype(np.uint8)
    labels[r2 < 20**2] = 2
    return labels


MASKS = ("two_spheres", "empty")
WRITERS = ("seg_build", "seg_build_and_write", "nifti_write")


def table(data: dict) -> str:
    """The Markdown table of docs/benchmarks.md: seconds as median (min-max) over the repeats."""
    shape = "x".join(map(str, data["shape"]))
    lines = [f"| mask {shape} | SEG build (s) | SEG build + write (s) | SEG frames | SEG size (MiB) | NIfTI write (s) | "
             "NIfTI size (MiB) |", "|---|---|---|---|---|---|---|"]
    for mask in MASKS:
        v, f = data["variants"], data["files"][mask]
        lines.append(f"| {mask} | {harness.cell(v[f'{mask}/seg_build']['seconds'])} | "
                     f"{harness.cell(v[f'{mask}/seg_build_and_write']['seconds'])} | {f['seg_frames']} | "
                     f"{f['seg_mb']:.1f} | {harness.cell(v[f'{mask}/nifti_write']['seconds'])} | {f['nifti_mb']:.2f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=harness.MIN_REPEATS)
    parser.add_argument("--json", type=Path, default=None,
                        help="write the record here (a relative path goes under docs/benchmarks/)")
    parser.add_argument("--smoke", action="store_true", help="a 64x64x8 series: checks the script, measures nothing")
    args = parser.parse_args()
    if args.smoke:
        args.size, args.slices = 64, 8
    import highdicom  # imported before timing: its import is not encoding time

    model = ModelInfo("bench", tuple(label.model_copy(update={"code": label_code(label)})
                                     for label in label_table({0: "background", 1: "lung", 2: "nodule"})))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_ct_series(root / "in" / "series", args.size, args.slices)
        scan = find_scans([root / "in"])[0]
        image = load_scan(scan)
        writer = DicomSegWriter(model)
        labels = {"two_spheres": spheres(image.shape), "empty": np.zeros(image.shape, np.uint8)}
        masks = {name: mask_like(values, image) for name, values in labels.items()}

        def variant(mask: str, what: str):
            seg, nii = root / f"{mask}.seg.dcm", root / f"{mask}.nii.gz"
            calls = {"seg_build": lambda: writer.build(scan, masks[mask]),
                     "seg_build_and_write": lambda: writer.write(scan, image, masks[mask], seg),
                     "nifti_write": lambda: NiftiMaskWriter().write(scan, image, masks[mask], nii)}

            def run(repeat: int) -> None:
                calls[what]()
            return run

        measured = harness.run_interleaved({f"{m}/{w}": variant(m, w) for m in MASKS for w in WRITERS}, args.repeats)
        files = {}
        for mask in MASKS:
            seg, nii = root / f"{mask}.seg.dcm", root / f"{mask}.nii.gz"
            files[mask] = {"voxels_per_class": {str(v): int((labels[mask] == v).sum()) for v in (1, 2)},
                           "seg_frames": int(pydicom.dcmread(str(seg), stop_before_pixels=True).NumberOfFrames),
                           "seg_mb": round(seg.stat().st_size / 2**20, 2), "nifti_mb": round(nii.stat().st_size / 2**20, 3)}
    data = harness.record("dicom_seg_encode", measured, shape=list(image.shape), smoke=args.smoke, files=files,
                          versions={"highdicom": highdicom.__version__, "pydicom": pydicom.__version__})
    print(json.dumps(data, indent=2))
    print(table(data))
    if args.json:
        print("written:", harness.write_record(data, args.json))
    return 0


if __name__ == "__main__":
    sys.exit(main())
