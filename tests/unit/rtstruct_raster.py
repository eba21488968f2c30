"""An RT structure set read back onto its source grid, independently of medseg's reader and writer, for the
RTSTRUCT tests and bench/rtstruct_libraries.py.

Each contour goes onto the source image it references (SOP Instance UID, and frame for multi-frame files),
placed by that image's own ImagePositionPatient, ImageOrientationPatient and PixelSpacing, and is filled
by pixel centres with the even-odd rule (each contour toggles the pixels inside it, so a hole's contour
subtracts from the island around it), the usual way planar contours are rasterised.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from skimage.draw import polygon


def _uid(ds: pydicom.Dataset, keyword: str, meta_keyword: str) -> str:
    value = str(ds.get(keyword) or "")
    return value or str(ds.file_meta.get(meta_keyword) or "")


def source_planes(folder: Path) -> list[dict]:
    """Every image plane of the series in ``folder`` (single- or multi-frame), sorted along the slice normal:
    its SOP Instance UID, frame (None for single-frame), position, row/column directions and spacing."""
    planes = []
    for path in sorted(p for p in Path(folder).iterdir() if p.is_file()):
        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
        uid = _uid(ds, "SOPInstanceUID", "MediaStorageSOPInstanceUID")
        if "PerFrameFunctionalGroupsSequence" in ds:
            shared = ds.get("SharedFunctionalGroupsSequence", [pydicom.Dataset()])[0]
            for number, frame in enumerate(ds.PerFrameFunctionalGroupsSequence, start=1):
                iop = (frame.get("PlaneOrientationSequence") or shared.PlaneOrientationSequence)[0].ImageOrientationPatient
                spacing = (frame.get("PixelMeasuresSequence") or shared.PixelMeasuresSequence)[0].PixelSpacing
                ipp = frame.PlanePositionSequence[0].ImagePositionPatient
                planes.append(_plane(uid, number, ipp, iop, spacing, ds.Rows, ds.Columns))
        else:
            planes.append(_plane(uid, None, ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing,
                                 ds.Rows, ds.Columns))
    planes.sort(key=lambda p: p["distance"])
    return planes


def _plane(uid, frame, ipp, iop, spacing, rows, columns) -> dict:
    row_dir, col_dir = np.reshape(np.array(iop, float), (2, 3))
    normal = np.cross(row_dir, col_dir)
    position = np.array(ipp, float)
    return {"uid": uid, "frame": frame, "position": position, "row_dir": row_dir, "col_dir": col_dir,
            "normal": normal, "spacing": np.array(spacing, float), "rows": int(rows), "columns": int(columns),
            "distance": float(position @ normal)}


def rasterise(rtstruct: Path, folder: Path) -> dict[str, np.ndarray]:
    """ROI name -> boolean volume (columns, rows, planes along the normal) of each ROI of ``rtstruct``.

    Asserts that every contour is CLOSED_PLANAR, lies in the plane of the image it references (0.01 mm)
    and references an image of the series.
    """
    ds = pydicom.dcmread(str(rtstruct))
    planes = source_planes(folder)
    index = {(p["uid"], p["frame"]): k for k, p in enumerate(planes)}
    shape = (planes[0]["columns"], planes[0]["rows"], len(planes))
    names = {int(roi.ROINumber): str(roi.ROIName) for roi in ds.StructureSetROISequence}
    out = {}
    for item in ds.ROIContourSequence:
        volume = np.zeros(shape, bool)
        for contour in item.get("ContourSequence", []):
            assert contour.ContourGeometricType == "CLOSED_PLANAR"
            ref = contour.ContourImageSequence[0]
            frame = int(ref.ReferencedFrameNumber) if "ReferencedFrameNumber" in ref else None
            k = index[(str(ref.ReferencedSOPInstanceUID), frame)]
            plane = planes[k]
            points = np.reshape(np.array(contour.ContourData, float), (-1, 3))
            assert len(points) == int(contour.NumberOfContourPoints)
            offset = points - plane["position"]
            assert np.abs(offset @ plane["normal"]).max() < 0.01
            cols = offset @ plane["row_dir"] / plane["spacing"][1]
            rows = offset @ plane["col_dir"] / plane["spacing"][0]
            rr, cc = polygon(rows, cols, shape=(plane["rows"], plane["columns"]))
            volume[cc, rr, k] ^= True
        out[names[int(item.ReferencedROINumber)]] = volume
    return out


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean volumes (1.0 when both are empty)."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def structures(shape: tuple[int, int, int], image: np.ndarray | None = None) -> np.ndarray:
    """A label map on a scan's grid (columns, rows, slices) with holes and several islands on every slice:
    1 ``ring`` (an annulus, its hole, and a separate disc: two islands and a hole), 2 ``core`` (a disc in the
    ring's hole: an island inside a hole), and, given the scan's ``image``, 3 ``bright`` (its brightest
    tenth after a 5x5 mean, outside the other two: real anatomy's ragged borders)."""
    nx, ny, nz = shape
    x, y = np.meshgrid(np.arange(nx, dtype=float), np.arange(ny, dtype=float), indexing="ij")
    labels = np.zeros(shape, np.uint8)
    cx, cy, size = 0.35 * nx, 0.45 * ny, min(nx, ny)
    for k in range(nz):
        grow = 1.0 + 0.1 * np.sin(k)  # the shapes change from slice to slice
        r = np.hypot(x - cx, y - cy)
        ring = (r <= 0.22 * size * grow) & (r >= 0.12 * size * grow)
        island = np.hypot(x - 0.78 * nx, y - 0.7 * ny) <= 0.09 * size
        core = r <= 0.06 * size * grow
        labels[..., k][ring | island] = 1
        labels[..., k][core] = 2
    if image is not None:
        from scipy.ndimage import uniform_filter

        smooth = uniform_filter(np.asarray(image, float), size=(5, 5, 1))
        bright = (smooth > np.percentile(smooth, 90)) & (labels == 0)
        labels[bright] = 3
    return labels
