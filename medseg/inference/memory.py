"""How much memory predicting one scan takes, and how much there is: refuse a scan before loading it.

A scan far larger than the machine would otherwise be killed by the kernel mid-batch with no message,
taking the rest of the batch with it. The estimate comes from the header alone (shape, voxel type,
affine -> model grid), so a refused scan is never read. Figures behind the constants: docs/benchmarks.md
("Predict speed and memory").
"""

from __future__ import annotations

import ctypes
import os
import platform
import resource
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from medseg.errors import ScanError, ScanTooLargeError
from medseg.inference.resampling import GridPlan
from medseg.io.volume import voxel_spacing

MAX_MEMORY_ENV = "MEDSEG_MAX_MEMORY_GIB"
GIB = 2**30

#: Working bytes per scan voxel beyond the scan itself: the uint8 label map, the keep-largest-component
#: mask and component map, the reoriented copy, the mask held by the background writer, and the default
#: path's statistics and QC. 10, not the 6 of the masks alone: with 6 the estimate for the largest benchmark
#: CT (512x512x300, int16) was 13.9 B/voxel while the default path then peaked at 16.1-17.5 B/voxel. With 10
#: it is 17.9, above the default path's peak since the statistics stopped copying (10.5-11.9 B/voxel;
#: docs/benchmarks.md, "Predict speed and memory"); kept with that margin, as the peak depends on the scan.
SCAN_VOXEL_BYTES = 10
#: Bytes per model-grid voxel: the float32 input (and its intensity-scaled copy), MONAI's count map and
#: the resampling buffer, plus ``MODEL_CLASS_BYTES`` per class (float32 sliding-window sum, softmax,
#: float16 copy).
MODEL_VOXEL_BYTES = 16
MODEL_CLASS_BYTES = 10


@dataclass(frozen=True)
class ScanSize:
    """What a scan will need, from its header: voxel counts on the scan and model grids, bytes in memory."""

    shape: tuple[int, ...]
    voxels: int
    itemsize: int
    model_voxels: int
    classes: int

    @property
    def scan_bytes(self) -> int:
        """The scan as loaded (stored voxel type; float32 when the header scales the values)."""
        return self.voxels * self.itemsize

    @property
    def peak_bytes(self) -> int:
        """Estimated extra memory at the peak of predicting this scan (the loaded model not included)."""
        return (self.scan_bytes + SCAN_VOXEL_BYTES * self.voxels
                + (MODEL_VOXEL_BYTES + MODEL_CLASS_BYTES * self.classes) * self.model_voxels)


def scan_size(shape: tuple[int, ...], itemsize: int, affine: np.ndarray, orientation: str,
              spacing: tuple[float, ...] | None, classes: int) -> ScanSize:
    """The :class:`ScanSize` of a scan of ``shape`` and ``affine`` for a model with this preprocessing."""
    shape = tuple(int(s) for s in shape[:3])
    plan = GridPlan.for_scan(affine, shape, orientation, spacing)
    if plan is not None:
        model_voxels = int(np.prod(plan.model_shape, dtype=np.int64))
    else:  # a voxel map MONAI resamples densely: estimate the model grid from the spacings
        zooms = voxel_spacing(affine)
        ratio = float(np.prod(zooms) / np.prod(spacing)) if spacing is not None else 1.0
        model_voxels = int(np.prod(shape, dtype=np.int64) * ratio)
    return ScanSize(shape, int(np.prod(shape, dtype=np.int64)), itemsize, model_voxels, classes)


def nifti_header_size(path: Path, orientation: str, spacing: tuple[float, ...] | None, classes: int) -> ScanSize | None:
    """The size of a NIfTI scan from its header only (no voxel is read); None when the header is unreadable
    (loading will then report the problem)."""
    try:
        img = nib.load(str(path))
        shape = tuple(int(s) for s in img.shape)
        slope, inter = img.header.get_slope_inter()
        scaled = (slope not in (None, 1.0) and not np.isnan(slope)) or (inter not in (None, 0.0) and not np.isnan(inter))
        itemsize = 4 if scaled else img.header.get_data_dtype().itemsize
        return scan_size(shape, itemsize, img.affine, orientation, spacing, classes)
    except Exception:  # a broken header is the loader's to report, with its own message
        return None


def _read_int(path: str) -> int | None:
    try:
        raw = Path(path).read_text().strip()
    except OSError:
        return None
    return int(raw) if raw.isdigit() else None  # cgroup v2 writes "max" when there is no limit


