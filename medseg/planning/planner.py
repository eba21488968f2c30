"""Automatic experiment planning: a fingerprint in, a complete, commented experiment YAML out.

The rules follow nnU-Net v2's experiment planner (Isensee et al., Nature Methods 2021), simplified:

- target spacing: the median spacing; when the data are anisotropic (max/min median spacing > 3) the
  coarse axis takes the 10th percentile of its spacings instead (but stays coarser than the others);
- 2D vs 3D: 3D unless strongly anisotropic with so few slices along the coarse (axial) axis that a
  3D network could pool it at most once;
- patch: the median image shape at the target spacing, shrunk (largest axis relative to the median
  shape first) until a batch of 2 fits the memory budget, then rounded up to what the pooling needs;
- topology: an axis is pooled (stride 2) while its feature map is larger than ``MIN_FEATURE_MAP``
  voxels and its spacing is at most twice the finest current spacing, so a coarse axis waits until the
  others catch up; kernels are 1 along axes still more than twice as coarse as the finest (as nnU-Net);
- batch: as large as the memory budget allows, at most 5 % of all voxels of the data set per batch;
- intensity: CT is clipped to the foreground 0.5/99.5 percentiles and z-scored with the foreground
  mean/std (``ct_zscore``); MR and other modalities are z-scored per volume (``zscore``).

Memory estimate (stated so it can be checked): a U-Net stores about ``ACTIVATION_TENSORS_PER_LEVEL``
float32 tensors of each level's feature map for the backward pass (two convolutions, each with its
output, normalisation and activation, in encoder and decoder), so
``bytes = 4 * batch * 12 * sum_levels(voxels_level * channels_level) + 16 * parameters``
(weights, gradients, momentum and a spare copy). For nnU-Net's 128^3, 32-feature, batch-2 3D plan this
gives 8.6 GB, close to the ~8 GB nnU-Net budgets for it. The budget is 75 % of the GPU's memory when
CUDA is present, else ``CPU_BUDGET_GIB`` (CPU training is compute-bound long before memory-bound).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from medseg.config import ExperimentConfig, config_from_dict, parse_yaml
from medseg.errors import ConfigError
from medseg.planning.fingerprint import Fingerprint

ANISOTROPY_RATIO = 3.0
MIN_FEATURE_MAP = 8
FEW_SLICES_FOR_2D = 16
MAX_STAGES = {2: 6, 3: 5}
MAX_FEATURES = {2: 512, 3: 320}
MAX_PATCH = {2: 512, 3: 256}
ACTIVATION_TENSORS_PER_LEVEL = 12
CPU_BUDGET_GIB = 2.0
# On CPU a step's time, not memory, is the limit: a quarter of the FLOPs (16 instead of 32 base features)
# and the smallest batch nnU-Net allows give the most parameter updates per minute.
CPU_BASE_FEATURES = 16
CPU_MAX_BATCH = 2
# nnU-Net's 1000 x 250 steps take weeks on a CPU. A CPU plan trains for a wall-clock budget instead (the
# issue's 2 h per fold), with the lr decay spread over it, in short epochs so that validation (every
# CPU_VAL_INTERVAL epochs; on hippocampus about 9 s for 34 cases against ~80 s of training) samples the
# curve without costing much.
CPU_TIME_BUDGET_MIN = 120.0
CPU_ITERATIONS_PER_EPOCH = 60
CPU_VAL_INTERVAL = 2
GPU_BUDGET_SHARE = 0.75
MAX_BATCH_SHARE_OF_DATASET = 0.05


@dataclass
class PlanOptions:
    """Choices that are not read from the data: names, budget and network width."""

    name: str
    output_dir: str | None = None
    """Run folder written into the config; default ``runs/<name>``."""
    memory_gib: float | None = None
    """Memory budget for one training step (GiB); None: 75 % of the GPU, or 2 GiB on CPU."""
    base_features: int | None = None
    """Channels of the top level, doubled per level up to 320 (3D) / 512 (2D) as nnU-Net; None: 32 for
    CUDA (nnU-Net), ``CPU_BASE_FEATURES`` on CPU, where training is compute-bound."""
    cuda: bool | None = None
    """Plan for a CUDA machine; None: whether this machine has one."""


@dataclass
class Topology:
    """Pooling and kernels per level (one entry per spatial axis), and the patch they fit."""

    patch: list[int]
    strides: list[list[int]]
    """One entry per level below the top."""
    kernels: list[list[int]]
    """One entry per level, top included."""

    @property
    def divisor(self) -> list[int]:
        """What each patch axis must be a multiple of (product of its strides)."""
        return [int(np.prod([s[a] for s in self.strides])) if self.strides else 1 for a in range(len(self.patch))]


@dataclass
class Plan:
    """The planned values with, for each, a note saying where it came from; ``yaml_text`` renders both."""

    values: dict[str, Any]
    notes: dict[str, str] = field(default_factory=dict)
    header: list[str] = field(default_factory=list)

    def yaml_text(self) -> str:
        """The config as YAML with a comment on each planned value."""
        lines = [f"# {h}" if h else "#" for h in self.header]
        for key, value in self.values.items():
            lines.extend(_render(key, value, self.notes, key, 0))
        return "\n".join(lines) + "\n"

    def config(self, source: str = "<plan>") -> ExperimentConfig:
        """Validate the rendered YAML (as ``load_config`` would read it back)."""
        return config_from_dict(parse_yaml(self.yaml_text()), source)


def _flow(value: Any) -> str:
    # JSON is valid YAML flow syntax, and unlike yaml.safe_dump it never adds document markers.
    return json.dumps(value)


def _render(key: str, value: Any, notes: dict[str, str], path: str, depth: int) -> list[str]:
    pad = "  " * depth
    note = notes.get(path)
    if isinstance(value, dict) and depth == 0:
        lines = [f"{pad}{key}:" + (f"   # {note}" if note else "")]
        for k, v in value.items():
            lines.extend(_render(k, v, notes, f"{path}.{k}", depth + 1))
        return lines
    return [f"{pad}{key}: {_flow(value)}" + (f"   # {note}" if note else "")]


def memory_budget(options: PlanOptions) -> tuple[float, str, bool]:
    """The memory budget in bytes for one training step, a sentence saying where it came from, and
    whether the plan is for CUDA."""
    import torch

    cuda = torch.cuda.is_available() if options.cuda is None else options.cuda
    if options.memory_gib is not None:
        return options.memory_gib * 2**30, f"{options.memory_gib:g} GiB given with --memory-gib", cuda
    if cuda and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        return GPU_BUDGET_SHARE * total, (f"{GPU_BUDGET_SHARE:.0%} of {torch.cuda.get_device_name(0)} "
                                          f"({total / 2**30:.0f} GiB)"), True
    if cuda:
        return 8 * 2**30, "8 GiB (planned for CUDA on a machine without one: nnU-Net's default budget)", True
    return CPU_BUDGET_GIB * 2**30, f"{CPU_BUDGET_GIB:g} GiB CPU budget (no CUDA here)", False


def target_spacing(fp: Fingerprint) -> tuple[list[float], str]:
    """Target spacing in mm per RAS axis: the median, with the anisotropy rule for the coarse axis."""
    median = np.array(fp.median_spacing, dtype=float)
    ratio = float(median.max() / median.min())
    if ratio <= ANISOTROPY_RATIO:
        return [float(v) for v in median], f"median spacing of {fp.num_cases} cases (max/min {ratio:.2f} <= {ANISOTROPY_RATIO:g})"
    coarse = int(np.argmax(median))
    others = [float(median[a]) for a in range(3) if a != coarse]
    # The 10th percentile keeps more of the through-plane detail that most cases have; it must still be
    # the coarse axis, or the anisotropy handling below would pick another one.
    value = max(float(fp.spacing_percentile_10[coarse]), max(others) + 1e-5)
    spacing = [float(v) for v in median]
    spacing[coarse] = value
    return spacing, (f"median spacing, axis {coarse} anisotropic (max/min {ratio:.2f} > {ANISOTROPY_RATIO:g}): "
                     f"its 10th percentile {fp.spacing_percentile_10[coarse]:.3g} mm")


def plan_topology(patch: list[int], spacing: list[float], spatial_dims: int) -> Topology:
    """Strides and kernels for ``patch`` at ``spacing`` (mm), then the patch rounded up to fit them."""
    current = list(patch)
    for _ in range(4):  # rounding up can allow one more pooling step; it settles in one or two rounds
        size, sp = [float(v) for v in current], [float(v) for v in spacing]
        strides: list[list[int]] = []
        kernels = [_kernel(sp)]
        while len(strides) < MAX_STAGES[spatial_dims]:
            can_pool = [a for a in range(spatial_dims) if size[a] > MIN_FEATURE_MAP]
            if not can_pool:
                break
            finest = min(sp[a] for a in can_pool)
            stride = [2 if a in can_pool and sp[a] <= 2 * finest else 1 for a in range(spatial_dims)]
            size = [size[a] / stride[a] for a in range(spatial_dims)]
            sp = [sp[a] * stride[a] for a in range(spatial_dims)]
            strides.append(stride)
            kernels.append(_kernel(sp))
        topo = Topology(current, strides, kernels)
        rounded = [int(math.ceil(p / d) * d) for p, d in zip(current, topo.divisor, strict=True)]
        if rounded == current:
            return topo
        current = rounded
    return Topology(current, strides, kernels)


def _kernel(spacing: list[float]) -> list[int]:
    finest = min(spacing)
    return [3 if s <= 2 * finest else 1 for s in spacing]


def _channel_intensity(fp: Fingerprint, channel: str, is_ct: bool) -> tuple[dict[str, Any], str]:
    """Normalisation of one input channel: CT clipped to its foreground 0.5/99.5 percentiles and z-scored
    with its foreground mean/std; other channels (MR, PET...) z-scored per volume."""
    if is_ct:
        fg = fp.intensity_foreground.get(channel)
        if fg is None or not np.isfinite(fg.mean):
            raise ConfigError(f"{fp.manifest}: CT normalisation needs foreground intensities, but no case has a label")
        intensity = {"kind": "ct_zscore", "a_min": round(fg.percentile_00_5, 2), "a_max": round(fg.percentile_99_5, 2),
                     "mean": round(fg.mean, 4), "std": round(max(fg.std, 1e-3), 4)}
        return intensity, "CT: clip to foreground 0.5/99.5 percentiles (HU), z-score with foreground mean/std"
    return ({"kind": "zscore", "nonzero": False},
            f"{channel}: intensities have no absolute scale, so each volume is z-scored on its own")


def _is_ct_channel(name: str, modality: str) -> bool:
    """A channel holds HU when its name says CT (``CT``, ``ct_venous``); a name saying MR or PET does not;
    any other name (``arterial``, ``channel_0``) follows the manifest's modality."""
    from medseg.data.importers import modality_of

    tokens = set(re.split(r"[^A-Z0-9]+", name.upper()))
    if "CT" in tokens:
        return True
    if modality_of([name]) == "MR" or "PET" in tokens:
        return False
    return modality == "CT"


