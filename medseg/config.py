"""The experiment config: one typed schema for an experiment YAML, validated once at the edge.

``load_config(path)`` returns an :class:`ExperimentConfig`; any unknown key, wrong type or bad value is
a :class:`~medseg.errors.ConfigError` naming the file and the key (``train.patch_size: ...``).
Types are strict (``epochs: "3"`` is refused, not coerced) and values are checked against each other
(orientation codes, mirror axes, patch size against the network's downsampling, lesion classes against
the manifest's labels). A relative manifest path is relative to the config file; a relative output
folder to the current folder.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from medseg.errors import ConfigError
from medseg.models.registry import network_entry, network_names


class _Problems(ValueError):
    """Cross-check failures, each on a dotted key below the model that raised it."""

    def __init__(self, problems: list[tuple[str, str]]):
        super().__init__("; ".join(f"{k}: {m}" for k, m in problems))
        self.problems = problems


def _no_float(value: Any) -> Any:
    # Literal[2, 3] matches 2.0 by equality; a strict int key should not.
    if isinstance(value, float):
        raise ValueError(f"Input should be a valid integer, got {value!r}")
    return value


def _class_key(value: Any) -> Any:
    # JSON (model_dump(mode="json"), as checkpoints store the config) writes int mapping keys as strings.
    return int(value) if isinstance(value, str) and value.isdigit() else value


_ClassId = Annotated[int, BeforeValidator(_class_key)]


class _Section(BaseModel):
    # strict: YAML already gives ints, floats, bools and strings, so another type is a mistake to report,
    # not to coerce (`epochs: true` was 1, `amp: "no"` False). Paths and tuples opt out per field.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True)


class DataConfig(_Section):
    """Where the cases come from and how they are loaded."""

    manifest: Path = Field(strict=False)
    fold: int | None = Field(default=None, ge=0, description="use manifest folds[fold] instead of splits")
    cache_rate: float = Field(default=1.0, ge=0.0, le=1.0, description="fraction of cases cached after preprocessing")
    num_workers: int = Field(default=0, ge=0)


class IntensityConfig(_Section):
    """Intensity normalisation. ``ct_window`` clips HU to [a_min, a_max] and scales to [0, 1];
    ``zscore`` normalises each volume to zero mean / unit variance (MR); ``ct_zscore`` clips to
    [a_min, a_max] then subtracts ``mean`` and divides by ``std`` (nnU-Net style CT)."""

    kind: Literal["ct_window", "zscore", "ct_zscore", "none"] = "ct_window"
    a_min: float = -1000.0
    a_max: float = 400.0
    mean: float = 0.0
    std: float = Field(default=1.0, gt=0)
    nonzero: bool = Field(default=False, description="zscore: statistics over non-zero voxels only")

    @model_validator(mode="after")
    def _window_ordered(self) -> IntensityConfig:
        if self.kind in ("ct_window", "ct_zscore") and not self.a_min < self.a_max:
            raise ValueError(f"a_min ({self.a_min}) must be below a_max ({self.a_max})")
        return self


class PreprocessingConfig(_Section):
    """Geometry and intensity preprocessing; prediction inverts the geometric part exactly."""

    orientation: str = Field(default="RAS", pattern=r"^[RLAPSI]{3}$")
    spacing: tuple[float, float, float] | None = Field(
        default=None, strict=False, description="target spacing in mm; null keeps the scan's")  # from a YAML list
    intensity: IntensityConfig | list[IntensityConfig] = Field(
        default_factory=IntensityConfig,
        description="one normalisation for every input channel, or a list: one per channel, in channel order")

    @field_validator("intensity")
    @classmethod
    def _some_channel(cls, v: IntensityConfig | list[IntensityConfig]) -> IntensityConfig | list[IntensityConfig]:
        if isinstance(v, list) and not v:
            raise ValueError("a per-channel intensity list needs one entry per input channel, got none")
        return v

    @field_validator("orientation")
    @classmethod
    def _one_code_per_axis(cls, v: str) -> str:
        if any(sum(c in pair for c in v) != 1 for pair in ("RL", "AP", "SI")):
            raise ValueError(f"orientation {v!r} must name each axis once: one of R/L, one of A/P, one of S/I (e.g. RAS, LPS)")
        return v

    @field_validator("spacing")
    @classmethod
    def _positive(cls, v: tuple[float, float, float] | None) -> tuple[float, float, float] | None:
        if v is not None and min(v) <= 0:
            raise ValueError(f"spacing must be positive mm values, got {v}")
        return v


class AugmentationConfig(_Section):
    """Random augmentation applied to training patches (probabilities per patch)."""

    flip_prob: float = Field(default=0.5, ge=0, le=1)
    rotate90_prob: float = Field(default=0.0, ge=0, le=1)
    rotate_prob: float = Field(default=0.0, ge=0, le=1)
    rotate_range_deg: float = Field(default=15.0, ge=0)
    scale_prob: float = Field(default=0.0, ge=0, le=1)
    scale_range: float = Field(default=0.15, ge=0, lt=1)
    noise_prob: float = Field(default=0.1, ge=0, le=1)
    noise_std: float = Field(default=0.05, ge=0)
    blur_prob: float = Field(default=0.0, ge=0, le=1)
    intensity_shift_prob: float = Field(default=0.2, ge=0, le=1)
    intensity_shift: float = Field(default=0.1, ge=0)
    contrast_prob: float = Field(default=0.0, ge=0, le=1)
    gamma_prob: float = Field(default=0.0, ge=0, le=1)
    low_resolution_prob: float = Field(default=0.0, ge=0, le=1)


class ModelConfig(_Section):
    """The network. ``name`` picks an entry of the model registry (``medseg.models``)."""

    name: str = Field(default="unet", description="a network of the registry (medseg/models/registry.py): "
                                                   "unet, dynunet, segresnet, deeplab or one registered since")
    spatial_dims: Annotated[Literal[2, 3], BeforeValidator(_no_float)] = 3
    channels: list[int] = Field(default_factory=lambda: [16, 32, 64, 128], min_length=2)
    strides: list[int | list[int]] | None = Field(
        default=None, description="downsampling per level below the top: an int for all axes or one per axis; default 2 each")
    kernel_sizes: list[int | list[int]] | None = Field(
        default=None, description="dynunet: convolution kernel per level (int or one per axis); default 3 each")
    num_res_units: int = Field(default=2, ge=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    norm: Literal["instance", "batch"] = "instance"
    deep_supervision: bool = False

    @model_validator(mode="after")
    def _strides_match(self) -> ModelConfig:
        if self.strides is not None and len(self.strides) != len(self.channels) - 1:
            raise ValueError(f"strides needs {len(self.channels) - 1} entries (one per level below the top), got {len(self.strides)}")
        if self.kernel_sizes is not None and len(self.kernel_sizes) != len(self.channels):
            raise ValueError(f"kernel_sizes needs {len(self.channels)} entries (one per level), got {len(self.kernel_sizes)}")
        for key, values in (("strides", self.strides), ("kernel_sizes", self.kernel_sizes)):
            for v in values or []:
                per_axis = v if isinstance(v, list) else [v]
                if isinstance(v, list) and len(v) != self.spatial_dims:
                    raise ValueError(f"{key} entry {v} must have one value per spatial axis ({self.spatial_dims})")
                if min(per_axis) < 1:
                    raise ValueError(f"{key} entries must be positive, got {v}")
        return self

    @field_validator("name")
    @classmethod
    def _registered(cls, v: str) -> str:
        if v not in network_names():
            raise ValueError(f"unknown network {v!r}; registered networks: {', '.join(network_names())} "
                             "(medseg/models/registry.py)")
        return v

    def downsampling(self) -> list[int] | None:
        """Overall downsampling factor of each spatial axis, as the network's registry entry states it
        (:mod:`medseg.models.registry`): a patch side must be a multiple of it. None when any size works."""
        return network_entry(self.name).downsampling(self)

    def downsampling_rule(self) -> str:
        """Why :meth:`downsampling` is what it is, for error messages (the registry entry's words)."""
        return network_entry(self.name).downsampling_rule


class LossConfig(_Section):
    """Dice + cross-entropy (MONAI ``DiceCELoss``)."""

    name: Literal["dice_ce"] = "dice_ce"
    include_background: bool = False
    batch_dice: bool = Field(default=True, description="Dice over the whole batch (helps small structures)")
    lambda_dice: float = Field(default=1.0, ge=0)
    lambda_ce: float = Field(default=1.0, ge=0)


class OptimConfig(_Section):
    """Optimizer and learning-rate schedule (per epoch)."""

    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=1e-5, ge=0)
    momentum: float = Field(default=0.99, ge=0, lt=1)
    nesterov: bool = True
    schedule: Literal["constant", "cosine", "poly"] = "cosine"
    warmup_epochs: int = Field(default=0, ge=0)


