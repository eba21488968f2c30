"""The experiment config: one typed schema for an experiment YAML, validated once at the edge.

``load_config(path)`` returns an :class:`ExperimentConfig`; any unknown key, wrong type or bad value is
a :class:`~medseg.errors.ConfigError` naming the file and the key (``train.patch_size: ...``).
A relative manifest path is relative to the config file; a relative output folder to the current folder.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medseg.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    """Where the cases come from and how they are loaded."""

    manifest: Path
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
    spacing: tuple[float, float, float] | None = Field(default=None, description="target spacing in mm; null keeps the scan's")
    intensity: IntensityConfig = Field(default_factory=IntensityConfig)

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

    name: Literal["unet", "dynunet", "segresnet", "deeplab"] = "unet"
    spatial_dims: Literal[2, 3] = 3
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
    output_dir: Path = Path("runs/experiment")
    max_minutes: float | None = Field(default=None, gt=0, description="stop after this wall time (checkpoint kept)")
    schedule_over: Literal["epochs", "time"] = Field(
        default="epochs", description="time: the lr schedule runs over max_minutes of wall time instead of the epochs")
    compile: bool = Field(default=False, description="torch.compile the training network (on CPU it needs a C++ compiler; without one training runs eagerly)")
    choose_postprocessing: bool = Field(
        default=True, description="after training, enable infer.keep_largest_component for classes where it helps on val")


class InferConfig(_Section):
    """Sliding-window inference used in validation and prediction."""

    roi_size: list[int] | None = Field(default=None, description="default: train.patch_size")
    sw_batch_size: int = Field(default=4, ge=1)
    overlap: float = Field(default=0.5, ge=0, lt=1)
    mode: Literal["gaussian", "constant"] = "gaussian"
    mirror_axes: list[int] = Field(default_factory=list, description="test-time flips over these spatial axes")
    keep_largest_component: list[int] = Field(default_factory=list, description="classes post-processed to one component")


class EvaluateConfig(_Section):
    """What evaluation reports beyond per-class Dice (see docs/evaluation.md for the definitions)."""

    lesion_classes: list[int] = Field(default_factory=list, description="classes reported lesion by lesion")
    connectivity: Literal[6, 18, 26] = Field(default=26, description="3D neighbourhood that joins voxels into one lesion")
    min_lesion_volume_ml: float = Field(default=0.0, ge=0, description="components smaller than this (mL) are dropped and counted apart")
    match_min_iou: float = Field(default=0.1, gt=0, le=1, description="least IoU for a predicted lesion to match a reference lesion")
    size_buckets_mm: list[float] = Field(default_factory=lambda: [5.0, 10.0, 20.0], min_length=1,
                                         description="bucket edges (mm) of the lesion diameter for detection by size")
    size_by: Literal["axial", "3d"] = Field(default="axial", description="diameter used for size buckets: longest axial (RECIST) or 3D")
    nsd_tolerance_mm: float = Field(default=2.0, gt=0, description="normalised surface Dice tolerance (mm) for classes not listed below")
    nsd_tolerance_mm_per_class: dict[int, float] = Field(default_factory=dict, description="class -> NSD tolerance (mm)")
    missing_as_empty: bool = Field(default=False, description="score a missing prediction as an empty mask instead of only listing it")
    overlay_cases: int = Field(default=2, ge=0, description="worst and best cases (each) drawn in report.html")
    html_report: bool = True

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
    def _dims_agree(self) -> ExperimentConfig:
        dims = self.model.spatial_dims
        if len(self.train.patch_size) != dims:
            raise ValueError(f"train.patch_size has {len(self.train.patch_size)} entries but model.spatial_dims is {dims}")
        if self.infer.roi_size is not None and len(self.infer.roi_size) != dims:
            raise ValueError(f"infer.roi_size has {len(self.infer.roi_size)} entries but model.spatial_dims is {dims}")
        return self

    @model_validator(mode="after")
    def _time_schedule_needs_budget(self) -> ExperimentConfig:
        if self.train.schedule_over == "time" and self.train.max_minutes is None:
            raise ValueError("train.schedule_over: 'time' needs train.max_minutes")
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


def _format_errors(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        got = "" if err["type"] in ("missing", "extra_forbidden") else f" (got {err.get('input')!r})"
        lines.append(f"  {key}: {msg}{got}")
    return "\n".join(lines)


def config_from_dict(raw: Any, source: Path | str = "<config>") -> ExperimentConfig:
    """Validate a config mapping; ``source`` names it in error messages."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections (data, model, train, ...), got {type(raw).__name__}")
    try:
        config = ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: invalid config\n{_format_errors(exc)}") from None
    return config


def load_config(path: str | Path) -> ExperimentConfig:
    """Load and validate an experiment YAML (``yaml.safe_load``); a bare name finds a shipped config.

    The manifest path is relative to the config file; ``train.output_dir`` is relative to the current
    folder (where the user runs medseg), so shipped configs write their runs beside the user.
    """
    path = resolve_config_path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    config = config_from_dict(raw, path)
    if not config.data.manifest.is_absolute():
        config.data.manifest = (path.resolve().parent / config.data.manifest).resolve()
    config.train.output_dir = config.train.output_dir.expanduser().resolve()
    return config


def dump_config(config: ExperimentConfig) -> str:
    """The config as YAML text (all defaults written out), as saved beside checkpoints."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def with_overrides(config: ExperimentConfig, overrides: dict[str, Any]) -> ExperimentConfig:
    """A copy of ``config`` with nested values replaced (``{"train": {"epochs": 2}}``), validated again."""

    def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        out = dict(base)
        for key, value in extra.items():
            out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        return out

    return config_from_dict(merge(config.model_dump(mode="json"), overrides), source="config with overrides")
