"""The model bundle: one contract between training and everything that uses a trained model.

Training writes it (``best.pt`` / ``last.pt`` in the run folder); prediction, evaluation, export and
the service read it with :func:`load_bundle`, and nothing else reads checkpoint files. A bundle holds

- the network spec (architecture, input channels, classes, deep supervision),
- the label table (value, name, colour),
- what the model is for: the modality it was trained on and its lesion classes (read with
  :func:`model_modality` and :func:`model_lesion_classes`, which derive them for older bundles),
- the preprocessing (orientation, spacing, intensity normalisation),
- the inference settings (patch, overlap, mirroring, keep-largest-component, precision),
- provenance (the experiment config, the data it was trained on, validation metrics, library
  versions and a SHA-256 of the weights, checked on every load),

and the weights. Only tensors and plain Python containers are stored, so ``torch.load(...,
weights_only=True)`` reads it and a file from an untrusted source cannot run code. ``last.pt`` adds
the optimizer, scheduler and loop state that ``--resume`` needs.

Run folders written before the bundle (format ``medseg-checkpoint-1``) still load: their bundle is
derived from the embedded config (documented in docs/decisions.md).
"""

from __future__ import annotations

import hashlib
import platform
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import nn

from medseg import __version__
from medseg.atomic import write_atomic
from medseg.config import (
    ExperimentConfig,
    ModelConfig,
    PreprocessingConfig,
    config_from_dict,
    format_validation_errors,
)
from medseg.errors import CheckpointError
from medseg.labels import LabelCode, LabelInfo, label_table
from medseg.models.registry import build_model

BUNDLE_FORMAT = "medseg-bundle-1"
LEGACY_CHECKPOINT_FORMAT = "medseg-checkpoint-1"


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NetworkSpec(_Spec):
    """What to build: the registry architecture, the input channels and the output classes."""

    architecture: ModelConfig
    in_channels: int = Field(ge=1)
    num_classes: int = Field(ge=2)

    @property
    def deep_supervision(self) -> bool:
        return self.architecture.deep_supervision

    @property
    def spatial_dims(self) -> int:
        return self.architecture.spatial_dims


class InferenceSpec(_Spec):
    """How the network is applied to a whole scan."""

    roi_size: list[int] = Field(min_length=2, max_length=3)
    sw_batch_size: int = Field(ge=1)
    overlap: float = Field(ge=0, lt=1)
    mode: Literal["gaussian", "constant"]
    mirror_axes: list[int] = Field(default_factory=list)
    keep_largest_component: list[int] = Field(default_factory=list)
    precision: Literal["float32", "float16", "bfloat16"] = Field(
        default="float32", description="autocast dtype on CUDA; float32 on CPU unless an exported backend says otherwise")


class DataProvenance(_Spec):
    """The data a model was trained on (no case names: they can be patient identifiers)."""

    manifest_name: str | None = None
    manifest_sha256: str | None = None
    fold: int | None = None
    train_cases: int | None = None
    val_cases: int | None = None


class ValidationSummary(_Spec):
    """Validation metrics of the stored weights (mean foreground Dice and per class, by name)."""

    mean_dice: float | None = None
    epoch: int | None = None
    per_class_dice: dict[str, float] = Field(default_factory=dict)


class InitFromRecord(_Spec):
    """A fine-tuned model's starting point (``train.init_from``): the source bundle and what was taken."""

    source: str = Field(description="file name of the source bundle")
    source_weights_sha256: str = ""
    loaded: int = Field(ge=0, description="tensors copied from the source")
    reinitialised: list[str] = Field(default_factory=list, description="tensors left freshly initialised")
    unused: list[str] = Field(default_factory=list, description="source tensors this network has no place for")


class Provenance(_Spec):
    """Where the weights came from: config, data, validation, versions and their checksum."""

    config: dict[str, Any]
    data: DataProvenance = Field(default_factory=DataProvenance)
    validation: ValidationSummary = Field(default_factory=ValidationSummary)
    versions: dict[str, str] = Field(default_factory=dict)
    weights_sha256: str = ""
    created: str = ""
    init_from: InitFromRecord | None = None


#: Mean foreground validation Dice below which a model is flagged ``weak_model`` (docs/qc.md).
DEFAULT_MIN_VALIDATION_DICE = 0.5