class TrainConfig(_Section):
    """The training loop. Patch size has 3 entries for 3D models and 2 for 2D models."""

    epochs: int = Field(default=100, ge=1)
    iterations_per_epoch: int | None = Field(default=None, ge=1, description="batches per epoch; default one pass over the cases")
    patch_size: list[int] = Field(default_factory=lambda: [96, 96, 96], min_length=2, max_length=3)
    batch_size: int = Field(default=2, ge=1)
    samples_per_volume: int = Field(default=2, ge=1)
    foreground_fraction: float = Field(default=0.67, ge=0, le=1, description="share of patches centred on foreground")
    val_interval: int = Field(default=1, ge=1)
    early_stopping_patience: int | None = Field(default=None, ge=1, description="validations without improvement before stopping")
    amp: bool = Field(default=True, description="mixed precision on CUDA (ignored on CPU)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    output_dir: Path = Field(default=Path("runs/experiment"), strict=False)
    max_minutes: float | None = Field(default=None, gt=0, description="stop after this wall time (checkpoint kept)")
    schedule_over: Literal["epochs", "time"] = Field(
        default="epochs", description="time: the lr schedule runs over max_minutes of wall time instead of the epochs")
    compile: bool = Field(default=False, description="torch.compile the training network (on CPU it needs a C++ compiler; without one training runs eagerly)")
    choose_postprocessing: bool = Field(
        default=True, description="after training, enable infer.keep_largest_component for classes where it helps on val")
    init_from: Path | None = Field(
        default=None, strict=False,
        description="fine-tuning: a run folder or model bundle whose matching weights start this run (output layer "
                    "re-initialised when the classes differ)")
    freeze_encoder_epochs: int = Field(
        default=0, ge=0, description="with init_from: keep the encoder's weights fixed for this many first epochs")
    trackers: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=lambda: ["tensorboard"], description="experiment trackers fed every epoch (plain logs always)")
    mlflow_tracking_uri: str | None = Field(
        default=None, description="MLflow store; default sqlite:///<output_dir>/mlflow.db (offline, inside the run)")
    wandb_project: str | None = Field(
        default=None, description="W&B project of the run; default the config's name (offline unless WANDB_MODE says)")

    @field_validator("trackers")
    @classmethod
    def _trackers_once(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"trackers must not repeat, got {v}")
        return v


