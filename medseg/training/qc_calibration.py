"""QC limits of a trained model, set from its training and validation cases and stored in its bundle.

Rules (docs/qc.md), each from :mod:`medseg.inference.qc`:

- modality: the manifest's;
- spacing per RAS axis: the training cases' range, widened by ``SPACING_FACTOR`` both ways;
- intensity percentiles (0.5, 50, 99.5) of the whole scan: the training cases' range of each, widened by
  ``INTENSITY_MARGIN`` x the training span (highest 99.5th minus lowest 0.5th percentile);
- class volume (mL): the range over training labels that hold the class, widened by ``VOLUME_FACTOR``;
  classes every training label holds are expected in every prediction;
- uncertainty: :func:`~medseg.inference.qc.uncertainty_limit` of the validation cases' values (predicted
  with the model itself) of the mean foreground entropy and of the low-confidence share: the higher of
  their 99th percentile and their far-out fence Q3 + 3 IQR;
- weak model: mean validation Dice below ``DEFAULT_MIN_VALIDATION_DICE``.

``calibrate_run`` adds the section to a run folder's ``best.pt`` (``medseg calibrate-qc RUN``), so models
trained before QC existed get it too; the trainer calls it at the end of every fit. The same pass records
the bf16 parity check on the validation cases (:mod:`medseg.deploy.parity`) that ``--precision auto`` reads.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from medseg.data.manifest import Manifest, ManifestCase, load_manifest
from medseg.deploy.parity import checked_precisions
from medseg.errors import CheckpointError, ConfigError
from medseg.inference.predictor import Predictor
from medseg.inference.qc import (
    INTENSITY_MARGIN,
    INTENSITY_PERCENTILES,
    SPACING_FACTOR,
    UNCERTAINTY_FENCE_IQR,
    UNCERTAINTY_PERCENTILE,
    VOLUME_FACTOR,
    intensity_percentiles,
    uncertainty_limit,
)
from medseg.io.scans import load_volume
from medseg.io.volume import voxel_volume_ml
from medseg.models.bundle import ModelBundle, QCThresholds, load_bundle, resolve_bundle_path

log = logging.getLogger(__name__)


def input_limits(manifest: Manifest, cases: Sequence[ManifestCase], progress: bool = True) -> QCThresholds:
    """The input-side limits (modality, spacing, intensities, class volumes) from the training cases."""
    if not cases:
        raise ConfigError(f"{manifest.name}: no training cases to set QC limits from")
    spacings, percentiles = [], []
    volumes: dict[int, list[float]] = {k: [] for k in manifest.labels if k}
    labelled = 0
    for case in tqdm(cases, desc="QC limits: training cases", unit="case", leave=False, disable=None if progress else True):
        volume = load_volume(manifest.image_path(case))  # input checks use the first channel (docs/qc.md)
        spacings.append(volume.ras_spacing)
        percentiles.append(intensity_percentiles(np.asanyarray(volume.image.dataobj)))
        label_path = manifest.label_path(case)
        if label_path is None:
            continue
        label = nib.load(label_path)
        counts = np.bincount(np.asarray(label.dataobj, dtype=np.int64).ravel(), minlength=manifest.num_classes)
        labelled += 1
        for k in volumes:
            if counts[k]:
                volumes[k].append(float(counts[k]) * voxel_volume_ml(label.affine))
    sp, pc = np.array(spacings), np.array(percentiles)
    margin = INTENSITY_MARGIN * float(pc[:, -1].max() - pc[:, 0].min())
    present = [k for k, v in volumes.items() if labelled and len(v) == labelled]
    return QCThresholds(
        modality=manifest.modality,
        spacing_mm_low=[float(v) for v in sp.min(axis=0) / SPACING_FACTOR],
        spacing_mm_high=[float(v) for v in sp.max(axis=0) * SPACING_FACTOR],
        intensity_percentiles=list(INTENSITY_PERCENTILES),
        intensity_low=[float(v) for v in pc.min(axis=0) - margin],
        intensity_high=[float(v) for v in pc.max(axis=0) + margin],
        volume_ml_low={k: min(v) / VOLUME_FACTOR for k, v in volumes.items() if v},
        volume_ml_high={k: max(v) * VOLUME_FACTOR for k, v in volumes.items() if v},
        always_present=present,
        calibration={"training_cases": len(cases), "labelled_training_cases": labelled,
                     "spacing_factor": SPACING_FACTOR, "intensity_margin": INTENSITY_MARGIN,
                     "volume_factor": VOLUME_FACTOR},
    )


def uncertainty_limits(predictor: Predictor, manifest: Manifest, cases: Sequence[ManifestCase],
                       progress: bool = True) -> tuple[float | None, float | None, list[dict[str, float | None]]]:
    """Entropy and low-confidence limits (:func:`~medseg.inference.qc.uncertainty_limit`) over the validation
    cases' predictions (None without validation cases or foreground), and each case's values."""
    values = []
    for case in tqdm(cases, desc="QC limits: validation cases", unit="case", leave=False, disable=None if progress else True):
        _, u = predictor.predict_image(manifest.case_image(case), with_uncertainty=True)
        values.append({"foreground_entropy": u.foreground_entropy, "low_confidence_share": u.low_confidence_share})

    def limit(key: str) -> float | None:
        seen = [v[key] for v in values if v[key] is not None]
        return uncertainty_limit(seen)

    return limit("foreground_entropy"), limit("low_confidence_share"), values


def calibrate(predictor: Predictor, manifest: Manifest, train_cases: Sequence[ManifestCase],
              val_cases: Sequence[ManifestCase], progress: bool = True) -> QCThresholds:
    """All QC limits of ``predictor``'s model from its training and validation cases."""
    limits = input_limits(manifest, train_cases, progress)
    entropy, low, values = uncertainty_limits(predictor, manifest, val_cases, progress)
    # The validation cases' own values are kept, so a limit can be re-derived (or a rule compared) later
    # without predicting them again.
    observed = {f"validation_{key}": [None if v[key] is None else round(float(v[key]), 5) for v in values]
                for key in ("foreground_entropy", "low_confidence_share")}
    calibration = {**limits.calibration, "validation_cases": len(val_cases), "uncertainty_percentile": UNCERTAINTY_PERCENTILE,
                   "uncertainty_fence_iqr": UNCERTAINTY_FENCE_IQR,
                   **observed}
    return limits.model_copy(update={"max_foreground_entropy": entropy, "max_low_confidence_share": low,
                                     "calibration": calibration})


