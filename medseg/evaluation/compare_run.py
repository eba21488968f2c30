"""Running ``medseg compare``: predict a manifest split with each model (or take prediction folders), evaluate,
pair, check forgetting, and write the comparison files (:mod:`medseg.evaluation.compare_report`).

The statistics and result types live in :mod:`medseg.evaluation.compare`; this module only runs and writes.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from medseg.config import EvaluateConfig
from medseg.errors import ManifestError, MedsegError
from medseg.evaluation.compare import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    FORGETTING_TOLERANCE,
    ComparisonResult,
    ForgettingCheck,
    ModelInfo,
    _slug,
    compare_evaluations,
    display_names,
    model_info,
    provenance_chain,
    source_model,
)
from medseg.evaluation.compare_report import write_comparison
from medseg.evaluation.runner import EvaluationResult, evaluate_folders

log = logging.getLogger(__name__)




def _evaluate(pred_dir: Path, labels: Path, output_dir: Path, cases: Sequence[str] | None,
              label_names: dict[int, str] | None, config: EvaluateConfig) -> EvaluationResult:
    return evaluate_folders(pred_dir, labels, output_dir, label_names=label_names, config=config, cases=cases,
                            html_report=False, progress=False)


def compare_prediction_folders(pred_dirs: Sequence[Path], labels: Path, output_dir: Path, *,
                               names: Sequence[str] | None = None, split: str | None = None, fold: int | None = None,
                               config: EvaluateConfig | None = None, resamples: int = BOOTSTRAP_RESAMPLES,
                               seed: int = BOOTSTRAP_SEED, write: bool = True) -> ComparisonResult:
    """Compare existing prediction folders (``<case>.nii.gz`` each) against ``labels`` (a folder, or a manifest
    whose ``split`` [of ``fold``] chooses the cases). ``names`` default to the folders' names.

    Writes ``comparison.csv``, ``comparison.json``, ``report.html`` and each folder's evaluation (under
    ``output_dir/evaluations/``) unless ``write`` is False.
    """
    pred_dirs = [Path(p) for p in pred_dirs]
    names = list(names) if names else display_names([ModelInfo(p.name or str(p)) for p in pred_dirs])
    if len(names) != len(pred_dirs):
        raise MedsegError(f"--names gives {len(names)} name(s) for {len(pred_dirs)} prediction folder(s)")
    cases = _split_ids(Path(labels), split, fold)
    cfg = config or EvaluateConfig()
    evaluations = [_evaluate(p, Path(labels), Path(output_dir) / "evaluations" / _slug(n), cases, None, cfg)
                   for p, n in zip(pred_dirs, names, strict=True)]
    result = compare_evaluations(names, evaluations, resamples=resamples, seed=seed)
    result.models = [None] * len(names)
    result.inputs = {"labels": str(Path(labels).resolve()), "split": split, "fold": fold,
                     "predictions": [str(p.resolve()) for p in pred_dirs]}
    result.output_dir = Path(output_dir)
    if write:
        result.files = write_comparison(result)
    return result


def _split_ids(labels: Path, split: str | None, fold: int | None) -> list[str] | None:
    if split is None:
        if fold is not None:
            raise MedsegError("--fold chooses a split of a fold: give --split too")
        return None
    if labels.suffix.lower() != ".json":
        raise MedsegError(f"--split {split} chooses cases of a manifest, but the labels {labels} are a folder")
    from medseg.data.manifest import load_manifest

    manifest = load_manifest(labels)
    ids = [c.id for c in manifest.split(split, fold)]
    if not ids:
        raise ManifestError(f"{labels}: split '{split}'" + (f" of fold {fold}" if fold is not None else "")
                            + " has no cases")
    return ids


@dataclass(frozen=True)
class PredictOptions:
    """How ``compare`` runs the models (as ``medseg predict`` would)."""

    device: str = "auto"
    mirror: bool | None = None
    max_memory_gib: float | None = None


def _predict_split(model: ModelInfo, name: str, manifest_path: Path, split: str, fold: int | None, output_dir: Path,
                   options: PredictOptions) -> Path:
    """Predict a manifest split with one model into ``output_dir/predictions/<model>-<weights>/<manifest>_<split>/``
    (existing masks kept: a rerun resumes, and a second use of the same split costs nothing; the folder
    names the weights' SHA-256, so other weights under the same name never reuse these masks)."""
    from medseg.data.manifest import load_manifest, split_scans
    from medseg.inference.runner import predict_paths

    digest = hashlib.sha256(str(Path(manifest_path).resolve()).encode()).hexdigest()[:8]
    where = f"{_slug(Path(manifest_path).stem)}-{digest}_{split}" + (f"_fold{fold}" if fold is not None else "")
    pred_dir = Path(output_dir) / "predictions" / f"{_slug(name)}-{(model.weights_sha256 or 'unhashed')[:12]}" / where
    scans = split_scans(load_manifest(manifest_path), split, fold)
    summary = predict_paths(model.path, [], pred_dir, device=options.device, mirror=options.mirror, statistics=False,
                            max_memory_gib=options.max_memory_gib, scans=scans)
    if summary.failed:
        log.warning("%s: %d case(s) could not be predicted (see %s/failures.csv)", name, len(summary.failed), pred_dir)
    return pred_dir


def compare_models(models: Sequence[Path], manifest: Path, split: str, output_dir: Path, *, fold: int | None = None,
                   options: PredictOptions | None = None, config: EvaluateConfig | None = None,
                   forgetting_tolerance: float = FORGETTING_TOLERANCE, forgetting: bool = True,
                   resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> ComparisonResult:
    """Predict a manifest split with each model, evaluate, pair each later model with the first, check
    fine-tuned models for forgetting, and write ``comparison.csv``, ``comparison.json`` and ``report.html``.

    Evaluation settings (lesion classes, tolerances) come from ``config``, else the first model's config.
    """
    from medseg.models.bundle import load_bundle

    options = options or PredictOptions()
    infos = [model_info(m) for m in models]
    names = display_names(infos)
    first = load_bundle(infos[0].path, verify=False)  # type: ignore[arg-type]
    cfg = config or first.config.evaluate
    label_names = first.label_names
    result = _compare_on_split(infos, names, manifest, split, fold, output_dir, options, cfg, label_names, resamples,
                               seed)
    result.models = list(infos)
    result.chains = [provenance_chain(i) for i in infos]
    if forgetting:
        result.forgetting = [forgetting_check(info, name, output_dir, options, cfg, label_names, forgetting_tolerance,
                                              resamples, seed)
                             for info, name in zip(infos, names, strict=True) if info.init_from is not None]
    result.files = write_comparison(result)
    return result


def _compare_on_split(models: Sequence[ModelInfo], names: Sequence[str], manifest: Path, split: str, fold: int | None,
                      output_dir: Path, options: PredictOptions, config: EvaluateConfig, label_names: dict[int, str],
                      resamples: int, seed: int, tag: str = "") -> ComparisonResult:
    from medseg.data.manifest import load_manifest

    ids = [c.id for c in load_manifest(manifest).split(split, fold)]
    pred_dirs = [_predict_split(m, n, manifest, split, fold, output_dir, options) for m, n in zip(models, names, strict=True)]
    evaluations = [_evaluate(p, manifest, Path(output_dir) / "evaluations" / (_slug(n) + tag), ids, label_names, config)
                   for p, n in zip(pred_dirs, names, strict=True)]
    result = compare_evaluations(names, evaluations, resamples=resamples, seed=seed)
    result.inputs = {"manifest": str(Path(manifest).resolve()), "split": split, "fold": fold,
                     "predictions": [str(p.resolve()) for p in pred_dirs]}
    result.output_dir = Path(output_dir)
    return result


def forgetting_check(info: ModelInfo, name: str, output_dir: Path, options: PredictOptions, config: EvaluateConfig,
                     label_names: dict[int, str], tolerance: float = FORGETTING_TOLERANCE,
                     resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> ForgettingCheck:
    """The source model and ``info`` (fine-tuned from it) compared on the source's own test split.

    Not done (with the reason) when the source file or its manifest is gone, the source was retrained since,
    or its manifest has no test split; done with a caveat when the manifest changed since the source trained.
    """
    check = ForgettingCheck(name, tolerance)
    source, why = source_model(info)
    if source is None:
        check.reason = why
        return check
    check.source = source
    if source.manifest_path is None or not source.manifest_path.is_file():
        check.reason = f"the source's manifest {source.manifest_path} is not reachable"
        return check
    check.manifest = source.manifest_path
    from medseg.data.manifest import load_manifest

    try:
        manifest = load_manifest(source.manifest_path)
    except ManifestError as exc:
        check.reason = f"the source's manifest cannot be read: {exc}"
        return check
    if not [c for c in manifest.split("test") if c.label]:
        check.reason = f"the source's manifest {source.manifest_path} has no labelled test split"
        return check
    digest = hashlib.sha256(source.manifest_path.read_bytes()).hexdigest()
    if source.manifest_sha256 and digest != source.manifest_sha256:
        check.reason = "the source's manifest changed since the source was trained (SHA-256 differs)"
    names = display_names([source, info])
    if names[0] == name:  # the source is also a compared model under this name: keep the names apart
        names[0] = f"{names[0]} (source)"
    try:
        check.comparison = _compare_on_split([source, info], [names[0], name], source.manifest_path,
                                             "test", None, output_dir, options, config, label_names, resamples, seed,
                                             tag="-source-test")
    except MedsegError as exc:
        check.reason = f"could not be evaluated: {exc}"
    return check


__all__ = ["PredictOptions", "compare_models", "compare_prediction_folders", "forgetting_check"]