class QCThresholds(_Spec):
    """Limits beyond which a prediction is flagged, set at training time (docs/qc.md gives each rule).

    Input side (from the training cases): modality, spacing per RAS axis (mm), intensity percentiles of
    the whole scan (its units: HU for CT), class volumes (mL). Output side (from the validation cases):
    mean normalised entropy in the predicted foreground and the share of low-confidence voxels there.
    ``None`` (or an empty map) leaves a check out.
    """

    modality: str | None = None
    spacing_mm_low: list[float] | None = Field(default=None, min_length=3, max_length=3)
    spacing_mm_high: list[float] | None = Field(default=None, min_length=3, max_length=3)
    intensity_percentiles: list[float] = Field(default_factory=lambda: [0.5, 50.0, 99.5])
    intensity_low: list[float] | None = None
    intensity_high: list[float] | None = None
    volume_ml_low: dict[int, float] = Field(default_factory=dict)
    volume_ml_high: dict[int, float] = Field(default_factory=dict)
    always_present: list[int] = Field(default_factory=list, description="classes in every training label")
    max_foreground_entropy: float | None = None
    max_low_confidence_share: float | None = None
    min_validation_dice: float = DEFAULT_MIN_VALIDATION_DICE
    calibration: dict[str, Any] = Field(default_factory=dict, description="cases and rules the limits came from")


class PrecisionParity(_Spec):
    """A reduced-precision run of the network checked against float32 on the validation cases.

    Dice is each mask's against the reference labels, per foreground class averaged over the cases; a change
    is reduced minus float32 precision. ``medseg predict --precision auto`` reads ``passed`` through the rule
    of :func:`medseg.inference.precision.parity_passes` (docs/deploy.md).
    """

    mean_dice_change: float = Field(description="mean foreground Dice, reduced minus float32")
    max_class_dice_change: float = Field(ge=0, description="largest |Dice change| of one class")
    per_class_dice_change: dict[str, float] = Field(default_factory=dict)
    mean_dice_float32: float | None = None
    voxel_agreement: float | None = Field(default=None, description="share of voxels where both masks agree")
    cases: int = Field(ge=0)
    device: str = "cpu"
    passed: bool
    date: str = ""


class BundleSpec(_Spec):
    """Everything of a bundle but the weights; plain data, validated when read."""

    format: Literal["medseg-bundle-1"] = BUNDLE_FORMAT
    name: str
    network: NetworkSpec
    labels: list[LabelInfo]
    preprocessing: PreprocessingConfig
    inference: InferenceSpec
    provenance: Provenance
    qc: QCThresholds | None = None
    #: The modality the model was trained on (the manifest's); None in bundles written before it was
    #: stored: read it with :func:`model_modality`, which derives it for those.
    modality: Literal["CT", "MR", "other"] | None = None
    #: Classes reported lesion by lesion (the config's ``evaluate.lesion_classes``); None in bundles written
    #: before it was stored: read it with :func:`model_lesion_classes`.
    lesion_classes: list[int] | None = None
    #: Parity checks of reduced precisions, by dtype name (``bfloat16``): the evidence ``--precision auto`` needs.
    precision_check: dict[str, PrecisionParity] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> BundleSpec:
        values = [label.value for label in self.labels]
        if values != list(range(self.network.num_classes)):
            raise ValueError(f"labels must be the values 0..{self.network.num_classes - 1} in order, got {values}")
        if len(self.inference.roi_size) != self.network.spatial_dims:
            raise ValueError(f"inference.roi_size {self.inference.roi_size} does not fit a "
                             f"{self.network.spatial_dims}D network")
        bad_axes = [a for a in self.inference.mirror_axes if not 0 <= a < self.network.spatial_dims]
        if bad_axes:
            raise ValueError(f"inference.mirror_axes {bad_axes} outside the {self.network.spatial_dims} spatial axes")
        bad_classes = [k for k in self.inference.keep_largest_component if not 1 <= k < self.network.num_classes]
        if bad_classes:
            raise ValueError(f"inference.keep_largest_component names classes {bad_classes} the network does not have")
        bad_lesions = [k for k in self.lesion_classes or [] if not 1 <= k < self.network.num_classes]
        if bad_lesions:
            raise ValueError(f"lesion_classes names classes {bad_lesions} the network does not have")
        return self


#: Intensity normalisations in Hounsfield units: a bundle that stores no modality and uses one was trained on CT.
CT_INTENSITY_KINDS = ("ct_window", "ct_zscore")


def model_modality(bundle: ModelBundle | BundleSpec) -> str | None:
    """The modality a model was trained on: ``"CT"``, ``"MR"``, ``"other"``, or None when it cannot be told.

    The one reader of it. Stored in bundles since it was added (the manifest's ``modality``); derived for
    older ones: their QC section's modality, else CT for a Hounsfield-unit normalisation, MR for one that
    z-scores each volume (the rule the PACS path used), unknown for none.
    """
    spec = bundle.spec if isinstance(bundle, ModelBundle) else bundle
    if spec.modality is not None:
        return spec.modality
    if spec.qc is not None and spec.qc.modality:
        return spec.qc.modality
    kind = spec.preprocessing.intensity.kind
    if kind in CT_INTENSITY_KINDS:
        return "CT"
    return "MR" if kind == "zscore" else None


