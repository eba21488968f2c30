"""Evaluate a folder of predicted masks against reference labels, and write tables, JSON and report.html.

``evaluate_folders`` is the one entry point of ``medseg evaluate``; ``lesion_inventory`` lists the lesions
of predictions alone (``medseg predict --report``). Any pair of NIfTI label folders works (ours, nnU-Net's,
TotalSegmentator's): cases are matched by file name without ``.nii``/``.nii.gz``.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from medseg.config import EvaluateConfig
from medseg.errors import CheckpointError, GeometryError, MedsegError, ScanError
from medseg.evaluation.lesions import (
    DetectionCounts,
    Lesion,
    LesionMatch,
    LesionSet,
    MatchStatus,
    detection_counts,
    find_lesions,
    match_lesions,
)
from medseg.evaluation.metrics import ClassMetrics, PairStatus, Stats, label_metrics, summarize, voxel_spacing
from medseg.io.nifti import is_nifti_path, load_nifti, nifti_stem

log = logging.getLogger(__name__)

# Metrics summarised per class, in the order tables show them.
SUMMARY_METRICS = ("dice", "nsd", "hd95_mm", "assd_mm", "reference_ml", "prediction_ml", "volume_difference_ml")

# Errors that make one case fail (listed in the outputs) without stopping the others: our own (unreadable
# file, wrong grid, not a label map) and what numpy/nibabel raise on damaged data.
CASE_ERRORS: tuple[type[Exception], ...] = (MedsegError, OSError, ValueError)

# Shapes agree exactly; affines to this many mm (float32 headers written by other tools round differently).
AFFINE_TOLERANCE_MM = 1e-3


@dataclass
class CaseResult:
    """Metrics of one case, per class id; lesion matches and dropped small lesions per lesion class."""

    case_id: str
    reference_path: Path
    prediction_path: Path | None
    image_path: Path | None
    spacing_mm: tuple[float, float, float]
    metrics: dict[int, ClassMetrics]
    lesions: dict[int, list[LesionMatch]] = field(default_factory=dict)
    dropped: dict[int, dict[str, list[Lesion]]] = field(default_factory=dict)

    @property
    def mean_dice(self) -> float | None:
        """Mean Dice over this case's classes where Dice is defined; ``None`` when none is."""
        values = [m.dice for m in self.metrics.values() if m.dice is not None]
        return float(np.mean(values)) if values else None


@dataclass(frozen=True)
class CaseFailure:
    """A case that could not be evaluated (unreadable file, wrong grid, not a label map) and why."""

    case_id: str
    reason: str


@dataclass(frozen=True)
class ClassSummary:
    """One class over all cases: statistics per metric, and how many cases fell under each empty-case status."""

    class_id: int
    name: str
    nsd_tolerance_mm: float
    stats: dict[str, Stats]
    status_counts: dict[str, int]

    @property
    def dice(self) -> Stats:
        """Statistics of Dice."""
        return self.stats["dice"]

    @property
    def mean(self) -> float | None:
        """Mean Dice over cases where it is defined."""
        return self.dice.mean

    @property
    def median(self) -> float | None:
        """Median Dice over cases where it is defined."""
        return self.dice.median

    @property
    def std(self) -> float | None:
        """Standard deviation of Dice."""
        return self.dice.std

    @property
    def iqr(self) -> float | None:
        """Inter-quartile range of Dice."""
        return self.dice.iqr

    @property
    def n(self) -> int:
        """Cases with a defined Dice."""
        return self.dice.n

    @property
    def n_undefined(self) -> int:
        """Cases where Dice is undefined (both masks empty)."""
        return self.dice.n_undefined


@dataclass(frozen=True)
class LesionClassSummary:
    """Lesion detection of one class over all cases, overall (``"all"``) and by size bucket."""

    class_id: int
    name: str
    detection: dict[str, DetectionCounts]
    mean_lesion_dice: float | None
    dropped_reference: int
    dropped_prediction: int


