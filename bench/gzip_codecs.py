"""gzip codecs for NIfTI reads and mask writes: zlib (Python's gzip, what nibabel uses) vs ISA-L (isal) vs
zlib-ng, interleaved repeats through bench/harness.py.

The inputs are what ``medseg predict`` reads and writes on the speed benchmark's CTs: a real chest CT
(../shared/data/lung_ct/lung1_ct.nii.gz, 512x512x48, int16) stacked to 512x512x200 along z as
bench/predict_speed.py builds it, and a label map of the same grid (a window of the CT's intensities:
large smooth regions, as masks are). Decompression reads the whole gzip stream (CRC checked); compression
writes level 1, medseg's level for NIfTI outputs (medseg.io.nifti.GZIP_LEVEL). Each variant's output is
checked against zlib's (same bytes after decompression).

    PYTHONPATH=$PWD python bench/gzip_codecs.py --json gzip_codecs.json
"""

from __future__ import annotations

import argparse
import gzip
import io
import time
from pathlib import Path

import harness  # bench/ is this script's folder, first on sys.path
import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
LUNG = REPO.parent / "shared" / "data" / "lung_ct" / "lung1_ct.nii.gz"


def inputs(slices: int) -> tuple[bytes, bytes]:
    """(the CT as .nii.gz bytes at zlib level 1, the mask as uncompressed .nii bytes)."""
    from predict_speed import _resample_z  # the same stacked CT as the speed benchmark

    data, affine = _resample_z(nib.load(LUNG), slices)
    mask = ((data > -500) & (data < 200)).astype(np.uint8)
    scan = nib.Nifti1Image(data, affine)
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=1, mtime=0) as f:
        f.write(scan.to_bytes())
    return buffer.getvalue(), nib.Nifti1Image(mask, affine).to_bytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=harness.MIN_REPEATS)
    parser.add_argument("--json", type=Path, default=None, help="record (relative: under docs/benchmarks/)")
    args = parser.parse_args()
    from isal import igzip
    from zlib_ng import gzip_ng

    scan, mask = inputs(args.slices)
    plain = gzip.decompress(scan)
    codecs = {"zlib": gzip, "isal": igzip, "zlib-ng": gzip_ng}
    sizes: dict[str, int] = {}

    def reading(module):
        def run(_: int) -> dict[str, float]:
            start = time.perf_counter()
            out = module.decompress(scan)
            seconds = time.perf_counter() - start
            assert out == plain
            return {"seconds": seconds}
        return run

    def writing(name, module):
        def run(_: int) -> dict[str, float]:
            start = time.perf_counter()
            out = module.compress(mask, 1)
            seconds = time.perf_counter() - start
            assert gzip.decompress(out) == mask
            sizes[name] = len(out)
            return {"seconds": seconds, "bytes": len(out)}
        return run

    variants = {f"read {name}": reading(m) for name, m in codecs.items()}
    variants |= {f"write {name} level 1": writing(name, m) for name, m in codecs.items()}
    results = harness.run_interleaved(variants, args.repeats)
    data = harness.record("gzip_codecs", results, scan_gzip_bytes=len(scan), scan_bytes=len(plain),
                          mask_bytes=len(mask), slices=args.slices,
                          speedup={"read isal vs zlib": harness.ratio(results, "read zlib", "read isal"),
                                   "read zlib-ng vs zlib": harness.ratio(results, "read zlib", "read zlib-ng"),
                                   "write isal vs zlib": harness.ratio(results, "write zlib level 1", "write isal level 1"),
                                   "write zlib-ng vs zlib": harness.ratio(results, "write zlib level 1",
                                                                          "write zlib-ng level 1")})
    if args.json:
        print("wrote", harness.write_record(data, args.json))
    for name, v in results["variants"].items():
        print(f"{name:24s} {harness.cell(v['seconds'], 3, ' s')}")
    print(data["speedup"])


if __name__ == "__main__":
    main()