def model_lesion_classes(bundle: ModelBundle | BundleSpec) -> list[int]:
    """The classes a model reports lesion by lesion (may be empty): stored in bundles since it was added,
    else the embedded config's ``evaluate.lesion_classes``. The one reader of it."""
    spec = bundle.spec if isinstance(bundle, ModelBundle) else bundle
    if spec.lesion_classes is not None:
        return list(spec.lesion_classes)
    evaluate = spec.provenance.config.get("evaluate") or {}
    return [int(k) for k in evaluate.get("lesion_classes") or []]


def inference_spec(config: ExperimentConfig) -> InferenceSpec:
    """The inference settings a config trains for (its ``infer`` section; AMP on CUDA means float16)."""
    infer = config.infer
    return InferenceSpec(roi_size=config.roi_size, sw_batch_size=infer.sw_batch_size, overlap=infer.overlap,
                         mode=infer.mode, mirror_axes=list(infer.mirror_axes),
                         keep_largest_component=list(infer.keep_largest_component),
                         precision="float16" if config.train.amp else "float32")


def library_versions() -> dict[str, str]:
    """medseg, torch, MONAI and Python versions, as recorded in a bundle's provenance."""
    import monai

    return {"medseg": __version__, "torch": torch.__version__, "monai": monai.__version__,
            "python": platform.python_version()}


def weights_sha256(weights: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the weights' names, dtypes, shapes and bytes (logical order, any memory layout)."""
    digest = hashlib.sha256()
    for key in sorted(weights):
        tensor = weights[key].detach().cpu()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass
class ModelBundle:
    """A trained model: its spec (see :class:`BundleSpec`) and weights; ``training_state`` only in ``last.pt``."""

    spec: BundleSpec
    weights: dict[str, torch.Tensor]
    path: Path | None = None
    training_state: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: ExperimentConfig, label_names: dict[int, str], in_channels: int,
                    weights: dict[str, torch.Tensor] | None = None, data: DataProvenance | None = None,
                    label_codes: dict[int, LabelCode] | None = None, modality: str | None = None) -> ModelBundle:
        """A bundle for a config about to be trained (weights filled in when saving); ``label_codes`` are the
        manifest's coded concepts per class (DICOM-SEG), ``modality`` its modality (None: derived when read)."""
        spec = BundleSpec(
            name=config.name,
            network=NetworkSpec(architecture=config.model, in_channels=in_channels, num_classes=len(label_names)),
            labels=label_table(label_names, label_codes),
            preprocessing=config.preprocessing,
            inference=inference_spec(config),
            provenance=Provenance(config=config.model_dump(mode="json"), data=data or DataProvenance(),
                                  versions=library_versions()),
            modality=modality,
            lesion_classes=list(config.evaluate.lesion_classes),
        )
        return cls(spec, dict(weights or {}))

    @property
    def label_names(self) -> dict[int, str]:
        """``{value: name}`` of every class, background included."""
        return {label.value: label.name for label in self.spec.labels}

    @property
    def config(self) -> ExperimentConfig:
        """The experiment config the model was trained with (its evaluate section, resume, ...)."""
        return config_from_dict(self.spec.provenance.config, source=f"{self.path or 'bundle'} (embedded config)")

    @property
    def modality(self) -> str | None:
        """The modality the model was trained on (:func:`model_modality`)."""
        return model_modality(self)

    @property
    def lesion_classes(self) -> list[int]:
        """Classes reported lesion by lesion (:func:`model_lesion_classes`)."""
        return model_lesion_classes(self)

    @property
    def network(self) -> NetworkSpec:
        return self.spec.network

    @property
    def inference(self) -> InferenceSpec:
        return self.spec.inference

    def build_network(self) -> nn.Module:
        """The network with the bundle's weights, in eval mode, on the CPU."""
        net = build_model(self.network.architecture, self.network.in_channels, self.network.num_classes)
        try:
            net.load_state_dict(self.weights)
        except RuntimeError as exc:
            raise CheckpointError(f"{self.path}: weights do not fit the network spec ({str(exc).splitlines()[0]})") from None
        return net.eval()

    def with_weights(self, weights: dict[str, torch.Tensor], validation: ValidationSummary | None = None) -> ModelBundle:
        """A copy holding ``weights`` (and their validation metrics), stamped with a new checksum and time."""
        provenance = self.spec.provenance.model_copy(update={
            "weights_sha256": weights_sha256(weights),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            **({"validation": validation} if validation is not None else {}),
        })
        return ModelBundle(self.spec.model_copy(update={"provenance": provenance}), weights, self.path)

    def save(self, path: Path, **training_state: Any) -> Path:
        """Write the bundle atomically (temporary file, then rename); ``training_state`` for resuming."""
        payload = {"format": BUNDLE_FORMAT, "bundle": self.spec.model_dump(mode="json"), "model_state": self.weights,
                   **training_state}
        return write_atomic(Path(path), lambda tmp: torch.save(payload, tmp))