@dataclass
class EvaluationResult:
    """Everything an evaluation computed, and where its files are."""

    output_dir: Path
    label_names: dict[int, str]
    config: EvaluateConfig
    cases: list[CaseResult]
    per_class: dict[str, ClassSummary]
    lesion_summary: dict[str, LesionClassSummary]
    missing_predictions: list[str]
    unmatched_predictions: list[str]
    files: dict[str, Path] = field(default_factory=dict)
    failures: list[CaseFailure] = field(default_factory=list)
    #: QC flags medseg predict gave each case (its ``statistics.json`` in the prediction folder), if any.
    qc_flags: dict[str, list[str]] = field(default_factory=dict)

    @property
    def mean_foreground_dice(self) -> float:
        """Mean over foreground classes of the per-class mean Dice (undefined cases excluded); NaN if none."""
        means = [s.mean for s in self.per_class.values() if s.mean is not None]
        return float(np.mean(means)) if means else float("nan")

    def describe(self) -> str:
        """A short human summary: per-class Dice table, lesion detection, problems, and the output files."""
        lines = [f"evaluated {len(self.cases)} case(s); mean foreground Dice {self.mean_foreground_dice:.4f}"]
        width = max([len(n) for n in self.per_class] + [5])
        lines.append(f"  {'class':<{width}}  {'mean':>6}  {'median':>6}  {'std':>6}  {'n':>4}  {'both∅':>5}  {'pred∅':>5}  "
                     f"{'ref∅':>5}  {'HD95 mm':>8}  {'NSD':>6}")
        for name, s in self.per_class.items():
            c = s.status_counts
            lines.append(f"  {name:<{width}}  {_fmt(s.mean)}  {_fmt(s.median)}  {_fmt(s.std)}  {s.n:>4}  "
                         f"{c[PairStatus.BOTH_EMPTY]:>5}  {c[PairStatus.PREDICTION_EMPTY]:>5}  {c[PairStatus.REFERENCE_EMPTY]:>5}  "
                         f"{_fmt(s.stats['hd95_mm'].median, 8, 2)}  {_fmt(s.stats['nsd'].mean)}")
        lines.append("  (Dice mean/median/std over cases where defined; both∅ = both masks empty, Dice undefined; "
                     "pred∅/ref∅ = one side empty, Dice 0; HD95 median)")
        for name, les in self.lesion_summary.items():
            d = les.detection["all"]
            lines.append(f"  lesions '{name}': TP {d.tp}, FN {d.fn}, FP {d.fp}; sensitivity {_fmt(d.sensitivity, 0)}, "
                         f"precision {_fmt(d.precision, 0)}, F1 {_fmt(d.f1, 0)}")
        if self.missing_predictions:
            how = "scored as empty" if self.config.missing_as_empty else "NOT scored"
            lines.append(f"  WARNING: {len(self.missing_predictions)} reference case(s) have no prediction ({how}): "
                         f"{', '.join(self.missing_predictions[:5])}{' ...' if len(self.missing_predictions) > 5 else ''}")
        if self.failures:
            lines.append(f"  WARNING: {len(self.failures)} case(s) failed and were not evaluated:")
            lines += [f"    {f.case_id}: {f.reason}" for f in self.failures[:10]]
            if len(self.failures) > 10:
                lines.append(f"    ... and {len(self.failures) - 10} more (evaluation_failures.csv)")
        if self.unmatched_predictions:
            lines.append(f"  {len(self.unmatched_predictions)} prediction(s) have no reference: "
                         f"{', '.join(self.unmatched_predictions[:5])}{' ...' if len(self.unmatched_predictions) > 5 else ''}")
        for key, path in self.files.items():
            lines.append(f"  {key}: {path}")
        return "\n".join(lines)


def _fmt(value: float | None, width: int = 6, digits: int = 4) -> str:
    text = "-" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"
    return f"{text:>{width}}" if width else text


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


def label_array(img, path: Path) -> np.ndarray:
    """Integer label values of a mask; refuses fractional or negative values (probability maps, wrong file)."""
    data = np.asanyarray(img.dataobj)
    if data.dtype.kind == "f":
        rounded = np.rint(data)
        if not np.array_equal(rounded, data):
            raise ScanError(path, "not a label map: it has non-integer values (a probability map or an image?)")
        data = rounded
    if data.dtype.kind in "fi" and data.size and data.min() < 0:
        raise ScanError(path, f"not a label map: it has negative values (min {data.min()})")
    # The smallest unsigned type that holds the labels: a whole-body CT label map stays uint8, not 4x larger.
    return data.astype(np.min_scalar_type(int(data.max()) if data.size else 0), copy=False)


def check_same_grid(ref_img, ref_path: Path, other_img, other_path: Path, what: str = "prediction") -> None:
    """Refuse a pair whose shapes or affines differ; the message names both files and the difference."""
    if tuple(ref_img.shape[:3]) != tuple(other_img.shape[:3]):
        raise GeometryError(other_path, f"{what} shape {tuple(other_img.shape[:3])} differs from reference "
                                        f"{ref_path} shape {tuple(ref_img.shape[:3])}")
    difference = float(np.max(np.abs(np.asarray(ref_img.affine) - np.asarray(other_img.affine))))
    if difference > AFFINE_TOLERANCE_MM:
        raise GeometryError(other_path, f"{what} affine differs from reference {ref_path} by up to {difference:.4g} mm:\n"
                                        f"{what}:\n{np.round(other_img.affine, 4)}\nreference:\n{np.round(ref_img.affine, 4)}")