class InferConfig(_Section):
    """Sliding-window inference used in validation and prediction."""

    roi_size: list[int] | None = Field(default=None, description="default: train.patch_size")
    sw_batch_size: int = Field(default=4, ge=1)
    overlap: float = Field(default=0.5, ge=0, lt=1)
    mode: Literal["gaussian", "constant"] = "gaussian"
    mirror_axes: list[int] = Field(default_factory=list, description="test-time flips over these spatial axes")
    keep_largest_component: list[int] = Field(default_factory=list, description="classes post-processed to one component")

    @field_validator("mirror_axes", "keep_largest_component")
    @classmethod
    def _no_repeats(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"values must not repeat, got {v}")
        return v

    @field_validator("keep_largest_component")
    @classmethod
    def _foreground(cls, v: list[int]) -> list[int]:
        if any(c < 1 for c in v):
            raise ValueError(f"classes must be foreground (>= 1; 0 is background), got {v}")
        return v


class EvaluateConfig(_Section):
    """What evaluation reports beyond per-class Dice (see docs/evaluation.md for the definitions)."""

    lesion_classes: list[int] = Field(default_factory=list, description="classes reported lesion by lesion")
    connectivity: Annotated[Literal[6, 18, 26], BeforeValidator(_no_float)] = Field(default=26, description="3D neighbourhood that joins voxels into one lesion")
    min_lesion_volume_ml: float = Field(default=0.0, ge=0, description="components smaller than this (mL) are dropped and counted apart")
    match_min_iou: float = Field(default=0.1, gt=0, le=1, description="least IoU for a predicted lesion to match a reference lesion")
    size_buckets_mm: list[float] = Field(default_factory=lambda: [5.0, 10.0, 20.0], min_length=1,
                                         description="bucket edges (mm) of the lesion diameter for detection by size")
    size_by: Literal["axial", "3d"] = Field(default="axial", description="diameter used for size buckets: longest axial (RECIST) or 3D")
    nsd_tolerance_mm: float = Field(default=2.0, gt=0, description="normalised surface Dice tolerance (mm) for classes not listed below")
    nsd_tolerance_mm_per_class: dict[_ClassId, float] = Field(default_factory=dict, description="class -> NSD tolerance (mm)")
    missing_as_empty: bool = Field(default=False, description="score a missing prediction as an empty mask instead of only listing it")
    overlay_cases: int = Field(default=2, ge=0, description="cases with the lowest and with the highest mean Dice (each) drawn in report.html")
    html_report: bool = True

    @field_validator("lesion_classes")
    @classmethod
    def _lesion_classes_foreground(cls, v: list[int]) -> list[int]:
        if any(c < 1 for c in v) or len(set(v)) != len(v):
            raise ValueError(f"classes must be distinct foreground classes (>= 1; 0 is background), got {v}")
        return v

    @field_validator("size_buckets_mm")
    @classmethod
    def _buckets_increasing(cls, v: list[float]) -> list[float]:
        if any(b <= 0 for b in v) or any(b2 <= b1 for b1, b2 in zip(v, v[1:], strict=False)):
            raise ValueError(f"size buckets must be positive and increasing mm values, got {v}")
        return v

    @field_validator("nsd_tolerance_mm_per_class")
    @classmethod
    def _tolerances_positive(cls, v: dict[int, float]) -> dict[int, float]:
        bad = {k: t for k, t in v.items() if t <= 0}
        if bad:
            raise ValueError(f"NSD tolerances must be positive mm values, got {bad}")
        return v

    def tolerance_mm(self, class_id: int) -> float:
        """NSD tolerance (mm) of one class."""
        return self.nsd_tolerance_mm_per_class.get(class_id, self.nsd_tolerance_mm)


