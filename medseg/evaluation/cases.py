"""Reading the files of one evaluation case: label maps as integer arrays, and the case's image when it lies
on the reference grid (for lesion intensities and figure backgrounds)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from medseg.errors import GeometryError, ScanError
from medseg.io.volume import Volume

#: The runner's logger, as before the split (users filter on it).
log = logging.getLogger("medseg.evaluation.runner")


def label_array(img, path: Path) -> np.ndarray:
    """Integer label values of a mask; refuses fractional or negative values (probability maps, wrong file)."""
    data = np.asanyarray(img.dataobj)
    if data.dtype.kind == "f":
        rounded = np.rint(data)
        if not np.array_equal(rounded, data):
            raise ScanError(path, "not a label map: it has non-integer values (a probability map or an image?)")
        data = rounded
    if data.dtype.kind in "fi" and data.size and data.min() < 0:
        raise ScanError(path, f"not a label map: it has negative values (min {data.min()})")
    # The smallest unsigned type that holds the labels: a whole-body CT label map stays uint8, not 4x larger.
    return data.astype(np.min_scalar_type(int(data.max()) if data.size else 0), copy=False)


def find_image(case_id: str, images_dir: Path | None, manifest_images: dict[str, Path]) -> Path | None:
    """The image of a case: ``<images_dir>/<case>.nii.gz`` or nnU-Net's ``<case>_0000.nii.gz``, else the manifest's."""
    if images_dir is not None:
        for name in (case_id, f"{case_id}_0000"):
            for suffix in (".nii.gz", ".nii"):
                if (Path(images_dir) / f"{name}{suffix}").is_file():
                    return Path(images_dir) / f"{name}{suffix}"
    return manifest_images.get(case_id)


def load_image_on_grid(path: Path | None, reference: Volume) -> np.ndarray | None:
    """The image as float32 if it lies on the reference grid (:func:`medseg.io.volume.check_same_grid`);
    ``None`` (with a warning) otherwise."""
    if path is None:
        return None
    from medseg.io.scans import load_volume

    image = load_volume(path)
    try:
        reference.check_same_grid(image, what="image", reference_what="reference")
    except GeometryError as exc:
        log.warning("image not used (intensities and overlay background left out): %s", exc)
        return None
    return np.asarray(image.image.dataobj, dtype=np.float32)
