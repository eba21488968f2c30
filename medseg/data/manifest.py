"""Data manifests: a JSON file listing cases (image and label paths relative to the manifest) and splits.

Example (see ``data_manifests/example.json``)::

    {
      "name": "lung-phantoms",
      "modality": "CT",
      "labels": {"0": "background", "1": "lung", "2": "nodule"},
      "cases": [{"id": "case_000", "image": "images/case_000.nii.gz", "label": "labels/case_000.nii.gz"}],
      "splits": {"train": ["case_000"], "val": [], "test": []}
    }

Multi-channel cases (T1/T2, CT+PET) list one file per channel, all on one voxel grid, and the manifest
may name the channels: ``"channels": ["T1", "T2"]``, ``"image": ["t1/case_000.nii.gz", "t2/case_000.nii.gz"]``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from medseg.data.labels import LabelCode
from medseg.errors import ManifestError

if TYPE_CHECKING:
    from medseg.io.scans import Scan


class ManifestCase(BaseModel):
    """One case: an image (NIfTI file or DICOM series folder), or a list of them (one per input channel, on
    one voxel grid), and optionally its label map (on the first channel's grid)."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    image: str | list[str] = Field(description="image path, or one path per input channel")
    label: str | None = None

    @field_validator("image")
    @classmethod
    def _some_image(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and not v:
            raise ValueError("a list of channel images needs at least one path")
        return v

    @property
    def images(self) -> list[str]:
        """The case's image paths as written, one per channel."""
        return [self.image] if isinstance(self.image, str) else list(self.image)


class Manifest(BaseModel):
    """A data set: cases, label names (value -> name) and named splits of case ids."""

    model_config = ConfigDict(extra="forbid")
    name: str
    description: str = ""
    modality: Literal["CT", "MR", "other"] = "CT"
    labels: dict[int, str]
    label_codes: dict[int, LabelCode] = Field(
        default_factory=dict,
        description="coded concept (category and type, e.g. SCT codes) per label value, for DICOM-SEG segments; "
                    "labels left out get a default from their name (docs/dicom.md)",
    )
    channels: list[str] = Field(default_factory=list,
                                description="names of the input channels (e.g. T1, T2); every case lists that many images")
    cases: list[ManifestCase]
    splits: dict[str, list[str]] = Field(default_factory=dict)
    folds: list[dict[str, list[str]]] = Field(default_factory=list)
    allow_paths_outside_root: bool = Field(
        default=False,
        description="accept case paths outside the manifest's folder ('..', absolute paths, symlinks out)",
    )
    _root: Path = PrivateAttr(default=Path("."))

    @field_validator("labels")
    @classmethod
    def _background_is_zero(cls, labels: dict[int, str]) -> dict[int, str]:
        if 0 not in labels:
            raise ValueError("labels must name value 0 (background)")
        if sorted(labels) != list(range(len(labels))):
            raise ValueError(f"label values must be 0..N-1 without gaps, got {sorted(labels)}")
        return labels

    @model_validator(mode="after")
    def _ids_unique_and_splits_known(self) -> Manifest:
        ids = [c.id for c in self.cases]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"case ids must be unique, repeated: {dup}")
        unknown_codes = sorted(set(self.label_codes) - set(self.labels))
        if unknown_codes:
            raise ValueError(f"label_codes name values that are not labels: {unknown_codes}")
        counts = sorted({len(c.images) for c in self.cases})
        if len(counts) > 1:
            odd = next(c for c in self.cases if len(c.images) != len(self.cases[0].images))
            raise ValueError(f"every case must list the same number of channel images: case '{self.cases[0].id}' has "
                             f"{len(self.cases[0].images)}, case '{odd.id}' has {len(odd.images)}")
        if self.channels and counts and counts[0] != len(self.channels):
            raise ValueError(f"'channels' names {len(self.channels)} channel(s) ({', '.join(self.channels)}) but cases "
                             f"list {counts[0]} image(s) each")
        known = set(ids)
        for name, members in [*self.splits.items(), *((f"folds[{i}].{k}", v) for i, f in enumerate(self.folds) for k, v in f.items())]:
            unknown = [m for m in members if m not in known]
            if unknown:
                raise ValueError(f"split '{name}' names unknown cases: {unknown[:5]}")
        return self

    @property
    def root(self) -> Path:
        """The folder the manifest's relative paths start from (the manifest file's folder)."""
        return self._root

    @property
    def num_classes(self) -> int:
        """Number of classes including background."""
        return len(self.labels)

    @property
    def num_channels(self) -> int:
        """Input channels per case (images listed per case; 1 for a plain image path)."""
        if self.channels:
            return len(self.channels)
        return len(self.cases[0].images) if self.cases else 1

    @property
    def channel_names(self) -> list[str]:
        """The channels' names: ``channels``, or the modality for one channel, or ``channel_N``."""
        if self.channels:
            return list(self.channels)
        n = self.num_channels
        return [self.modality] if n == 1 else [f"channel_{i}" for i in range(n)]

    def image_path(self, case: ManifestCase) -> Path:
        """Absolute path of a case's image (its first channel's, whose grid labels and masks share)."""
        return (self.root / case.images[0]).resolve()

    def image_paths(self, case: ManifestCase) -> list[Path]:
        """Absolute paths of a case's channel images, in channel order."""
        return [(self.root / p).resolve() for p in case.images]

    def label_path(self, case: ManifestCase) -> Path | None:
        """Absolute path of a case's label map, if it has one."""
        return (self.root / case.label).resolve() if case.label else None

    def case_image(self, case: ManifestCase):
        """A case's image as a model takes it (nibabel image): one scan, or its channel files stacked
        (X, Y, Z, C) on the first channel's grid (:func:`medseg.io.scans.load_volume`)."""
        from medseg.io.scans import load_volume

        return load_volume(self.image_paths(case)).image

    def labelled(self, name: str, fold: int | None = None) -> list[ManifestCase]:
        """The cases of split ``name`` (of fold ``fold`` when given) that have a label: what QC limits and
        the bf16 parity check are set from."""
        return [c for c in self.split(name, fold) if c.label]

    def split(self, name: str, fold: int | None = None) -> list[ManifestCase]:
        """Cases of split ``name`` ("train", "val", "test"), or of fold ``fold`` when given."""
        if fold is not None:
            if not 0 <= fold < len(self.folds):
                raise ManifestError(f"manifest '{self.name}' has {len(self.folds)} folds; fold {fold} does not exist")
            members = self.folds[fold].get(name, [])
        else:
            members = self.splits.get(name, [])
        by_id = {c.id: c for c in self.cases}
        return [by_id[i] for i in members]


def read_json_file(path: Path, what: str = "manifest") -> Any:
    """Parse a JSON file; a missing or malformed file is a ManifestError naming it (``what`` says what it is)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"{path}: {what} not found") from None
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc})") from None


def load_manifest(path: Path) -> Manifest:
    """Read and validate a manifest; errors name the file and the offending field."""
    path = Path(path)
    raw = read_json_file(path)
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}" for e in exc.errors())
        raise ManifestError(f"{path}: invalid manifest: {problems}") from None
    manifest._root = path.resolve().parent
    if not manifest.allow_paths_outside_root:
        check_paths_inside_root(manifest, path)
    missing = [str(p) for c in manifest.cases for p in (*manifest.image_paths(c), manifest.label_path(c))
               if p and not p.exists()]
    if missing:
        raise ManifestError(f"{path}: {len(missing)} listed file(s) do not exist, e.g. {missing[:3]}")
    return manifest


def check_paths_inside_root(manifest: Manifest, path: Path) -> None:
    """Refuse case paths that lead outside the manifest's folder once resolved (``..``, absolute
    paths elsewhere, symlinks pointing out), so a manifest cannot quietly read files it does not ship."""
    root = manifest.root.resolve()
    for case in manifest.cases:
        for key, raw in (*(("image", p) for p in case.images), ("label", case.label)):
            if raw is None:
                continue
            resolved = (root / raw).resolve()
            if not resolved.is_relative_to(root):
                raise ManifestError(
                    f"{path}: case '{case.id}' {key} '{raw}' resolves to {resolved}, outside the manifest's folder "
                    f"{root}; move the data under it or set \"allow_paths_outside_root\": true in the manifest"
                )


def check_case_geometry(manifest: Manifest, case: ManifestCase) -> None:
    """Load a case's image and label and refuse a label off the image's grid or with undeclared values,
    or channel images off the first channel's grid.

    Reads the scans: call it once per case (e.g. when caching), not on every epoch.
    """
    from medseg.io.geometry import check_label_matches_image
    from medseg.io.scans import load_scan, load_volume

    label_path = manifest.label_path(case)
    paths = manifest.image_paths(case)
    if len(paths) == 1 and label_path is None:
        return
    image = load_volume(paths)  # stacking checks every channel against the first's grid
    if label_path is None:
        return
    label = load_scan(label_path)
    check_label_matches_image(image.image, label, set(manifest.labels), label_path)


def save_manifest(manifest: Manifest, path: Path) -> Path:
    """Write a manifest as indented JSON (atomically)."""
    from medseg.atomic import write_text_atomic

    data = manifest.model_dump(mode="json")
    return write_text_atomic(Path(path), json.dumps(data, indent=2) + "\n")


def split_scans(manifest: Manifest, split: str, fold: int | None = None) -> list[Scan]:
    """The cases of a split (or of fold ``fold``'s split) as prediction inputs, named by their manifest case ids.

    A multi-channel case becomes one scan holding its channel files in channel order (what
    :func:`medseg.io.scans.find_scans` makes of nnU-Net-named files); a DICOM series folder is one scan.
    An unknown split or an empty one is a :class:`ManifestError` naming the splits the manifest has.
    """
    from medseg.io.scans import Scan

    cases = manifest.split(split, fold)
    if not cases:
        known = sorted(manifest.folds[fold]) if fold is not None else sorted(k for k, v in manifest.splits.items() if v)
        where = f"fold {fold} of manifest '{manifest.name}'" if fold is not None else f"manifest '{manifest.name}'"
        raise ManifestError(f"{where} has no cases in split '{split}' (splits with cases: {', '.join(known) or 'none'})")
    scans = []
    for case in cases:
        paths = manifest.image_paths(case)
        kind = "dicom" if paths[0].is_dir() else "nifti"
        scans.append(Scan(case.id, paths[0], kind, None, tuple(paths) if len(paths) > 1 else ()))
    return scans
