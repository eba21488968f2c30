"""Time to encode a DICOM-SEG for a 512x512x300 mask (synthetic 300-slice CT series, two classes).

Writes a synthetic series (512x512 int16 slices, 1 mm apart), then times :class:`DicomSegWriter` on it:
``build`` (reading the source headers, mapping slices to sources, highdicom encoding) and the atomic
write, for a mask with two spheres (lung-sized and nodule-sized) and for an empty mask. The NIfTI writer
on the same mask is timed beside it for scale. Prints a Markdown section; ``--json`` stores the figures.

    PYTHONPATH=$PWD python bench/dicom_seg_encode.py --json docs/benchmarks/dicom_seg_encode.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

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


def timed(fn, repeats: int) -> float:
    """Best wall time (s) of ``repeats`` calls (the machine is shared: the best run is the least disturbed)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    import highdicom  # imported before timing: its import is not encoding time

    model = ModelInfo("bench", tuple(label.model_copy(update={"code": label_code(label)})
                                     for label in label_table({0: "background", 1: "lung", 2: "nodule"})))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_ct_series(root / "in" / "series", args.size, args.slices)
        scan = find_scans([root / "in"])[0]
        image = load_scan(scan)
        results: dict[str, object] = {"shape": list(image.shape)}
        writer = DicomSegWriter(model)
        for name, labels in (("two_spheres", spheres(image.shape)), ("empty", np.zeros(image.shape, np.uint8))):
            mask = mask_like(labels, image)
            seg_path, nii_path = root / f"{name}.seg.dcm", root / f"{name}.nii.gz"
            build_s = timed(lambda mask=mask: writer.build(scan, mask), args.repeats)
            write_s = timed(lambda mask=mask, p=seg_path: writer.write(scan, image, mask, p), args.repeats)
            nifti_s = timed(lambda mask=mask, p=nii_path: NiftiMaskWriter().write(scan, image, mask, p), args.repeats)
            frames = int(pydicom.dcmread(str(seg_path), stop_before_pixels=True).NumberOfFrames)
            results[name] = {"voxels_per_class": {str(v): int((labels == v).sum()) for v in (1, 2)},
                             "seg_build_s": round(build_s, 2), "seg_build_and_write_s": round(write_s, 2),
                             "seg_frames": frames, "seg_mb": round(seg_path.stat().st_size / 2**20, 2),
                             "nifti_write_s": round(nifti_s, 2), "nifti_mb": round(nii_path.stat().st_size / 2**20, 3)}
    import torch

    results["machine"] = {"platform": platform.platform(), "python": platform.python_version(),
                          "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "highdicom": highdicom.__version__, "pydicom": pydicom.__version__}
    results["command"] = "PYTHONPATH=$PWD python " + " ".join(sys.argv)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
