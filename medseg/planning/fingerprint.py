"""The data set fingerprint: what planning needs to know about the cases, read once from the scans.

Per case the scan is reoriented to RAS (the orientation the planned config trains in), so shapes and
spacings are per RAS axis. Intensity statistics are per input channel (named by the manifest's
``channels``, or its modality for one channel); foreground statistics use up to ``FOREGROUND_SAMPLES_PER_CASE`` voxels per case under the
label (any class > 0), drawn with a fixed seed, like nnU-Net's fingerprint. The result is a plain JSON
file a person can read (``Fingerprint.to_json``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cc3d
import nibabel as nib
import numpy as np
from tqdm import tqdm

from medseg.atomic import write_text_atomic
from medseg.data.manifest import Manifest, read_json_file
from medseg.errors import ManifestError, ScanError
from medseg.io.scans import load_volume

FOREGROUND_SAMPLES_PER_CASE = 10_000
FINGERPRINT_FORMAT = "medseg-fingerprint-1"


@dataclass
class CaseFingerprint:
    """One case: shape (voxels) and spacing (mm) per RAS axis, and its voxel counts per class."""

    id: str
    shape: list[int]
    spacing: list[float]
    class_voxels: dict[int, int]


@dataclass
class IntensityStats:
    """Intensity statistics of one channel, in the scan's units (HU for CT, arbitrary for MR)."""

    mean: float
    std: float
    min: float
    max: float
    percentile_00_5: float
    percentile_99_5: float
    median: float


@dataclass
class ObjectSizes:
    """Connected components (26-connected) of one class over all cases; volumes in mL."""

    count: int
    per_case_mean: float
    volume_ml_min: float
    volume_ml_median: float
    volume_ml_max: float


@dataclass
class Fingerprint:
    """Everything planning reads: geometry, intensities, class frequencies and object sizes."""

    manifest: str
    modality: str
    labels: dict[int, str]
    num_cases: int
    cases: list[CaseFingerprint]
    median_spacing: list[float]
    spacing_percentile_10: list[float]
    median_shape: list[float]
    """Median shape in voxels after resampling to the median spacing."""
    intensity_all: dict[str, IntensityStats]
    intensity_foreground: dict[str, IntensityStats]
    class_frequency: dict[int, float]
    """Share of all labelled voxels per class (background included); sums to 1."""
    object_sizes: dict[int, ObjectSizes]
    format: str = FINGERPRINT_FORMAT
    notes: list[str] = field(default_factory=list)
    channels: list[str] = field(default_factory=list)
    """Input channel names, in order (the keys of the intensity maps); empty in older files: one channel."""

    @property
    def channel_names(self) -> list[str]:
        """The input channels in order (older single-channel fingerprints: the modality)."""
        return list(self.channels) or list(self.intensity_all) or [self.modality]

    @property
    def spacings(self) -> np.ndarray:
        """(cases, 3) spacing in mm per RAS axis."""
        return np.array([c.spacing for c in self.cases], dtype=float)

    @property
    def shapes(self) -> np.ndarray:
        """(cases, 3) shape in voxels per RAS axis."""
        return np.array([c.shape for c in self.cases], dtype=float)

    def to_json(self) -> str:
        """Indented JSON; keys of per-class maps are label values as strings."""
        return json.dumps(asdict(self), indent=1) + "\n"

    def save(self, path: Path) -> Path:
        """Write the fingerprint JSON atomically."""
        return write_text_atomic(Path(path), self.to_json())


def _stats(values: np.ndarray) -> IntensityStats:
    if values.size == 0:
        return IntensityStats(*(float("nan"),) * 7)
    p005, p50, p995 = np.percentile(values, [0.5, 50.0, 99.5])
    return IntensityStats(float(values.mean()), float(values.std()), float(values.min()), float(values.max()),
                          float(p005), float(p995), float(p50))


def _ras(img: nib.Nifti1Image) -> nib.Nifti1Image:
    # Planning must see axes as training will (preprocessing reorients to RAS first).
    return nib.as_closest_canonical(img)


def _read_case(manifest: Manifest, index: int, rng: np.random.Generator) -> tuple[CaseFingerprint, list[np.ndarray], list[np.ndarray], dict[int, list[int]]]:
    """One case's geometry, and per channel an intensity sample over all voxels and one under the label."""
    case = manifest.cases[index]
    image_path, label_path = manifest.image_path(case), manifest.label_path(case)
    volume = load_volume(manifest.image_paths(case))
    image = _ras(volume.image)
    stacked = np.asarray(image.dataobj, dtype=np.float32)
    channels = [stacked[..., c] for c in range(stacked.shape[3])] if stacked.ndim == 4 else [stacked]
    data = channels[0]
    if data.ndim != 3:
        raise ScanError(image_path, f"planning needs 3D scans, this one has shape {data.shape}")
    spacing = volume.ras_spacing  # the reoriented array's axes are the RAS axes
    counts: dict[int, int] = {}
    objects: dict[int, list[int]] = {}
    fg_values = [np.empty(0, dtype=np.float32) for _ in channels]
    if label_path is not None:
        label = np.asarray(_ras(nib.load(label_path)).dataobj).astype(np.int64)
        if label.shape != data.shape:
            raise ScanError(label_path, f"label shape {label.shape} differs from image shape {data.shape} ({image_path})")
        unknown = sorted(set(np.unique(label).tolist()) - set(manifest.labels))
        if unknown:
            raise ScanError(label_path, f"label values {unknown} are not in the manifest's labels {sorted(manifest.labels)}")
        counts = {int(k): int(v) for k, v in zip(*np.unique(label, return_counts=True), strict=True)}
        # The same voxels sampled in every channel, so channels stay paired.
        fg_index = np.flatnonzero(label > 0)
        if fg_index.size > FOREGROUND_SAMPLES_PER_CASE:
            fg_index = rng.choice(fg_index, FOREGROUND_SAMPLES_PER_CASE, replace=False)
        fg_values = [ch.ravel()[fg_index] for ch in channels]
        for k in manifest.labels:
            if k == 0:
                continue
            components, n = cc3d.connected_components(label == k, connectivity=26, return_N=True)
            if n:
                objects[k] = [int(v) for v in np.bincount(components.ravel())[1:]]
    # All-voxel statistics from a subsample too, so memory stays bounded on large CT volumes.
    index = np.arange(data.size) if data.size <= 100_000 else rng.choice(data.size, 100_000, replace=False)
    samples = [ch.ravel()[index] for ch in channels]
    return CaseFingerprint(case.id, [int(s) for s in data.shape], spacing, counts), samples, fg_values, objects