def _plan_intensity(fp: Fingerprint) -> tuple[dict[str, Any] | list[dict[str, Any]], str]:
    """One normalisation for a single channel (or several channels all z-scored per volume, which
    ``zscore`` does channel by channel); a list, one per channel, when a channel is CT among several."""
    names = fp.channel_names
    if len(names) == 1:
        return _channel_intensity(fp, names[0], fp.modality == "CT")
    planned = [_channel_intensity(fp, n, _is_ct_channel(n, fp.modality)) for n in names]
    if all(p[0]["kind"] == "zscore" for p in planned):
        return planned[0][0], f"{', '.join(names)}: each channel of each volume z-scored on its own"
    return [p[0] for p in planned], "; ".join(f"channel {i} ({n}) {p[1]}" for i, (n, p) in enumerate(zip(names, planned, strict=True)))


def _channels(levels: int, spatial_dims: int, base: int) -> list[int]:
    return [min(base * 2**i, MAX_FEATURES[spatial_dims]) for i in range(levels)]


def estimate_memory_bytes(patch: list[int], strides: list[list[int]], channels: list[int], batch: int,
                          kernels: list[list[int]] | None = None) -> float:
    """Estimated training memory (bytes) of a U-Net step; see the module docstring for the formula."""
    voxels = float(np.prod(patch))
    feature_voxels = 0.0
    for level, ch in enumerate(channels):
        if level > 0:
            voxels /= float(np.prod(strides[level - 1]))
        feature_voxels += voxels * ch
    params = 0.0
    for level, ch in enumerate(channels):
        k = float(np.prod(kernels[level])) if kernels else 27.0
        prev = channels[level - 1] if level else 1
        params += 2 * k * (prev * ch + ch * ch)  # encoder and decoder convolutions of this level
    return 4.0 * batch * ACTIVATION_TENSORS_PER_LEVEL * feature_voxels + 16.0 * params


