"""Scan grid <-> model grid for prediction, by reorientation views and separable linear interpolation.

The preprocessing (:func:`medseg.data.transforms.preprocessing`) reorients a scan (a permutation and
flips of its axes) and resamples it to the model spacing keeping its direction cosines. The map from
model voxels to (reoriented) scan voxels is then a scale and an offset per axis, so trilinear
interpolation factors into three 1D linear interpolations. MONAI's ``Spacingd``/``Invertd`` build a
dense float64 sampling grid (3 coordinates per output voxel) for the same result; here each axis needs
two index vectors and one weight vector, the volume is processed in slabs, and class probabilities go
back to the scan grid one class and one slab at a time with a running argmax, so neither the float32
scan nor a K x scan-sized probability array ever exists.

:class:`GridPlan` reproduces MONAI's geometry exactly (same target affine, shape, clamped "border"
padding, ``align_corners=False`` voxel-centre convention); the tests check it against the MONAI
transforms. When the voxel map is not diagonal (it never is for ``Orientationd`` + ``Spacingd``, but
a future preprocessing might make it so), :meth:`GridPlan.for_scan` returns None and the predictor
takes the MONAI path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import torch
from monai.data.utils import compute_shape_offset, zoom_affine

#: Bytes of float32 working data per slab (the slab thickness follows from the plane size). 16 MB, under
#: glibc's 32 MB mmap limit, so the heap serves the slabs again (medseg.inference.memory.keep_freed_memory).
SLAB_BYTES = 16 * 2**20
#: Off-diagonal tolerance of the voxel map, relative to its scale, below which it counts as diagonal.
DIAGONAL_TOLERANCE = 1e-6
_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


@dataclass(frozen=True)
class AxisMap:
    """Linear interpolation along one axis: output voxel j reads ``(1 - w[j]) * in[i0[j]] + w[j] * in[i1[j]]``."""

    i0: torch.Tensor  # int64 (n_out,)
    i1: torch.Tensor  # int64 (n_out,)
    w: torch.Tensor  # float32 (n_out,)

    @classmethod
    def linear(cls, n_in: int, n_out: int, scale: float, offset: float) -> AxisMap:
        """Output voxel j samples input coordinate ``scale * j + offset`` (voxel centres), clamped to the
        input extent as MONAI's "border" padding does."""
        x = np.clip(scale * np.arange(n_out, dtype=np.float64) + offset, 0.0, n_in - 1)
        i0 = np.floor(x).astype(np.int64)
        i0 = np.minimum(i0, max(n_in - 2, 0))
        i1 = np.minimum(i0 + 1, n_in - 1)
        w = x - i0
        if n_in == 1:
            w[:] = 0.0
        return cls(torch.from_numpy(i0), torch.from_numpy(i1), torch.from_numpy(w.astype(np.float32)))

    def window(self, start: int, stop: int) -> tuple[int, int, AxisMap]:
        """The part of the map for outputs ``start:stop``, re-indexed to the input range it reads."""
        i0, i1 = self.i0[start:stop], self.i1[start:stop]
        lo, hi = int(i0.min()), int(i1.max()) + 1
        return lo, hi, AxisMap(i0 - lo, i1 - lo, self.w[start:stop])

    def to(self, device: torch.device) -> AxisMap:
        return AxisMap(self.i0.to(device), self.i1.to(device), self.w.to(device))


def interpolate_axis(x: torch.Tensor, dim: int, axis: AxisMap) -> torch.Tensor:
    """``x`` linearly resampled along ``dim`` (a new tensor; float32 in, float32 out)."""
    a = x.index_select(dim, axis.i0)
    b = x.index_select(dim, axis.i1)
    shape = [1] * x.ndim
    shape[dim] = -1
    return a.lerp_(b, axis.w.view(shape))


