"""Synthetic CT-like chest phantoms with known organs and lesions (the embedded demo data set).

Each phantom has a soft-tissue body (~40 HU) in air (-1000 HU), two lungs (~-850 HU) and a few round
"nodules" (~30 HU) of known radius inside the lungs, plus Gaussian CT noise. Labels: 0 background,
1 lung, 2 nodule. Nothing is downloaded: everything is generated from a seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from medseg.data.manifest import Manifest, ManifestCase, save_manifest
from medseg.io.nifti import save_atomic

PHANTOM_LABELS = {0: "background", 1: "lung", 2: "nodule"}


@dataclass(frozen=True)
class PhantomSpec:
    """Size of generated phantoms: voxels (x, y, z) and spacing in mm."""

    shape: tuple[int, int, int] = (64, 64, 40)
    spacing: tuple[float, float, float] = (2.5, 2.5, 3.0)
    noise_hu: float = 25.0


def make_phantom(rng: np.random.Generator, spec: PhantomSpec = PhantomSpec()) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[float]]:
    """One phantom: (image in HU int16, label uint8, RAS affine, nodule radii in mm)."""
    sx, sy, sz = spec.spacing
    nx, ny, nz = spec.shape
    # World coordinates (mm) of voxel centres, centred on the volume.
    x = (np.arange(nx) - nx / 2) * sx
    y = (np.arange(ny) - ny / 2) * sy
    z = (np.arange(nz) - nz / 2) * sz
    X, Y, Z = np.meshgrid(x, y, z, indexing="ij")
    half_x, half_y = nx * sx / 2, ny * sy / 2

    image = np.full(spec.shape, -1000.0, dtype=np.float32)
    label = np.zeros(spec.shape, dtype=np.uint8)
    body_a = half_x * rng.uniform(0.78, 0.92)
    body_b = half_y * rng.uniform(0.6, 0.78)
    body = (X / body_a) ** 2 + (Y / body_b) ** 2 <= 1.0
    image[body] = rng.uniform(30, 50)

    lungs = np.zeros(spec.shape, dtype=bool)
    for side in (-1, 1):
        cx = side * body_a * rng.uniform(0.42, 0.5)
        cy = rng.uniform(-0.1, 0.1) * body_b
        ra = body_a * rng.uniform(0.3, 0.38)
        rb = body_b * rng.uniform(0.55, 0.7)
        rc = nz * sz / 2 * rng.uniform(0.7, 0.85)
        lungs |= ((X - cx) / ra) ** 2 + ((Y - cy) / rb) ** 2 + (Z / rc) ** 2 <= 1.0
    lungs &= body
    image[lungs] = rng.uniform(-870, -830)
    label[lungs] = 1

    radii: list[float] = []
    # Nodules sit inside a lung (at least their radius from its wall), so each is a known round lesion.
    depth = ndimage.distance_transform_edt(lungs, sampling=spec.spacing)
    for _ in range(int(rng.integers(1, 4))):
        radius = float(rng.uniform(5.0, 10.0))
        candidates = np.argwhere(depth >= radius)
        if len(candidates) == 0:
            continue
        centre = candidates[rng.integers(len(candidates))]
        cx, cy, cz = x[centre[0]], y[centre[1]], z[centre[2]]
        sphere = (X - cx) ** 2 + (Y - cy) ** 2 + (Z - cz) ** 2 <= radius**2
        image[sphere] = rng.uniform(10, 50)
        label[sphere] = 2
        radii.append(radius)

    image += rng.normal(0.0, spec.noise_hu, size=spec.shape).astype(np.float32)
    affine = np.diag([sx, sy, sz, 1.0])
    affine[:3, 3] = [x[0], y[0], z[0]]
    return np.round(image).astype(np.int16), label, affine, radii


def write_phantom_dataset(root: Path, num_cases: int, seed: int = 0, spec: PhantomSpec = PhantomSpec(),
                          test_fraction: float = 0.25) -> Path:
    """Write phantoms as NIfTI under ``root/images`` and ``root/labels`` plus ``root/manifest.json``.

    The last ``test_fraction`` of cases form the test split (held out), one case of the rest validates.
    Returns the manifest path.
    """
    if num_cases < 4:
        raise ValueError(f"need at least 4 phantoms (train, val, test), got {num_cases}")
    root = Path(root)
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(num_cases):
        image, label, affine, _ = make_phantom(rng, spec)
        case_id = f"phantom_{i:03d}"
        for kind, data in (("images", image), ("labels", label)):
            img = nib.Nifti1Image(data, affine)
            img.set_qform(affine, code=1)
            img.set_sform(affine, code=1)
            save_atomic(img, root / kind / f"{case_id}.nii.gz")
        cases.append(ManifestCase(id=case_id, image=f"images/{case_id}.nii.gz", label=f"labels/{case_id}.nii.gz"))
    n_test = max(1, round(num_cases * test_fraction))
    ids = [c.id for c in cases]
    manifest = Manifest(
        name="demo-phantoms",
        description=f"{num_cases} synthetic CT chest phantoms (seed {seed}): lungs and round nodules",
        modality="CT",
        labels=PHANTOM_LABELS,
        cases=cases,
        splits={"train": ids[: -n_test - 1], "val": ids[-n_test - 1 : -n_test], "test": ids[-n_test:]},
    )
    return save_manifest(manifest, root / "manifest.json")


TWO_CHANNEL_LABELS = {0: "background", 1: "lesion"}


def make_two_channel_phantom(rng: np.random.Generator, shape: tuple[int, int, int] = (32, 32, 16),
                             spacing: tuple[float, float, float] = (2.0, 2.0, 2.0), radius_mm: float = 5.0,
                             noise: float = 10.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A phantom whose label needs both channels: (image (X, Y, Z, 2) float32, label uint8, affine).

    Round blobs of one size sit on a dark background (100) in MR-like units. A "lesion" (label 1) is bright
    (300) in both channels; decoys are bright in one channel only, three per channel per lesion. One channel
    alone shows lesions and its decoys alike, so a one-channel model cannot tell them apart.
    """
    nx, ny, nz = shape
    X, Y, Z = np.meshgrid(*(np.arange(n) * s for n, s in zip(shape, spacing, strict=True)), indexing="ij")
    image = np.full((*shape, 2), 100.0, dtype=np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    margin = radius_mm + 2 * max(spacing)
    centres: list[np.ndarray] = []
    extent = np.array(shape) * np.array(spacing)
    # 2 lesions, 3 decoys per lesion in each channel; blobs are kept apart so each is a separate object.
    kinds = [(0, 1)] * 2 + [(0,)] * 6 + [(1,)] * 6
    for channels in kinds:
        for _ in range(200):
            c = rng.uniform(margin, extent - margin)
            if all(np.linalg.norm(c - o) > 2 * radius_mm + 2 for o in centres):
                break
        else:
            continue  # no room left: fewer blobs
        centres.append(c)
        blob = (X - c[0]) ** 2 + (Y - c[1]) ** 2 + (Z - c[2]) ** 2 <= radius_mm**2
        for ch in channels:
            image[blob, ch] = 300.0
        if len(channels) == 2:
            label[blob] = 1
    image += rng.normal(0.0, noise, size=image.shape).astype(np.float32)
    affine = np.diag([*spacing, 1.0])
    return image, label, affine


def write_two_channel_nnunet(root: Path, num_cases: int, seed: int = 0, num_test: int = 1,
                             shape: tuple[int, int, int] = (32, 32, 16)) -> Path:
    """Two-channel phantoms (:func:`make_two_channel_phantom`) in nnU-Net v2 raw layout under ``root``:
    ``dataset.json``, ``imagesTr/case_XXX_0000.nii.gz`` + ``_0001``, ``labelsTr/case_XXX.nii.gz`` and
    ``num_test`` unlabelled cases in ``imagesTs/`` (their labels in ``labelsTs/``, for scoring). Returns ``root``."""
    import json

    from medseg.atomic import write_text_atomic

    root = Path(root)
    rng = np.random.default_rng(seed)
    for i in range(num_cases + num_test):
        image, label, affine = make_two_channel_phantom(rng, shape)
        case_id = f"case_{i:03d}"
        images, labels = ("imagesTr", "labelsTr") if i < num_cases else ("imagesTs", "labelsTs")
        for c in range(2):
            save_atomic(_nifti(image[..., c], affine), root / images / f"{case_id}_{c:04d}.nii.gz")
        save_atomic(_nifti(label, affine), root / labels / f"{case_id}.nii.gz")
    raw = {"name": "Dataset900_TwoChannelPhantoms", "channel_names": {"0": "T1", "1": "T2"},
           "labels": {"background": 0, "lesion": 1}, "numTraining": num_cases, "file_ending": ".nii.gz",
           "description": f"synthetic two-channel phantoms (seed {seed}): a lesion is bright in both channels"}
    write_text_atomic(root / "dataset.json", json.dumps(raw, indent=2) + "\n")
    return root


def _nifti(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return img