def _compact(per_axis: list[list[int]]) -> list[int | list[int]]:
    # [2, 2, 2] -> 2: keeps isotropic configs as readable as hand-written ones.
    return [v[0] if len(set(v)) == 1 else list(v) for v in per_axis]


def plan_experiment(fp: Fingerprint, manifest_ref: str, options: PlanOptions,
                    fingerprint_ref: str | None = None) -> Plan:
    """Plan a complete experiment for the fingerprinted data; ``manifest_ref`` is written as data.manifest."""
    if fp.num_cases == 0:
        raise ConfigError(f"{fp.manifest}: fingerprint has no cases to plan from")
    notes: dict[str, str] = {}
    spacing, spacing_note = target_spacing(fp)
    median = np.array(fp.median_spacing)
    anisotropic = float(median.max() / median.min()) > ANISOTROPY_RATIO
    coarse = int(np.argmax(median))
    shape_at_target = np.array(fp.median_shape) * median / np.array(spacing)

    dims = 3
    dims_note = "3D: the default"
    if anisotropic and coarse == 2 and shape_at_target[2] < FEW_SLICES_FOR_2D:
        dims = 2
        # 2D trains on axial slices at their own spacing: resample in-plane only (through-plane median).
        spacing[2] = float(median[2])
        dims_note = (f"2D: anisotropic with a median of {shape_at_target[2]:.0f} slices "
                     f"(< {FEW_SLICES_FOR_2D}), too few to pool through-plane")
    elif anisotropic:
        dims_note = f"3D: anisotropic along axis {coarse}, handled by per-axis pooling and kernels"
    else:
        dims_note = "3D: isotropic enough (max/min spacing <= 3)"

    budget, budget_note, cuda = memory_budget(options)
    base = options.base_features or (32 if cuda else CPU_BASE_FEATURES)
    plan_spacing = spacing[:dims]
    median_shape = [float(v) for v in shape_at_target[:dims]]
    patch = [int(min(round(v), MAX_PATCH[dims])) for v in median_shape]
    topo = plan_topology(patch, plan_spacing, dims)
    channels = _channels(len(topo.strides) + 1, dims, base)
    shrunk = False
    while estimate_memory_bytes(topo.patch, topo.strides, channels, 2, topo.kernels) > budget:
        # Shrink the axis that is largest relative to the median image, by what its pooling needs.
        axis = int(np.argmax([p / m for p, m in zip(topo.patch, median_shape, strict=True)]))
        smaller = list(topo.patch)
        smaller[axis] -= topo.divisor[axis]
        if smaller[axis] < MIN_FEATURE_MAP:
            raise ConfigError(f"{fp.manifest}: even a {topo.patch} patch needs more than the memory budget "
                              f"({budget_note}); pass a larger --memory-gib")
        topo = plan_topology(smaller, plan_spacing, dims)
        channels = _channels(len(topo.strides) + 1, dims, base)
        shrunk = True
    if len(topo.strides) < 1:
        raise ConfigError(f"{fp.manifest}: images of median shape {median_shape} are too small to pool even once")

    per_sample = estimate_memory_bytes(topo.patch, topo.strides, channels, 1, topo.kernels)
    fixed = estimate_memory_bytes(topo.patch, topo.strides, channels, 0, topo.kernels)
    batch_by_memory = int((budget - fixed) // max(per_sample - fixed, 1.0))
    dataset_voxels = float(np.sum(np.prod(fp.shapes * fp.spacings / np.array(spacing), axis=1)))
    batch_by_data = int(MAX_BATCH_SHARE_OF_DATASET * dataset_voxels // float(np.prod(topo.patch)))
    batch = max(2, min(batch_by_memory, batch_by_data, 10**6 if cuda else CPU_MAX_BATCH))
    estimate = estimate_memory_bytes(topo.patch, topo.strides, channels, batch, topo.kernels)

    name = options.name
    intensity, intensity_note = _plan_intensity(fp)

    strides = _compact(topo.strides)
    kernels = _compact(topo.kernels)
    values: dict[str, Any] = {
        "name": name,
        "seed": 0,
        "data": {"manifest": manifest_ref, "fold": None, "cache_rate": 1.0, "num_workers": 0},
        "model": {
            "name": "dynunet", "spatial_dims": dims, "channels": channels, "strides": strides, "kernel_sizes": kernels,
            "num_res_units": 0, "dropout": 0.0, "norm": "instance", "deep_supervision": True,
        },
        "preprocessing": {"orientation": "RAS", "spacing": [round(s, 4) for s in spacing], "intensity": intensity},
        "augmentation": {
            "flip_prob": 0.5, "rotate90_prob": 0.0, "rotate_prob": 0.2, "rotate_range_deg": 15.0 if anisotropic else 30.0,
            "scale_prob": 0.2, "scale_range": 0.3, "noise_prob": 0.1, "noise_std": 0.1, "blur_prob": 0.2,
            "intensity_shift_prob": 0.0, "intensity_shift": 0.1, "contrast_prob": 0.15, "gamma_prob": 0.3,
            "low_resolution_prob": 0.25,
        },
        "loss": {"name": "dice_ce", "include_background": False, "lambda_dice": 1.0, "lambda_ce": 1.0},
        "optim": {"name": "sgd", "lr": 0.01, "weight_decay": 3.0e-5, "momentum": 0.99, "nesterov": True,
                  "schedule": "poly", "warmup_epochs": 0},
        "train": {
            "epochs": 1000, "iterations_per_epoch": 250 if cuda else CPU_ITERATIONS_PER_EPOCH,
            "patch_size": topo.patch, "batch_size": batch, "samples_per_volume": 1, "foreground_fraction": 0.33,
            "val_interval": 5 if cuda else CPU_VAL_INTERVAL, "early_stopping_patience": None,
            "amp": True, "device": "auto", "output_dir": options.output_dir or f"runs/{name}",
            "max_minutes": None if cuda else CPU_TIME_BUDGET_MIN, "schedule_over": "epochs" if cuda else "time",
            "compile": True, "choose_postprocessing": True,
        },
        "infer": {"roi_size": None, "sw_batch_size": 4, "overlap": 0.5, "mode": "gaussian", "mirror_axes": [],
                  "keep_largest_component": []},
        "evaluate": {"lesion_classes": []},
    }
    patch_note = (f"median image shape {[round(v) for v in median_shape]} at the target spacing"
                  + (", shrunk to fit the memory budget" if shrunk else "")
                  + f", rounded up to multiples of {topo.divisor}")
    notes.update({
        "data.manifest": "relative to this file",
        "data.fold": "null: manifest splits; `medseg train --fold K` picks a cross-validation fold",
        "data.num_workers": "0: transforms run in the main process (cached after preprocessing)",
        "model.name": "nnU-Net-style U-Net (MONAI DynUNet)",
        "model.spatial_dims": dims_note,
        "model.channels": f"{base} doubled per level, capped at {MAX_FEATURES[dims]}; "
                          f"{len(channels)} levels from the pooling below",
        "model.strides": f"pool an axis while its feature map is > {MIN_FEATURE_MAP} voxels and its spacing "
                         "<= 2x the finest",
        "model.kernel_sizes": "1 along an axis still > 2x coarser than the finest, else 3",
        "model.num_res_units": "0: plain conv blocks as nnU-Net",
        "model.deep_supervision": "loss on the two highest-resolution decoder outputs too",
        "preprocessing.spacing": f"mm; {spacing_note}",
        "preprocessing.intensity": intensity_note,
        "augmentation": "nnU-Net's set: rotation, scaling, noise, blur, brightness, gamma, low resolution, mirroring",
        "augmentation.rotate_range_deg": "smaller for anisotropic data (rotations mix in the coarse axis)"
                                         if anisotropic else "nnU-Net: up to 30 degrees",
        "augmentation.scale_range": "zoom 0.7-1.3 (nnU-Net 0.7-1.4)",
        "augmentation.contrast_prob": "multiplicative brightness 0.75-1.25",
        "augmentation.gamma_prob": "gamma 0.7-1.5",
        "augmentation.low_resolution_prob": "simulated low resolution, zoom 0.5-1",
        "loss": "Dice + cross-entropy, foreground classes in the Dice",
        "optim": "nnU-Net: SGD, Nesterov momentum 0.99, lr 0.01 with poly(0.9) decay per epoch",
        "train.epochs": "nnU-Net's 1000 x 250 iterations" if cuda else "an upper bound; train.max_minutes ends a CPU run",
        "train.iterations_per_epoch": "nnU-Net's 250" if cuda else "short CPU epochs: the curve is sampled every few minutes",
        "train.val_interval": "nnU-Net validates every epoch on a subset; every 5 here" if cuda
                              else f"every {CPU_VAL_INTERVAL} short epochs (hippocampus: ~9 s of validation per ~80 s of training)",
        "train.max_minutes": "no wall-clock limit on CUDA" if cuda
                             else f"{CPU_TIME_BUDGET_MIN:g} min: CPU training is budgeted by time, not nnU-Net's 250k steps",
        "train.schedule_over": "poly decay over the epochs" if cuda else "poly decay over the wall-clock budget",
        "train.patch_size": patch_note,
        "train.batch_size": (f"patches per step: min(memory {batch_by_memory}, 5% of the data set's voxels "
                             f"{batch_by_data}{'' if cuda else f', CPU {CPU_MAX_BATCH}'}), at least 2; estimate "
                             f"{estimate / 2**30:.2f} GiB of a budget of {budget_note}"),
        "train.samples_per_volume": "one patch per case draw; batch_size is the batch",
        "train.foreground_fraction": "nnU-Net: a third of patches centred on foreground",
        "train.compile": "torch.compile" if cuda
                         else "CPU too: 0.80 -> 0.69 s/step measured for hippocampus, ~1 min to compile; needs a C++ compiler",
        "train.choose_postprocessing": "after training, keep-largest-component only where it helps on val",
        "infer.mirror_axes": "[] here; `medseg predict --mirror` mirrors every axis at test time",
        "infer.keep_largest_component": "filled in by training (choose_postprocessing) in the run's config",
    })
    channels_note = f" ({len(fp.channel_names)} channels: {', '.join(fp.channel_names)})" if len(fp.channel_names) > 1 else ""
    header = [
        f"{name}: planned by `medseg plan` from {fp.num_cases} cases of {Path(fp.manifest).name or 'the manifest'}"
        f" on {datetime.now(UTC).date().isoformat()}.",
        f"Fingerprint: {fingerprint_ref}" if fingerprint_ref else "",
        f"Modality {fp.modality}{channels_note}; median spacing {[round(v, 3) for v in fp.median_spacing]} mm; median shape "
        f"{[round(v) for v in fp.median_shape]} voxels.",
        "Each planned value says where it came from; edit freely, it is an ordinary experiment config.",
    ]
    return Plan(values, notes, [h for h in header if h])


def relative_ref(target: Path, start_dir: Path) -> str:
    """``target`` relative to ``start_dir`` (POSIX separators), as a config refers to a manifest."""
    return Path(os.path.relpath(Path(target).resolve(), Path(start_dir).resolve())).as_posix()


def write_plan(manifest_path: Path, output: Path, fingerprint_path: Path | None = None,
               options: PlanOptions | None = None, max_cases: int | None = None, overwrite: bool = False,
               progress: bool = True) -> tuple[Path, Path, ExperimentConfig]:
    """Fingerprint the manifest's cases, plan, and write the fingerprint JSON and the config YAML.

    The YAML is validated by reading it back before it is written (atomically). ``fingerprint_path``
    defaults to ``<output stem>.fingerprint.json`` beside the config. Returns both paths and the config.
    """
    from medseg.atomic import write_text_atomic
    from medseg.data.manifest import load_manifest
    from medseg.planning.fingerprint import compute_fingerprint

    output = Path(output)
    if output.suffix not in (".yaml", ".yml"):
        raise ConfigError(f"{output}: the planned config must be a .yaml file")
    fingerprint_path = Path(fingerprint_path) if fingerprint_path else output.with_name(f"{output.stem}.fingerprint.json")
    for path in (output, fingerprint_path):
        if path.exists() and not overwrite:
            raise ConfigError(f"{path}: already exists (pass --overwrite to replace it)")
    manifest = load_manifest(manifest_path)
    options = options or PlanOptions(name=output.stem)
    fp = compute_fingerprint(manifest, manifest_path, progress=progress, max_cases=max_cases)
    plan = plan_experiment(fp, relative_ref(manifest_path, output.parent), options,
                           fingerprint_ref=relative_ref(fingerprint_path, output.parent))
    config = plan.config(source=f"{output} (as planned)")
    fp.save(fingerprint_path)
    write_text_atomic(output, plan.yaml_text())
    return output, fingerprint_path, config
