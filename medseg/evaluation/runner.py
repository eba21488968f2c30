"""Evaluate a folder of predicted masks against reference labels, and write tables, JSON and report.html.

``evaluate_folders`` is the one entry point of ``medseg evaluate``; ``lesion_inventory`` lists the lesions
of predictions alone (``medseg predict --report``). Any pair of NIfTI label folders works (ours, nnU-Net's,
TotalSegmentator's): cases are matched by file name without ``.nii``/``.nii.gz``.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from medseg.config import EvaluateConfig
from medseg.errors import CheckpointError, MedsegError, ScanError
from medseg.evaluation.cases import find_image, label_array, load_image_on_grid
from medseg.evaluation.lesions import (
    LesionSet,
    MatchStatus,
    detection_counts,
    find_lesions,
    match_lesions,
)
from medseg.evaluation.metrics import ClassMetrics, PairStatus, label_metrics, summarize
from medseg.evaluation.results import (
    SUMMARY_METRICS,
    CaseFailure,
    CaseResult,
    ClassSummary,
    EvaluationResult,
    LesionClassSummary,
    LesionInventory,
    _class_name,
)
from medseg.io.nifti import is_nifti_path, load_nifti, nifti_stem
from medseg.io.volume import Volume

log = logging.getLogger(__name__)

# Errors that make one case fail (listed in the outputs) without stopping the others: our own (unreadable
# file, wrong grid, not a label map) and what numpy/nibabel raise on damaged data.
CASE_ERRORS: tuple[type[Exception], ...] = (MedsegError, OSError, ValueError)


def _nifti_files(folder: Path, what: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise ScanError(folder, f"{what} folder not found")
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and is_nifti_path(path):
            stem = nifti_stem(path)
            if stem in files:
                raise ScanError(path, f"two {what} files for case '{stem}': {files[stem].name} and {path.name}")
            files[stem] = path
    return files


@dataclass(frozen=True)
class _ReferenceSet:
    labels: dict[str, Path]
    images: dict[str, Path]
    label_names: dict[int, str]


def _references(labels: Path) -> _ReferenceSet:
    """Reference labels (and images, from a manifest) by case id."""
    labels = Path(labels)
    if labels.is_file() and labels.suffix.lower() == ".json":
        from medseg.data.manifest import load_manifest

        manifest = load_manifest(labels)
        refs = {c.id: manifest.label_path(c) for c in manifest.cases if c.label}
        if not refs:
            raise MedsegError(f"{labels}: the manifest lists no case with a label to evaluate against")
        images = {c.id: manifest.image_path(c) for c in manifest.cases}
        return _ReferenceSet(refs, images, dict(manifest.labels))  # type: ignore[arg-type]
    refs = _nifti_files(labels, "reference label")
    if not refs:
        raise ScanError(labels, "no reference NIfTI files (.nii/.nii.gz) in this folder")
    return _ReferenceSet(refs, {}, {})


def load_label_names(source: Path) -> dict[int, str]:
    """Label names ``{value: name}`` of a model bundle (a file or a run folder's ``best.pt``/``last.pt``).

    A run folder without a model (training stopped before its first epoch) gives its ``config.yaml``
    manifest's labels.
    """
    from medseg.models.bundle import load_bundle

    source = Path(source)
    if source.is_dir() and not any((source / n).is_file() for n in ("best.pt", "last.pt")):
        config_path = source / "config.yaml"
        if config_path.is_file():
            from medseg.config import load_config
            from medseg.data.manifest import load_manifest

            return dict(load_manifest(load_config(config_path).data.manifest).labels)
        raise CheckpointError(f"{source}: no best.pt, last.pt or config.yaml in this run folder")
    return load_bundle(source, verify=False).label_names


def _options(config: EvaluateConfig | None, options: dict) -> EvaluateConfig:
    base = (config or EvaluateConfig()).model_dump()
    unknown = sorted(set(options) - set(base))
    if unknown:
        raise TypeError(f"unknown evaluation option(s) {unknown}; known: {sorted(base)}")
    from pydantic import ValidationError

    from medseg.errors import ConfigError

    try:
        return EvaluateConfig.model_validate({**base, **options})
    except ValidationError as exc:
        raise ConfigError(f"evaluation options: {exc}") from None


def evaluate_case(
    case_id: str,
    reference_path: Path,
    prediction_path: Path | None,
    classes: Iterable[int],
    config: EvaluateConfig,
    image_path: Path | None = None,
) -> CaseResult:
    """Metrics of one case (a missing prediction, ``None``, is scored as an empty mask)."""
    ref_volume = Volume(load_nifti(reference_path), Path(reference_path))
    ref_img = ref_volume.image
    reference = label_array(ref_img, reference_path)
    if prediction_path is not None:
        pred_img = load_nifti(prediction_path)
        ref_volume.check_same_grid(Volume(pred_img, Path(prediction_path)), what="prediction", reference_what="reference")
        prediction = label_array(pred_img, prediction_path)
    else:
        prediction = np.zeros_like(reference)
    # order="K" reads in memory order: no copy of Fortran-ordered NIfTI arrays.
    present = (set(np.flatnonzero(np.bincount(reference.ravel(order="K"))))
               | set(np.flatnonzero(np.bincount(prediction.ravel(order="K")))))
    case_classes = sorted({int(k) for k in classes} | {int(k) for k in present if k != 0})
    tolerances = {k: config.tolerance_mm(k) for k in case_classes}
    affine = np.asarray(ref_img.affine)
    result = CaseResult(case_id, reference_path, prediction_path, image_path, ref_volume.spacing,
                        label_metrics(prediction, reference, affine, case_classes, tolerances, config.nsd_tolerance_mm))
    if config.lesion_classes:
        image = load_image_on_grid(image_path, ref_volume)
        for k in config.lesion_classes:
            ref_set = find_lesions(reference == k, affine, config.connectivity, config.min_lesion_volume_ml, image)
            pred_set = find_lesions(prediction == k, affine, config.connectivity, config.min_lesion_volume_ml, image)
            result.lesions[k] = match_lesions(ref_set, pred_set, config.match_min_iou)
            result.dropped[k] = {"reference": ref_set.dropped, "prediction": pred_set.dropped}
    return result


def summarize_classes(cases: list[CaseResult], label_names: dict[int, str], config: EvaluateConfig) -> dict[str, ClassSummary]:
    """Per-class statistics; a class absent from a case (both masks empty there) counts as both-empty."""
    classes = sorted({k for c in cases for k in c.metrics} | {k for k in label_names if k != 0})
    out: dict[str, ClassSummary] = {}
    for k in classes:
        tol = config.tolerance_mm(k)
        empty = ClassMetrics(PairStatus.BOTH_EMPTY, None, None, None, None, tol, 0.0, 0.0)
        rows = [c.metrics.get(k, empty) for c in cases]
        for c in cases:
            c.metrics.setdefault(k, empty)
        stats = {m: summarize(getattr(r, m) for r in rows) for m in SUMMARY_METRICS}
        counts = {str(s): sum(r.status == s for r in rows) for s in PairStatus}
        name = _class_name(k, label_names)
        key = name if name not in out else f"{name} ({k})"
        out[key] = ClassSummary(k, name, tol, stats, counts)
    return out


def summarize_lesions(cases: list[CaseResult], label_names: dict[int, str], config: EvaluateConfig) -> dict[str, LesionClassSummary]:
    """Lesion detection per lesion class, pooled over cases."""
    out: dict[str, LesionClassSummary] = {}
    for k in config.lesion_classes:
        matches = [m for c in cases for m in c.lesions.get(k, [])]
        ref_dice = [m.dice for m in matches if m.reference is not None]
        out[_class_name(k, label_names)] = LesionClassSummary(
            k, _class_name(k, label_names),
            detection_counts(matches, config.size_buckets_mm, config.size_by),
            float(np.mean(ref_dice)) if ref_dice else None,
            sum(len(c.dropped.get(k, {}).get("reference", [])) for c in cases),
            sum(len(c.dropped.get(k, {}).get("prediction", [])) for c in cases),
        )
    return out


def evaluate_folders(
    pred_dir: Path,
    labels: Path,
    output_dir: Path,
    label_names_from: Path | None = None,
    *,
    images_dir: Path | None = None,
    label_names: dict[int, str] | None = None,
    config: EvaluateConfig | None = None,
    progress: bool = True,
    cases: Collection[str] | None = None,
    **options: object,
) -> EvaluationResult:
    """Compare ``pred_dir/<case>.nii.gz`` with reference labels and write the results to ``output_dir``.

    ``labels`` is a folder of reference NIfTIs or a manifest JSON (which also gives label names and images).
    ``label_names_from`` is a checkpoint or run folder whose ``label_names`` win over the manifest's;
    ``label_names`` (``{value: name}``) wins over both. Without names, classes are ``class_<k>``.
    ``images_dir`` holds images (``<case>.nii.gz`` or ``<case>_0000.nii.gz``) for lesion intensities and
    report pictures. ``options`` override fields of ``config`` (:class:`medseg.config.EvaluateConfig`),
    e.g. ``lesion_classes=[2]``, ``nsd_tolerance_mm=1.0``. ``cases`` (e.g. a manifest split's ids) limits
    the evaluation to those cases: references and predictions of other cases are left out, unreported.

    Writes ``metrics_per_case.csv``, ``summary.csv``, ``evaluation_failures.csv``, ``evaluation.json``, with lesion
    classes ``lesions.csv`` and ``lesion_detection.csv``, and ``report.html`` (see docs/evaluation.md).
    A case that cannot be evaluated (unreadable, wrong grid) is listed in ``result.failures`` and the
    outputs, and the others are evaluated; when no case can be, a :class:`MedsegError` says why.
    """
    from medseg.evaluation.reports import write_reports
    from medseg.inference.statistics import qc_flags_by_case

    cfg = _options(config, options)
    pred_dir, output_dir = Path(pred_dir), Path(output_dir)
    refs = _references(Path(labels))
    predictions = _nifti_files(pred_dir, "prediction")
    if cases is not None:
        wanted = set(cases)
        unlabelled = sorted(wanted - set(refs.labels))
        if unlabelled:
            raise MedsegError(f"{labels}: {len(unlabelled)} case(s) to evaluate have no reference label, "
                              f"e.g. {unlabelled[:3]}")
        refs = _ReferenceSet({k: v for k, v in refs.labels.items() if k in wanted}, refs.images, refs.label_names)
        predictions = {k: v for k, v in predictions.items() if k in wanted}
    if label_names is not None:
        label_names = {int(k): str(v) for k, v in label_names.items()}
    elif label_names_from is not None:
        label_names = load_label_names(Path(label_names_from))
    else:
        label_names = dict(refs.label_names)
    missing = sorted(set(refs.labels) - set(predictions))
    unmatched = sorted(set(predictions) - set(refs.labels))
    to_score = sorted(refs.labels) if cfg.missing_as_empty else sorted(set(refs.labels) & set(predictions))
    if not to_score:
        raise MedsegError(f"{pred_dir}: no prediction matches a reference case by name "
                          f"(references e.g. {sorted(refs.labels)[:3]}, predictions e.g. {sorted(predictions)[:3]})")
    if missing:
        log.warning("%d reference case(s) have no prediction in %s: %s", len(missing), pred_dir, missing[:5])

    classes = [k for k in label_names if k != 0]
    cases: list[CaseResult] = []
    failures: list[CaseFailure] = []
    for case_id in tqdm(to_score, desc="evaluate", unit="case", disable=not progress):
        image = find_image(case_id, images_dir, refs.images)
        try:
            cases.append(evaluate_case(case_id, refs.labels[case_id], predictions.get(case_id), classes, cfg, image))
        except CASE_ERRORS as exc:
            # One bad file must not cost the results of every other case: list it and go on.
            reason = str(exc) if isinstance(exc, MedsegError) else f"{type(exc).__name__}: {exc}"
            failures.append(CaseFailure(case_id, reason))
            log.warning("case %s not evaluated: %s", case_id, reason)
    if not cases:
        listed = "; ".join(f"{f.case_id}: {f.reason}" for f in failures[:5])
        raise MedsegError(f"no case could be evaluated ({len(failures)} failed): {listed}"
                          + (" ..." if len(failures) > 5 else ""))

    per_class = summarize_classes(cases, label_names, cfg)
    result = EvaluationResult(
        output_dir=output_dir,
        label_names={k: _class_name(k, label_names) for k in sorted({0, *label_names, *(s.class_id for s in per_class.values())})},
        config=cfg,
        cases=cases,
        per_class=per_class,
        lesion_summary=summarize_lesions(cases, label_names, cfg),
        missing_predictions=missing,
        unmatched_predictions=unmatched,
        failures=failures,
        qc_flags={case: flags for case, flags in qc_flags_by_case(pred_dir).items() if case in set(to_score)},
    )
    result.files = write_reports(result, pred_dir=pred_dir, labels=Path(labels), images_dir=images_dir)
    return result


def lesion_inventory(
    pred_dir: Path,
    lesion_classes: list[int],
    images_dir: Path | None = None,
    output_dir: Path | None = None,
    *,
    label_names: dict[int, str] | None = None,
    config: EvaluateConfig | None = None,
    progress: bool = True,
) -> LesionInventory:
    """Lesions in predictions alone (no reference): volume (mL), diameters (mm), centroid (RAS mm), intensity.

    Writes ``lesion_inventory.csv`` and ``lesion_inventory.json`` to ``output_dir`` (default ``pred_dir``).
    """
    from medseg.evaluation.reports import write_inventory

    cfg = _options(config, {"lesion_classes": list(lesion_classes)})
    if not cfg.lesion_classes:
        raise MedsegError("lesion_inventory needs at least one lesion class")
    predictions = _nifti_files(Path(pred_dir), "prediction")
    if not predictions:
        raise ScanError(pred_dir, "no NIfTI masks in this folder")
    found: dict[str, dict[int, LesionSet]] = {}
    for case_id, path in tqdm(predictions.items(), desc="lesions", unit="scan", disable=not progress):
        img = load_nifti(path)
        mask = label_array(img, path)
        image = load_image_on_grid(find_image(case_id, images_dir, {}), Volume(img, Path(path)))
        found[case_id] = {k: find_lesions(mask == k, np.asarray(img.affine), cfg.connectivity, cfg.min_lesion_volume_ml, image)
                          for k in cfg.lesion_classes}
    inventory = LesionInventory(found, dict(label_names or {}))
    inventory.files = write_inventory(inventory, Path(output_dir) if output_dir is not None else Path(pred_dir), cfg)
    return inventory


__all__ = [
    "CaseFailure", "CaseResult", "ClassSummary", "EvaluationResult", "LesionClassSummary", "LesionInventory", "MatchStatus",
    "evaluate_case", "evaluate_folders", "lesion_inventory", "load_label_names",
]