def compute_fingerprint(manifest: Manifest, manifest_path: Path | str = "", progress: bool = True,
                        max_cases: int | None = None, seed: int = 0) -> Fingerprint:
    """Read every case of ``manifest`` once (or the first ``max_cases``) and summarise it.

    Cases without a label contribute geometry and intensities only.
    """
    n = len(manifest.cases) if max_cases is None else min(max_cases, len(manifest.cases))
    if n == 0:
        raise ManifestError(f"{manifest_path or manifest.name}: manifest lists no cases to plan from")
    rng = np.random.default_rng(seed)
    cases: list[CaseFingerprint] = []
    all_samples, fg_samples = [], []
    voxels_per_object: dict[int, list[float]] = {k: [] for k in manifest.labels if k != 0}
    labelled = 0
    for i in tqdm(range(n), desc="fingerprint", unit="case", disable=None if progress else True):
        case_fp, sample, fg, objects = _read_case(manifest, i, rng)
        cases.append(case_fp)
        all_samples.append(sample)
        fg_samples.append(fg)
        labelled += bool(case_fp.class_voxels)
        voxel_ml = float(np.prod(case_fp.spacing)) / 1000.0
        for k, sizes in objects.items():
            voxels_per_object[k].extend(s * voxel_ml for s in sizes)

    spacings = np.array([c.spacing for c in cases])
    median_spacing = np.median(spacings, axis=0)
    # Shape each case would have at the median spacing (what the network sees after resampling).
    resampled = np.array([np.array(c.shape) * np.array(c.spacing) / median_spacing for c in cases])
    totals: dict[int, int] = {k: 0 for k in manifest.labels}
    for c in cases:
        for k, v in c.class_voxels.items():
            totals[k] += v
    grand = sum(totals.values())
    names = manifest.channel_names
    object_sizes = {
        k: ObjectSizes(len(v), len(v) / max(1, labelled), float(np.min(v)), float(np.median(v)), float(np.max(v)))
        for k, v in voxels_per_object.items() if v
    }
    notes = [] if labelled else ["no case has a label: foreground statistics and class frequencies are empty"]
    return Fingerprint(
        manifest=str(manifest_path),
        modality=manifest.modality,
        labels=dict(manifest.labels),
        num_cases=n,
        cases=cases,
        median_spacing=[float(v) for v in median_spacing],
        spacing_percentile_10=[float(v) for v in np.percentile(spacings, 10, axis=0)],
        median_shape=[float(v) for v in np.median(resampled, axis=0)],
        intensity_all={name: _stats(np.concatenate([s[c] for s in all_samples])) for c, name in enumerate(names)},
        intensity_foreground={name: _stats(np.concatenate([s[c] for s in fg_samples])) for c, name in enumerate(names)},
        class_frequency={k: (v / grand if grand else 0.0) for k, v in totals.items()},
        object_sizes=object_sizes,
        notes=notes,
        channels=names,
    )


def _from_dict(raw: dict[str, Any]) -> Fingerprint:
    def stats(d: dict[str, Any]) -> dict[str, IntensityStats]:
        return {k: IntensityStats(**v) for k, v in d.items()}

    return Fingerprint(
        manifest=raw["manifest"], modality=raw["modality"], labels={int(k): v for k, v in raw["labels"].items()},
        num_cases=raw["num_cases"],
        cases=[CaseFingerprint(c["id"], c["shape"], c["spacing"], {int(k): v for k, v in c["class_voxels"].items()})
               for c in raw["cases"]],
        median_spacing=raw["median_spacing"], spacing_percentile_10=raw["spacing_percentile_10"],
        median_shape=raw["median_shape"], intensity_all=stats(raw["intensity_all"]),
        intensity_foreground=stats(raw["intensity_foreground"]),
        class_frequency={int(k): v for k, v in raw["class_frequency"].items()},
        object_sizes={int(k): ObjectSizes(**v) for k, v in raw["object_sizes"].items()},
        format=raw.get("format", FINGERPRINT_FORMAT), notes=list(raw.get("notes", [])),
        channels=list(raw.get("channels", [])),
    )


def load_fingerprint(path: Path) -> Fingerprint:
    """Read a fingerprint JSON written by :meth:`Fingerprint.save`; errors name the file and key."""
    path = Path(path)
    raw = read_json_file(path, "fingerprint")
    if not isinstance(raw, dict) or raw.get("format") != FINGERPRINT_FORMAT:
        raise ManifestError(f"{path}: not a medseg fingerprint (expected format {FINGERPRINT_FORMAT})")
    try:
        return _from_dict(raw)
    except (KeyError, TypeError) as exc:
        raise ManifestError(f"{path}: fingerprint is missing or has a malformed key {exc}") from None