def resolve_bundle_path(model: Path) -> Path:
    """A bundle file as given, or a run folder's ``best.pt`` (else ``last.pt``)."""
    model = Path(model)
    if model.is_dir():
        for name in ("best.pt", "last.pt"):
            if (model / name).is_file():
                return model / name
        raise CheckpointError(f"{model}: run folder holds no best.pt or last.pt")
    if not model.is_file():
        raise CheckpointError(f"{model}: no such model file or run folder")
    return model


def _legacy_spec(raw: dict[str, Any], path: Path) -> BundleSpec:
    """The bundle of a ``medseg-checkpoint-1`` file, derived from its embedded config."""
    config = config_from_dict(raw["config"], source=f"{path} (embedded config)")
    names = {int(k): str(v) for k, v in raw["label_names"].items()}
    bundle = ModelBundle.from_config(config, names, int(raw.get("in_channels", 1)))
    best = raw.get("best_dice")
    validation = ValidationSummary(mean_dice=float(best) if best is not None and best >= 0 else None,
                                   epoch=raw.get("best_epoch"))
    provenance = bundle.spec.provenance.model_copy(update={"validation": validation, "versions": {}})
    return bundle.spec.model_copy(update={"provenance": provenance})


def _read_bundle_file(path: Path, mmap: bool = False) -> tuple[dict[str, Any], BundleSpec]:
    """The file's raw entries (``weights_only=True``) and its validated spec. ``mmap`` maps the tensors
    instead of reading them (the spec alone is then read from disk)."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # torch raises pickle, zip and runtime errors for foreign files
        raise CheckpointError(f"{path}: not a readable medseg model ({type(exc).__name__}: {exc})") from None
    fmt = raw.get("format") if isinstance(raw, dict) else None
    if fmt not in (BUNDLE_FORMAT, LEGACY_CHECKPOINT_FORMAT):
        raise CheckpointError(f"{path}: not a medseg model (expected format {BUNDLE_FORMAT}, found {fmt!r})")
    if not isinstance(raw.get("model_state"), dict):
        raise CheckpointError(f"{path}: holds no weights ('model_state')")
    if fmt == LEGACY_CHECKPOINT_FORMAT:
        return raw, _legacy_spec(raw, path)
    try:
        return raw, BundleSpec.model_validate(raw["bundle"])
    except (ValidationError, KeyError) as exc:
        detail = format_validation_errors(exc) if isinstance(exc, ValidationError) else "  no 'bundle' entry"
        raise CheckpointError(f"{path}: invalid model bundle\n{detail}") from None


def read_bundle_spec(model: Path) -> BundleSpec:
    """A bundle's spec (labels, network, input channels, QC limits...) without reading its weights: the file
    is memory-mapped, so this is cheap for a driver that only plans the work (predict, Ray)."""
    return _read_bundle_file(resolve_bundle_path(model), mmap=True)[1]


def load_bundle(model: Path, verify: bool = True) -> ModelBundle:
    """Read a bundle (a file, or a run folder's best one) with ``weights_only=True``.

    ``verify`` checks the weights against their recorded SHA-256 (a corrupted or edited file is refused).
    """
    path = resolve_bundle_path(model)
    raw, spec = _read_bundle_file(path)
    weights = raw["model_state"]
    if raw["format"] == LEGACY_CHECKPOINT_FORMAT:
        state = {k: v for k, v in raw.items() if k not in ("format", "config", "label_names", "in_channels", "model_state")}
    else:
        state = {k: v for k, v in raw.items() if k not in ("format", "bundle", "model_state")}
        recorded = spec.provenance.weights_sha256
        if verify and recorded and weights_sha256(weights) != recorded:
            raise CheckpointError(f"{path}: the weights do not match their recorded SHA-256 (file corrupted or edited)")
    return ModelBundle(spec, weights, path, state)
