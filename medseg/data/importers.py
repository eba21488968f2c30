"""Manifests for data sets already laid out for nnU-Net v2 or the Medical Segmentation Decathlon.

``medseg import nnunet DIR`` / ``medseg import msd DIR`` read ``DIR/dataset.json`` and the files it
describes, and write a manifest whose paths point at those files where they are (nothing is copied).
Both layouts are first read into a :class:`SourceDataset` (cases with one path per input channel),
then one function turns that into a manifest, so the two formats share every rule: label values
0..N-1, modality from the channel names, seeded cross-validation folds, unlabelled test cases.

Several input channels (nnU-Net's ``CASE_0000``, ``CASE_0001`` files) become multi-channel cases: one
image path per channel and the manifest's ``channels`` named from ``channel_names``.

What medseg cannot train yet is refused with the reason: nnU-Net regions (a label given as a list of
values), nnU-Net's ``ignore`` label, label values with gaps, and Decathlon multi-modal tasks (channels
in the 4th dimension of one image).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from medseg.data.folds import cross_validation_folds
from medseg.data.manifest import Manifest, ManifestCase, load_manifest, read_json_file, save_manifest
from medseg.errors import ManifestError, OutputError

Layout = Literal["nnunet", "msd"]
LAYOUTS: tuple[Layout, ...] = ("nnunet", "msd")

_CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_MR_NAMES = {"MR", "MRI", "FLAIR", "ADC", "DWI", "PD", "PDW", "SWI", "DIXON", "PERFUSION"}


@dataclass(frozen=True)
class SourceCase:
    """One case of a source data set: an image file per input channel, and a label file or none."""

    id: str
    channels: tuple[Path, ...]
    label: Path | None = None


@dataclass
class SourceDataset:
    """What a ``dataset.json`` and its folders describe, before it becomes a manifest."""

    folder: Path
    layout: Layout
    name: str
    description: str
    channel_names: list[str]
    labels: dict[int, str]
    training: list[SourceCase]
    test: list[SourceCase] = field(default_factory=list)


def modality_of(channel_names: list[str]) -> Literal["CT", "MR", "other"]:
    """The manifest modality for a data set's channel names: CT, MR (MRI, T1/T2 weightings, FLAIR,
    ADC, DWI...) when every channel agrees, otherwise ``other``."""
    kinds = {_channel_kind(n) for n in channel_names}
    return kinds.pop() if len(kinds) == 1 else "other"


def _channel_kind(name: str) -> Literal["CT", "MR", "other"]:
    n = name.strip().upper()
    if n == "CT":
        return "CT"
    if n in _MR_NAMES or re.match(r"^T[12]", n) or "MRI" in n:
        return "MR"
    return "other"


def _labels(raw: Any, path: Path) -> dict[int, str]:
    """Label values -> names from nnU-Net's ``{"name": value}`` or the Decathlon's ``{"value": "name"}``.

    Regions (a name mapped to a list of values), the ``ignore`` label and gaps in the values are refused.
    """
    if not isinstance(raw, dict) or not raw:
        raise ManifestError(f"{path}: 'labels' must be a non-empty mapping, got {raw!r}")
    labels: dict[int, str] = {}
    if all(isinstance(v, str) for v in raw.values()):  # Decathlon: "0": "background"
        for key, name in raw.items():
            try:
                labels[int(key)] = name
            except ValueError:
                raise ManifestError(f"{path}: label value {key!r} (for {name!r}) is not an integer") from None
    else:  # nnU-Net v2: "background": 0
        regions = {k: v for k, v in raw.items() if isinstance(v, list | tuple)}
        if regions:
            shown = ", ".join(f"{k} = {list(v)}" for k, v in regions.items())
            raise ManifestError(
                f"{path}: labels {shown} are nnU-Net regions (a class made of several label values); medseg "
                "trains one class per label value and does not support regions: list the values as separate "
                "labels in a copy of dataset.json, or train this data set with nnU-Net"
            )
        for name, value in raw.items():
            if name == "ignore":
                raise ManifestError(f"{path}: the nnU-Net 'ignore' label (value {value}) is not supported by "
                                    "medseg: every voxel of a label map must be a class")
            if isinstance(value, bool) or not isinstance(value, int):
                raise ManifestError(f"{path}: label {name!r} must map to an integer value, got {value!r}")
            if value in labels:
                raise ManifestError(f"{path}: labels {labels[value]!r} and {name!r} share the value {value}")
            labels[value] = name
    values = sorted(labels)
    if values != list(range(len(values))):
        raise ManifestError(f"{path}: label values must be 0..N-1 without gaps (0 = background), got {values}; "
                            "medseg does not remap label maps")
    return labels


def _channel_names(raw: Any, key: str, path: Path) -> list[str]:
    if not isinstance(raw, dict) or not raw:
        raise ManifestError(f"{path}: '{key}' must map channel numbers to names, e.g. {{\"0\": \"CT\"}}, got {raw!r}")
    try:
        order = sorted(raw, key=int)
    except ValueError:
        raise ManifestError(f"{path}: '{key}' keys must be channel numbers 0, 1, ..., got {list(raw)}") from None
    if [int(k) for k in order] != list(range(len(order))):
        raise ManifestError(f"{path}: '{key}' must number the channels 0..N-1, got {order}")
    return [str(raw[k]) for k in order]


def _case_id(name: str, source: Path) -> str:
    if not _CASE_ID.match(name):
        raise ManifestError(f"{source}: case identifier {name!r} cannot be a medseg case id "
                            "(letters, digits, '.', '_', '-'; starting with a letter or digit)")
    return name


def _hidden(path: Path) -> bool:
    """macOS resource forks (``._x.nii.gz``, found in real Decathlon downloads) and other dot files."""
    return path.name.startswith(".")


def _describe(raw: dict[str, Any], folder: Path, layout_name: str) -> str:
    parts = [str(raw[k]).strip() for k in ("description", "reference", "licence", "license", "release")
             if raw.get(k) and str(raw[k]).strip()]
    return " ".join([*(f"{p.rstrip('.')}." for p in parts), f"Imported from {folder} ({layout_name}) by medseg import."])


def _dataset_json(folder: Path, what: str, required: tuple[str, ...], layout: str,
                  other: tuple[str, str, str]) -> tuple[Path, dict]:
    """``folder/dataset.json`` as a mapping holding every ``required`` key; a file of the other layout
    (recognised by ``other``'s key) is pointed to its own import verb."""
    path = folder / "dataset.json"
    raw = read_json_file(path, what)
    if not isinstance(raw, dict):
        raise ManifestError(f"{path}: expected a JSON object")
    other_key, other_layout, other_verb = other
    for key in required:
        if key not in raw:
            hint = f" ({other_layout}? try 'medseg import {other_verb}')" if other_key in raw else ""
            raise ManifestError(f"{path}: no '{key}' key, which {layout} has{hint}")
    return path, raw


def read_nnunet(folder: Path) -> SourceDataset:
    """Read an nnU-Net v2 raw data set: ``dataset.json``, ``imagesTr/CASE_XXXX<ending>`` (one file per
    channel), ``labelsTr/CASE<ending>`` and optionally ``imagesTs/``."""
    folder = Path(folder)
    path, raw = _dataset_json(folder, "nnU-Net dataset.json", ("channel_names", "labels", "file_ending"),
                              "an nnU-Net v2 dataset.json", ("modality", "a Decathlon dataset.json", "msd"))
    channels = _channel_names(raw["channel_names"], "channel_names", path)
    labels = _labels(raw["labels"], path)
    ending = str(raw["file_ending"])
    if "dataset" in raw:
        training = _nnunet_listed_cases(raw["dataset"], folder, len(channels), path)
    else:
        images = _nnunet_channel_files(folder / "imagesTr", ending, len(channels), required=True)
        training = []
        for case_id, files in images.items():
            label = folder / "labelsTr" / f"{case_id}{ending}"
            if not label.is_file():
                raise ManifestError(f"{label}: label file of case '{case_id}' not found (its image is {files[0]})")
            training.append(SourceCase(case_id, files, label))
        orphans = sorted(p.name for p in (folder / "labelsTr").glob(f"*{ending}")
                         if not _hidden(p) and p.name.removesuffix(ending) not in images)
        if orphans:
            raise ManifestError(f"{folder / 'labelsTr'}: label files without images in imagesTr: {orphans[:5]}")
    expected = raw.get("numTraining")
    if expected is not None and expected != len(training):
        raise ManifestError(f"{path}: numTraining is {expected} but {len(training)} training cases were found in "
                            f"{folder / 'imagesTr'} (an incomplete copy?)")
    test_images = _nnunet_channel_files(folder / "imagesTs", ending, len(channels), required=False)
    test = [SourceCase(case_id, files) for case_id, files in test_images.items()]
    return SourceDataset(folder, "nnunet", str(raw.get("name") or folder.name), _describe(raw, folder, "nnU-Net v2 raw layout"),
                         channels, labels, training, test)


def _nnunet_channel_files(images_dir: Path, ending: str, num_channels: int, required: bool) -> dict[str, tuple[Path, ...]]:
    """Case id -> its channel files ``CASE_0000<ending>, CASE_0001<ending>, ...`` in ``images_dir``."""
    if not images_dir.is_dir():
        if required:
            raise ManifestError(f"{images_dir}: folder not found (an nnU-Net raw data set has imagesTr/)")
        return {}
    pattern = re.compile(rf"^(.+)_(\d{{4}}){re.escape(ending)}$")
    found: dict[str, dict[int, Path]] = {}
    for p in sorted(images_dir.iterdir()):
        if _hidden(p) or not p.name.endswith(ending):
            continue
        m = pattern.match(p.name)
        if not m:
            raise ManifestError(f"{p}: an nnU-Net image is named CASE_XXXX{ending} (XXXX the channel number)")
        found.setdefault(_case_id(m.group(1), p), {})[int(m.group(2))] = p
    cases: dict[str, tuple[Path, ...]] = {}
    for case_id, by_channel in found.items():
        missing = [images_dir / f"{case_id}_{c:04d}{ending}" for c in range(num_channels) if c not in by_channel]
        if missing:
            raise ManifestError(f"{missing[0]}: channel file of case '{case_id}' not found "
                                f"(dataset.json names {num_channels} channel(s))")
        extra = sorted(c for c in by_channel if c >= num_channels)
        if extra:
            raise ManifestError(f"{by_channel[extra[0]]}: channel {extra[0]} of case '{case_id}', but dataset.json "
                                f"names {num_channels} channel(s)")
        cases[case_id] = tuple(by_channel[c] for c in range(num_channels))
    if required and not cases:
        raise ManifestError(f"{images_dir}: no images named CASE_0000{ending}")
    return cases


def _nnunet_listed_cases(raw: Any, folder: Path, num_channels: int, path: Path) -> list[SourceCase]:
    """nnU-Net v2's optional ``"dataset": {case: {"images": [...], "label": ...}}`` (paths absolute or
    relative to the data set folder)."""
    if not isinstance(raw, dict):
        raise ManifestError(f"{path}: 'dataset' must map case ids to {{\"images\": [...], \"label\": ...}}")
    cases = []
    for case_id, entry in raw.items():
        images = entry.get("images") if isinstance(entry, dict) else None
        if not isinstance(images, list) or len(images) != num_channels or not entry.get("label"):
            raise ManifestError(f"{path}: dataset.{case_id} must give 'images' ({num_channels} file(s)) and 'label'")
        files = tuple(_existing(folder / p, f"image of case '{case_id}'", path) for p in images)
        label = _existing(folder / entry["label"], f"label of case '{case_id}'", path)
        cases.append(SourceCase(_case_id(case_id, path), files, label))
    return cases


def _existing(path: Path, what: str, listed_in: Path) -> Path:
    if not path.is_file():
        raise ManifestError(f"{path}: {what} not found (listed in {listed_in})")
    return path


def read_msd(folder: Path) -> SourceDataset:
    """Read a Medical Segmentation Decathlon task folder: ``dataset.json`` with ``modality``, ``labels``,
    ``training`` [{"image", "label"}] and ``test`` [image paths], relative to the folder. Multi-modal
    tasks keep their channels in one 4D image per case."""
    folder = Path(folder)
    path, raw = _dataset_json(folder, "Decathlon dataset.json", ("modality", "labels", "training"),
                              "a Decathlon dataset.json", ("channel_names", "an nnU-Net dataset.json", "nnunet"))
    channels = _channel_names(raw["modality"], "modality", path)
    labels = _labels(raw["labels"], path)
    if not isinstance(raw["training"], list) or not raw["training"]:
        raise ManifestError(f"{path}: 'training' must be a non-empty list of {{\"image\", \"label\"}}")
    training = []
    for i, entry in enumerate(raw["training"]):
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise ManifestError(f"{path}: training[{i}] must have 'image' and 'label', got {entry!r}")
        if _hidden(Path(entry["image"])):
            continue
        image = _existing(folder / entry["image"], f"image of training[{i}]", path)
        label = _existing(folder / entry["label"], f"label of training[{i}]", path)
        training.append(SourceCase(_case_id(_nifti_stem(image), path), (image,), label))
    test = []
    for i, entry in enumerate(raw.get("test") or []):
        rel = entry.get("image") if isinstance(entry, dict) else entry
        if not isinstance(rel, str):
            raise ManifestError(f"{path}: test[{i}] must be an image path, got {entry!r}")
        if _hidden(Path(rel)):
            continue
        image = _existing(folder / rel, f"image of test[{i}]", path)
        test.append(SourceCase(_case_id(_nifti_stem(image), path), (image,)))
    return SourceDataset(folder, "msd", str(raw.get("name") or folder.name), _describe(raw, folder, "Decathlon layout"),
                         channels, labels, training, test)


def _nifti_stem(path: Path) -> str:
    return path.name.removesuffix(".gz").removesuffix(".nii")


def _image_channels(path: Path) -> int:
    """Channels stored in one NIfTI file: the 4th dimension of a 4D image, else 1 (reads the header only)."""
    import nibabel as nib

    try:
        shape = nib.load(str(path)).shape
    except Exception as exc:  # nibabel raises several types for unreadable files
        raise ManifestError(f"{path}: not a readable NIfTI image ({exc})") from None
    return int(shape[3]) if len(shape) >= 4 else 1


def check_channel_files(source: SourceDataset) -> None:
    """Refuse channels stored in the 4th dimension of one image (Decathlon multi-modal tasks): medseg reads
    one 3D file per channel (nnU-Net layout). The first case is enough to tell, as every case has the
    same channels."""
    if source.layout != "msd" or not source.training:
        return
    count = _image_channels(source.training[0].channels[0])
    if count > 1 or len(source.channel_names) > 1:
        count = max(count, len(source.channel_names))
        raise ManifestError(f"{source.folder / 'dataset.json'}: this Decathlon task keeps {count} channels "
                            f"({', '.join(source.channel_names)}) in the 4th dimension of one image; medseg reads one "
                            "3D file per channel: split each image into CASE_0000.nii.gz, CASE_0001.nii.gz, ... "
                            "(nnU-Net layout) and use 'medseg import nnunet'")


def _relative(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` without resolving symlinks (a manifest keeps the user's paths)."""
    return Path(os.path.relpath(os.path.abspath(path), os.path.abspath(root))).as_posix()


def manifest_from_source(source: SourceDataset, manifest_path: Path, folds: int = 5, seed: int = 0,
                         name: str | None = None) -> Manifest:
    """The manifest of ``source`` as it will be saved at ``manifest_path`` (paths relative to its folder).

    Training cases go into ``folds`` seeded cross-validation folds (:func:`cross_validation_folds`) and
    ``splits`` train/val is fold 0; ``folds=0`` puts every training case in ``train`` and none in ``val``.
    Unlabelled test images are cases without labels in the ``test`` split.
    """
    check_channel_files(source)
    root = Path(manifest_path).absolute().parent
    multi = len(source.channel_names) > 1

    def image(case: SourceCase) -> str | list[str]:
        paths = [_relative(p, root) for p in case.channels]
        return paths if multi else paths[0]

    cases = [ManifestCase(id=c.id, image=image(c), label=_relative(c.label, root) if c.label else None)
             for c in (*source.training, *source.test)]
    ids = [c.id for c in cases]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise ManifestError(f"{source.folder}: case ids appear twice (training and test?): {repeated[:5]}")
    train_ids = [c.id for c in source.training]
    fold_list: list[dict[str, list[str]]] = []
    if folds:
        if len(train_ids) < folds:
            raise ManifestError(f"{source.folder}: {len(train_ids)} training cases are too few for {folds} folds; "
                                "pass a smaller --folds, or --folds 0 for no validation split")
        fold_list, _ = cross_validation_folds(train_ids, num_folds=folds, seed=seed)
        splits = {"train": fold_list[0]["train"], "val": fold_list[0]["val"]}
    else:
        splits = {"train": sorted(train_ids), "val": []}
    splits["test"] = sorted(c.id for c in source.test)
    outside = any(not (root.resolve() / p).resolve().is_relative_to(root.resolve())
                  for c in cases for p in (*c.images, c.label) if p)
    return Manifest(
        name=name or source.name,
        description=source.description,
        modality=modality_of(source.channel_names),
        labels=source.labels,
        channels=list(source.channel_names) if multi else [],
        cases=cases,
        splits=splits,
        folds=fold_list,
        allow_paths_outside_root=outside,
    )


def import_dataset(layout: Layout, folder: Path, output: Path, *, overwrite: bool = False, folds: int = 5,
                   seed: int = 0, name: str | None = None) -> Manifest:
    """Write a manifest at ``output`` for the nnU-Net or Decathlon data set in ``folder`` (files stay where
    they are); an existing ``output`` is kept unless ``overwrite``. Returns the manifest as loaded back."""
    if layout not in LAYOUTS:
        raise ManifestError(f"unknown data set layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    folder, output = Path(folder), Path(output)
    if not folder.is_dir():
        raise ManifestError(f"{folder}: data set folder not found")
    if output.exists() and not overwrite:
        raise OutputError(f"{output}: already exists (use --overwrite to replace it)")
    source = read_nnunet(folder) if layout == "nnunet" else read_msd(folder)
    manifest = manifest_from_source(source, output, folds=folds, seed=seed, name=name)
    save_manifest(manifest, output)
    return load_manifest(output)