class ExperimentConfig(_Section):
    """One experiment: data, model, loss, optimisation, training, inference and evaluation."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    seed: int = 0
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    preprocessing: PreprocessingConfig = Field(default_factory=PreprocessingConfig)
    augmentation: AugmentationConfig = Field(default_factory=AugmentationConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    infer: InferConfig = Field(default_factory=InferConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)

    @model_validator(mode="after")
    def _sections_agree(self) -> ExperimentConfig:
        # Checked at load: each of these otherwise passes and crashes later (mirror axes after a full epoch).
        problems: list[tuple[str, str]] = []
        dims = self.model.spatial_dims
        factors = self.model.downsampling()
        for key, size in (("train.patch_size", self.train.patch_size), ("infer.roi_size", self.infer.roi_size)):
            if size is None:
                continue
            if len(size) != dims:
                problems.append((key, f"has {len(size)} entries but model.spatial_dims is {dims}"))
                continue
            for axis, (side, factor) in enumerate(zip(size, factors or [1] * dims, strict=True)):
                if side < 1 or side % factor:
                    below = side // factor * factor
                    above = max(below + factor, factor)
                    nearest = f"{below} or {above}" if below >= factor else f"{above}"
                    why = self.model.downsampling_rule()
                    problems.append((key, f"axis {axis} is {side}, not a positive multiple of {factor} ({self.model.name} "
                                          f"downsamples that axis {factor}x: {why}); nearest valid sizes: {nearest}"))
        bad_axes = [a for a in self.infer.mirror_axes if not 0 <= a < dims]
        if bad_axes:
            problems.append(("infer.mirror_axes", f"axes {bad_axes} are not spatial axes of a {dims}D model "
                                                  f"(model.spatial_dims {dims}: axes 0..{dims - 1})"))
        if self.train.schedule_over == "time" and self.train.max_minutes is None:
            problems.append(("train.schedule_over", "'time' needs train.max_minutes"))
        if self.train.freeze_encoder_epochs and self.train.init_from is None:
            problems.append(("train.freeze_encoder_epochs", "freezes a pretrained encoder: it needs train.init_from "
                                                            "(a randomly initialised encoder would stay random)"))
        if problems:
            raise _Problems(problems)
        return self

    @property
    def roi_size(self) -> list[int]:
        """Sliding-window size: ``infer.roi_size`` or the training patch size."""
        return list(self.infer.roi_size or self.train.patch_size)


def available_configs() -> list[str]:
    """Names of the configs shipped with medseg (``configs/*.yaml``)."""
    return sorted({f.name for d in _shipped_config_dirs() for f in d.glob("*.yaml")})


def _shipped_config_dirs() -> list[Path]:
    dirs = [Path(__file__).resolve().parent.parent / "configs"]
    packaged = resources.files("medseg") / "configs"
    if packaged.is_dir():
        dirs.append(Path(str(packaged)))
    return [d for d in dirs if d.is_dir()]


def resolve_config_path(name: str | Path) -> Path:
    """A path as typed, or a bare name (``ct_lung`` / ``ct_lung.yaml``) looked up among the shipped configs."""
    path = Path(name)
    if path.is_file():
        return path
    if len(path.parts) == 1:
        stem = path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml"
        for folder in _shipped_config_dirs():
            if (folder / stem).is_file():
                return folder / stem
    raise ConfigError(f"{name}: config not found. Shipped configs: {', '.join(available_configs()) or 'none'}")


class _YamlLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e-3`` and ``1.0e3`` as floats, as YAML 1.2 and JSON do;
    PyYAML's YAML 1.1 rules need a dot and a signed exponent, and a strict schema would refuse the string."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    """YAML text as medseg reads configs and ``--set`` values (safe loading; ``1e-3`` is a float)."""
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass


def parse_set(item: str) -> tuple[str, Any]:
    """One ``--set section.key=value``: the dotted key and the value read as YAML, as in a config file."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not re.fullmatch(r"\w+(\.\w+)*", key):
        raise ConfigError(f"--set expects SECTION.KEY=VALUE (e.g. train.epochs=3), got {item!r}")
    try:
        return key, parse_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: {text!r} is not a valid YAML value ({getattr(exc, 'problem', None) or exc})") from None


def _from_set(key: str, overridden: Collection[str], unknown: bool = False) -> bool:
    # An unknown section ("trian") is reported above the key that was set ("trian.epochs").
    return any(key == k or key.startswith(k + ".") or (unknown and k.startswith(key + ".")) for k in overridden)


def _line(key: str, message: str, overridden: Collection[str], unknown: bool = False) -> str:
    return f"  {'--set ' if _from_set(key, overridden, unknown) else ''}{key}: {message}"


def format_validation_errors(exc: ValidationError, overridden: Collection[str] = ()) -> str:
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        error = err.get("ctx", {}).get("error")
        if isinstance(error, _Problems):
            lines.extend(_line(".".join([*loc, k]), m, overridden) for k, m in error.problems)
            continue
        key = ".".join(loc) or "(top level)"
        unknown = err["type"] == "extra_forbidden"
        msg = "unknown key" if unknown else str(error) if err["type"] == "value_error" else err["msg"]
        # Our own checks (value_error) quote the value themselves.
        got = "" if err["type"] in ("missing", "extra_forbidden", "value_error") else f" (got {err.get('input')!r})"
        lines.append(_line(key, f"{msg}{got}", overridden, unknown))
    return "\n".join(lines)


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, Mapping) and isinstance(out.get(key), dict) else value
    return out


def _nest(dotted: Mapping[str, Any]) -> dict[str, Any]:
    """``{"train.epochs": 3}`` -> ``{"train": {"epochs": 3}}``."""
    nested: dict[str, Any] = {}
    for key, value in dotted.items():
        for part in reversed(key.split(".")):
            value = {part: value}
        nested = _merge(nested, value)
    return nested


def config_from_dict(raw: Any, source: Path | str = "<config>", overridden: Collection[str] = ()) -> ExperimentConfig:
    """Validate a config mapping; ``source`` names it in error messages, and an error on one of the
    dotted keys in ``overridden`` names ``--set KEY`` as its origin instead."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections (data, model, train, ...), got {type(raw).__name__}")
    try:
        config = ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: invalid config\n{format_validation_errors(exc, overridden)}") from None
    return config


def _manifest_labels(path: Path) -> dict[int, str] | None:
    """A manifest's labels (value -> name), or None when it is missing or unreadable: loading it for
    training reports that in full. Read here, not through ``medseg.data``, which sits above config."""
    try:
        return {int(k): str(v) for k, v in json.loads(path.read_text(encoding="utf-8"))["labels"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _check_classes_are_labels(config: ExperimentConfig, source: Path, overridden: Collection[str]) -> None:
    labels = _manifest_labels(config.data.manifest)
    if labels is None:
        return
    named = ", ".join(f"{k} {v}" for k, v in sorted(labels.items()))
    lines = []
    for key, classes in (("evaluate.lesion_classes", config.evaluate.lesion_classes),
                         ("infer.keep_largest_component", config.infer.keep_largest_component)):
        missing = [c for c in classes if c not in labels]
        if missing:
            lines.append(_line(key, f"classes {missing} are not labels of the manifest {config.data.manifest} "
                                    f"(labels: {named})", overridden))
    if lines:
        raise ConfigError(f"{source}: invalid config\n" + "\n".join(lines))


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> ExperimentConfig:
    """Load and validate an experiment YAML (:func:`parse_yaml`); a bare name finds a shipped config.

    ``overrides`` maps dotted keys to values (``{"train.epochs": 3}``, from ``--set``); they replace the
    file's values before validation, so they pass the same checks. The manifest path is relative to the
    config file (to the current folder when set by an override); ``train.output_dir`` is relative to the
    current folder (where the user runs medseg), so shipped configs write their runs beside the user;
    so is ``train.init_from``.
    When the manifest exists, the classes named in ``evaluate`` and ``infer`` must be among its labels.
    """
    path = resolve_config_path(path)
    overrides = dict(overrides or {})
    try:
        raw = parse_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if overrides and isinstance(raw, dict):
        raw = _merge(raw, _nest(overrides))
    config = config_from_dict(raw, path, overridden=overrides)
    if not config.data.manifest.is_absolute():
        base = Path.cwd() if _from_set("data.manifest", overrides) else path.resolve().parent
        config.data.manifest = (base / config.data.manifest).resolve()
    config.train.output_dir = config.train.output_dir.expanduser().resolve()
    if config.train.init_from is not None:
        config.train.init_from = config.train.init_from.expanduser().resolve()
    _check_classes_are_labels(config, path, overrides)
    return config


def dump_config(config: ExperimentConfig) -> str:
    """The config as YAML text (all defaults written out), as saved beside checkpoints."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def with_overrides(config: ExperimentConfig, overrides: dict[str, Any]) -> ExperimentConfig:
    """A copy of ``config`` with nested values replaced (``{"train": {"epochs": 2}}``), validated again."""
    return config_from_dict(_merge(config.model_dump(mode="json"), overrides), source="config with overrides")