def _split(manifest: Manifest, split: str, fold: int | None) -> list[ManifestCase]:
    return manifest.labelled(split, fold)


def validation_cases(manifest: Manifest, fold: int | None) -> list[ManifestCase]:
    """The labelled validation cases of ``fold``: what QC limits and the bf16 parity check are set from."""
    return _split(manifest, "val", fold)


def calibrate_run(model: Path, manifest_path: Path | None = None, device: str | None = "cpu",
                  progress: bool = True) -> ModelBundle:
    """Add (or renew) the ``qc`` section of a run folder's best bundle (or a bundle file), from the manifest
    and fold it was trained on (``manifest_path`` overrides the recorded manifest). Returns the saved bundle."""
    path = resolve_bundle_path(Path(model))
    bundle = load_bundle(path)
    config = bundle.config
    manifest_path = Path(manifest_path or config.data.manifest)
    manifest = load_manifest(manifest_path)
    if bundle.label_names != dict(manifest.labels):
        raise CheckpointError(f"{path}: its labels {bundle.label_names} differ from {manifest_path}'s {dict(manifest.labels)}")
    return calibrate_bundle_file(path, manifest, _split(manifest, "train", config.data.fold),
                                 _split(manifest, "val", config.data.fold), device, progress)


def calibrate_bundle_file(path: Path, manifest: Manifest, train_cases: Sequence[ManifestCase],
                          val_cases: Sequence[ManifestCase], device: str | None = "cpu",
                          progress: bool = True) -> ModelBundle:
    """Calibrate the bundle at ``path`` on the given cases and rewrite it with its ``qc`` section and a fresh bf16
    parity check (:mod:`medseg.deploy.parity`; weights and training state unchanged)."""
    bundle = load_bundle(path)
    predictor = Predictor.from_checkpoint(path, device)
    qc = calibrate(predictor, manifest, train_cases, val_cases, progress)
    checks = checked_precisions(bundle, manifest, val_cases, device, progress)
    calibrated = ModelBundle(bundle.spec.model_copy(update={"qc": qc, "precision_check": checks}), bundle.weights,
                             Path(path), bundle.training_state)
    calibrated.save(Path(path), **bundle.training_state)
    log.info("QC limits written to %s", path)
    return calibrated
