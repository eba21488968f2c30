"""What an evaluation computed: per-case results, per-class and lesion summaries, failures, the lesion
inventory. Plain result types in their own module, so the code that computes them
(:mod:`medseg.evaluation.runner`) and the code that renders them (:mod:`medseg.evaluation.reports`,
:mod:`medseg.evaluation.figures`) both import them and not each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medseg.config import EvaluateConfig
from medseg.evaluation.lesions import DetectionCounts, Lesion, LesionMatch, LesionSet
from medseg.evaluation.metrics import ClassMetrics, PairStatus, Stats

# Metrics summarised per class, in the order tables show them.
SUMMARY_METRICS = ("dice", "nsd", "hd95_mm", "assd_mm", "reference_ml", "prediction_ml", "volume_difference_ml")


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


def _class_name(k: int, names: dict[int, str]) -> str:
    return names.get(k, f"class_{k}")


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