def find_image(case_id: str, images_dir: Path | None, manifest_images: dict[str, Path]) -> Path | None:
    """The image of a case: ``<images_dir>/<case>.nii.gz`` or nnU-Net's ``<case>_0000.nii.gz``, else the manifest's."""
    if images_dir is not None:
        for name in (case_id, f"{case_id}_0000"):
            for suffix in (".nii.gz", ".nii"):
                if (Path(images_dir) / f"{name}{suffix}").is_file():
                    return Path(images_dir) / f"{name}{suffix}"
    return manifest_images.get(case_id)


def load_image_on_grid(path: Path | None, ref_img, ref_path: Path) -> np.ndarray | None:
    """The image as float32 if it lies on the reference grid; ``None`` (with a warning) otherwise."""
    if path is None:
        return None
    from medseg.io.scans import load_scan

    img = load_scan(path)
    try:
        check_same_grid(ref_img, ref_path, img, path, what="image")
    except GeometryError as exc:
        log.warning("image not used (intensities and overlay background left out): %s", exc)
        return None
    return np.asarray(img.dataobj, dtype=np.float32)


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
    ref_img = load_nifti(reference_path)
    reference = label_array(ref_img, reference_path)
    if prediction_path is not None:
        pred_img = load_nifti(prediction_path)
        check_same_grid(ref_img, reference_path, pred_img, prediction_path)
        prediction = label_array(pred_img, prediction_path)
    else:
        prediction = np.zeros_like(reference)
    # order="K" reads in memory order: no copy of Fortran-ordered NIfTI arrays.
    present = (set(np.flatnonzero(np.bincount(reference.ravel(order="K"))))
               | set(np.flatnonzero(np.bincount(prediction.ravel(order="K")))))
    case_classes = sorted({int(k) for k in classes} | {int(k) for k in present if k != 0})
    tolerances = {k: config.tolerance_mm(k) for k in case_classes}
    affine = np.asarray(ref_img.affine)
    result = CaseResult(case_id, reference_path, prediction_path, image_path, voxel_spacing(affine),
                        label_metrics(prediction, reference, affine, case_classes, tolerances, config.nsd_tolerance_mm))
    if config.lesion_classes:
        image = load_image_on_grid(image_path, ref_img, reference_path)
        for k in config.lesion_classes:
            ref_set = find_lesions(reference == k, affine, config.connectivity, config.min_lesion_volume_ml, image)
            pred_set = find_lesions(prediction == k, affine, config.connectivity, config.min_lesion_volume_ml, image)
            result.lesions[k] = match_lesions(ref_set, pred_set, config.match_min_iou)
            result.dropped[k] = {"reference": ref_set.dropped, "prediction": pred_set.dropped}
    return result


def _class_name(k: int, names: dict[int, str]) -> str:
    return names.get(k, f"class_{k}")


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


@dataclass
class LesionInventory:
    """Lesions of each predicted scan, per lesion class; and the files written."""

    lesions: dict[str, dict[int, LesionSet]]
    label_names: dict[int, str]
    files: dict[str, Path] = field(default_factory=dict)

    def describe(self) -> str:
        """One line per scan: lesion count and total volume per class."""
        lines = []
        for case_id, per_class in self.lesions.items():
            parts = [f"{_class_name(k, self.label_names)}: {len(s)} lesion(s), {sum(x.volume_ml for x in s.lesions):.2f} mL"
                     for k, s in per_class.items()]
            lines.append(f"  {case_id}: {'; '.join(parts)}")
        lines += [f"  {key}: {path}" for key, path in self.files.items()]
        return "\n".join(lines)


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
        image = load_image_on_grid(find_image(case_id, images_dir, {}), img, path)
        found[case_id] = {k: find_lesions(mask == k, np.asarray(img.affine), cfg.connectivity, cfg.min_lesion_volume_ml, image)
                          for k in cfg.lesion_classes}
    inventory = LesionInventory(found, dict(label_names or {}))
    inventory.files = write_inventory(inventory, Path(output_dir) if output_dir is not None else Path(pred_dir), cfg)
    return inventory


__all__ = [
    "CaseFailure", "CaseResult", "ClassSummary", "EvaluationResult", "LesionClassSummary", "LesionInventory", "MatchStatus",
    "evaluate_case", "evaluate_folders", "lesion_inventory", "load_label_names",
]