def _mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _rss() -> int:
    """This process's resident memory now (bytes); falls back to its peak where /proc is absent."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass(frozen=True)
class MemoryBudget:
    """Bytes this process may still use for one scan, and where that limit comes from (for messages)."""

    bytes: int | None
    source: str

    @classmethod
    def measure(cls, max_memory_gib: float | None = None) -> MemoryBudget:
        """The tightest of: ``max_memory_gib`` (else ``$MEDSEG_MAX_MEMORY_GIB``) less what this process uses
        now, the cgroup's limit less its usage, and the kernel's MemAvailable. None: nothing is known."""
        if max_memory_gib is None and os.environ.get(MAX_MEMORY_ENV):
            raw = os.environ[MAX_MEMORY_ENV]
            try:
                max_memory_gib = float(raw)
            except ValueError:
                raise ScanError(Path(MAX_MEMORY_ENV), f"environment variable must be a number of GiB, got {raw!r}") from None
        options: list[tuple[int, str]] = []
        if max_memory_gib is not None:
            options.append((int(max_memory_gib * GIB) - _rss(),
                            f"the memory limit of {max_memory_gib:g} GiB (--max-memory-gib / ${MAX_MEMORY_ENV}) "
                            "less what the loaded model uses"))
        limit = _read_int("/sys/fs/cgroup/memory.max") or _read_int("/sys/fs/cgroup/memory/memory.limit_in_bytes")
        usage = _read_int("/sys/fs/cgroup/memory.current") or _read_int("/sys/fs/cgroup/memory/memory.usage_in_bytes")
        if limit is not None and usage is not None and limit < 2**60:
            options.append((limit - usage, "the container's (cgroup) memory limit less its usage"))
        available = _mem_available()
        if available is not None:
            options.append((available, "the memory available on this machine (MemAvailable)"))
        if not options:
            return cls(None, "unknown")
        free, source = min(options)
        return cls(max(free, 0), source)

    def check(self, path: Path, size: ScanSize) -> None:
        """Raise :class:`ScanTooLargeError` when predicting a scan of ``size`` would not fit."""
        if self.bytes is None or size.peak_bytes <= self.bytes:
            return
        raise ScanTooLargeError(
            path,
            f"scan of shape {size.shape} ({size.scan_bytes / GIB:.2f} GiB in memory) needs about "
            f"{size.peak_bytes / GIB:.1f} GiB to predict, more than the {self.bytes / GIB:.1f} GiB left under "
            f"{self.source}; predict it on a machine with more memory, or raise the limit",
        )


#: ``MEDSEG_KEEP_FREED_MEMORY=0`` leaves glibc's malloc as it is (see :func:`keep_freed_memory`).
KEEP_FREED_MEMORY_ENV = "MEDSEG_KEEP_FREED_MEMORY"
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters, glibc's malloc.h
_asked = False
_libc: ctypes.CDLL | None = None  # glibc, once keep_freed_memory is in effect


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep memory that predict frees for its next allocations; True when in effect.

    Prediction allocates and frees arrays of tens to hundreds of MB per scan and slab. glibc serves each
    block above 32 MB with its own ``mmap`` and returns it on free, so the next one is fresh memory whose
    every page faults in again (the network's activations too); keeping them saved about 6 % of a run on
    this project's CPU machine (docs/benchmarks.md, "Keeping freed memory in predict").
    ``mallopt(M_MMAP_MAX, 0)`` takes big blocks from the heap instead and ``M_TRIM_THRESHOLD`` keeps freed
    heap memory rather than returning it after every block. Process-wide and once; other C libraries
    (musl, macOS) are left alone. Between scans :func:`release_freed_memory` gives back what is left free.
    """
    global _asked, _libc
    if not _asked:
        _asked = True
        if os.environ.get(KEEP_FREED_MEMORY_ENV, "1") != "0" and platform.libc_ver()[0] == "glibc":
            try:
                libc = ctypes.CDLL(None)
                if libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1):  # C int: 2 GiB
                    _libc = libc
            except (OSError, AttributeError):
                pass
    return _libc is not None

def release_freed_memory() -> None:
    """Give the memory that earlier scans freed back to the system (glibc ``malloc_trim``), when
    :func:`keep_freed_memory` is in effect: called as each scan starts, so blocks kept for reuse within a
    scan do not pile up across scans of different sizes (without it the 4-CT speed benchmark peaked at 14.4
    instead of about 11 bytes per voxel; docs/benchmarks.md)."""
    if _libc is not None:
        _libc.malloc_trim(0)