@dataclass(frozen=True)
class GridPlan:
    """How one scan maps to the model grid: reorientation (nibabel ``ornt``) and a per-axis scale/offset.

    ``scan_shape`` is the scan's voxel shape, ``oriented_shape`` the same after reorientation,
    ``model_shape`` the model grid; ``to_model[d]`` samples the oriented scan along axis d for each
    model voxel, ``to_scan[d]`` the model grid for each oriented scan voxel.
    """

    ornt: np.ndarray
    scan_shape: tuple[int, int, int]
    oriented_shape: tuple[int, int, int]
    model_shape: tuple[int, int, int]
    model_affine: np.ndarray
    to_model: tuple[AxisMap, AxisMap, AxisMap]
    to_scan: tuple[AxisMap, AxisMap, AxisMap]

    @classmethod
    def for_scan(cls, affine: np.ndarray, shape: Sequence[int], axcodes: str,
                 spacing: Sequence[float] | None) -> GridPlan | None:
        """The plan for a scan of ``shape`` and ``affine`` under ``Orientationd(axcodes)`` then
        ``Spacingd(spacing)`` (None: no resampling), or None when the voxel map is not per-axis."""
        affine = np.asarray(affine, dtype=np.float64)
        scan_shape = tuple(int(s) for s in shape[:3])
        ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine),
                                               nib.orientations.axcodes2ornt(axcodes, _LABELS))
        oriented_affine = affine @ nib.orientations.inv_ornt_aff(ornt, scan_shape)
        oriented_shape = tuple(scan_shape[int(i)] for i in np.argsort(ornt[:, 0]))
        if spacing is None:
            model_affine, model_shape = oriented_affine, oriented_shape
        else:
            # The same calls MONAI's Spacing makes (diagonal=False keeps the direction cosines).
            model_affine = zoom_affine(oriented_affine, np.asarray(spacing, dtype=np.float64), diagonal=False)
            out_shape, offset = compute_shape_offset(oriented_shape, oriented_affine, model_affine, False)
            model_affine[:3, 3] = offset[:3]
            model_shape = tuple(int(s) for s in out_shape)
        forward = np.linalg.solve(oriented_affine, model_affine)  # model voxel -> oriented scan voxel
        scale = np.diag(forward)[:3]
        if np.abs(forward[:3, :3] - np.diag(scale)).max() > DIAGONAL_TOLERANCE * np.abs(scale).max():
            return None
        backward = np.linalg.solve(model_affine, oriented_affine)  # oriented scan voxel -> model voxel
        to_model = tuple(AxisMap.linear(oriented_shape[d], model_shape[d], scale[d], forward[d, 3]) for d in range(3))
        to_scan = tuple(AxisMap.linear(model_shape[d], oriented_shape[d], backward[d, d], backward[d, 3])
                        for d in range(3))
        return cls(ornt, scan_shape, oriented_shape, model_shape, model_affine, to_model, to_scan)  # type: ignore[arg-type]

    def _slab(self, plane: int) -> int:
        return max(1, SLAB_BYTES // (4 * max(plane, 1)))

    def scan_to_model(self, array: np.ndarray) -> torch.Tensor:
        """The scan (its own voxel order, any real dtype) on the model grid as float32 (CPU), slab by slab."""
        oriented = nib.orientations.apply_orientation(np.asarray(array).reshape(self.scan_shape), self.ornt)
        n0, n1, n2 = self.oriented_shape
        m0, m1, m2 = self.model_shape
        planes = torch.empty((m0, m1, n2), dtype=torch.float32)
        step = self._slab(n0 * n1)
        for z in range(0, n2, step):
            slab = torch.from_numpy(np.ascontiguousarray(oriented[:, :, z:z + step], dtype=np.float32))
            slab = interpolate_axis(slab, 0, self.to_model[0])
            planes[:, :, z:z + step] = interpolate_axis(slab, 1, self.to_model[1])
            del slab
        out = torch.empty((m0, m1, m2), dtype=torch.float32)
        step = self._slab(m1 * max(n2, m2))
        for x in range(0, m0, step):
            out[x:x + step] = interpolate_axis(planes[x:x + step], 2, self.to_model[2])
        return out

    def labels_on_scan(self, probabilities: torch.Tensor) -> np.ndarray:
        """Argmax label map (uint8) on the *oriented* scan grid from class probabilities (K, *model_shape).

        Each class is interpolated back (linear) slab by slab and compared with the best so far, so
        memory holds the labels plus one slab per class, never K scan-sized arrays. Ties go to the lower
        class, as ``torch.argmax`` does. ``probabilities`` may be float16 and on any device.

        Two classes take one interpolation instead of two: class 1 wins where the interpolated difference
        p1 - p0 is above 0 (linear interpolation commutes with the difference; float rounding changed 1 of
        12.6 million voxels for smooth synthetic probabilities on the lung CT's grid, none of the real CT's
        mask through the pipeline; docs/benchmarks.md), about 1.6x less CPU time.
        """
        device = probabilities.device
        maps = [m.to(device) for m in self.to_scan]
        n0, n1, n2 = self.oriented_shape
        labels = np.empty((n0, n1, n2), dtype=np.uint8)
        step = self._slab(n0 * n1)
        for z in range(0, n2, step):
            stop = min(z + step, n2)
            lo, hi, zmap = maps[2].window(z, stop)
            if probabilities.shape[0] == 2:
                d = probabilities[1, :, :, lo:hi].float() - probabilities[0, :, :, lo:hi].float()  # never in place
                d = interpolate_axis(interpolate_axis(interpolate_axis(d, 2, zmap), 1, maps[1]), 0, maps[0])
                labels[:, :, z:stop] = (d > 0).cpu().numpy()
                continue
            best: torch.Tensor | None = None
            arg = torch.zeros((n0, n1, stop - z), dtype=torch.uint8, device=device)
            for k in range(probabilities.shape[0]):
                p = interpolate_axis(probabilities[k, :, :, lo:hi].float(), 2, zmap)
                p = interpolate_axis(interpolate_axis(p, 1, maps[1]), 0, maps[0])
                if best is None:
                    best = p
                    continue
                better = p > best
                best = torch.where(better, p, best)
                arg[better] = k
            labels[:, :, z:stop] = arg.cpu().numpy()
        return labels

    def oriented_to_scan(self, labels: np.ndarray) -> np.ndarray:
        """A label map on the oriented grid back in the scan's own voxel order (C-contiguous)."""
        inverse = np.zeros_like(self.ornt)
        for axis, (target, flip) in enumerate(self.ornt):
            inverse[int(target)] = (axis, flip)
        return np.ascontiguousarray(nib.orientations.apply_orientation(labels, inverse))
