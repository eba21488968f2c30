"""Compare segmentation models case by case: paired differences, their uncertainty, and whether fine-tuning forgot.

``medseg compare`` evaluates every model on the same cases (a manifest split, or existing prediction folders)
with :func:`medseg.evaluation.runner.evaluate_folders`, then pairs each later model with the first (the
baseline) case by case:

- per class, Dice, HD95 (mm) and absolute volume error (mL): mean and median difference, a seeded percentile
  bootstrap 95 % interval of the mean difference, the Wilcoxon signed-rank p-value (scipy), and wins / ties /
  losses (a tie: the difference within :data:`TIE_TOLERANCE`);
- lesion detection changes (reference lesions found or lost, false positives) for lesion classes;
- for a model fine-tuned from another (bundle provenance ``init_from``), the same comparison of the source and
  the fine-tuned model on the source's own test split: a drop of the mean foreground Dice larger than the
  tolerance (default :data:`FORGETTING_TOLERANCE`) is flagged.

It is a report, not a gate: only :attr:`ComparisonResult.worse_than` turns a result into an exit status.
This module holds the statistics and result types; :mod:`medseg.evaluation.compare_run` runs the models and
:mod:`medseg.evaluation.compare_report` writes the files.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medseg.config import EvaluateConfig
from medseg.errors import CheckpointError, MedsegError
from medseg.evaluation.lesions import MatchStatus
from medseg.evaluation.metrics import summarize
from medseg.evaluation.runner import CaseResult, EvaluationResult

log = logging.getLogger(__name__)

#: Paired metrics: name -> (label, True when higher is better).
METRICS: dict[str, tuple[str, bool]] = {
    "dice": ("Dice", True),
    "hd95_mm": ("HD95 (mm)", False),
    "abs_volume_error_ml": ("|volume error| (mL)", False),
}
#: A case whose difference lies within this (per metric) is a tie, not a win or a loss: a Dice within 0.001,
#: an HD95 within 0.1 mm, a volume error within 0.001 mL (one 1 mm³ voxel) is noise, not a change.
TIE_TOLERANCE: dict[str, float] = {"dice": 1e-3, "hd95_mm": 0.1, "abs_volume_error_ml": 1e-3}
#: Largest drop of the mean foreground Dice on the source's test split that fine-tuning may cost unflagged.
FORGETTING_TOLERANCE = 0.02
#: Bootstrap resamples of the mean difference, and the seed that makes the interval repeatable.
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
#: The row of the per-case mean over foreground classes (Dice only), beside the per-class rows.
MEAN_CLASS = "mean foreground"
#: Links of a provenance chain followed at most (a fine-tuned model of a fine-tuned model ...).
MAX_CHAIN = 8


# ---------------------------------------------------------------------------------------------- statistics


def bootstrap_interval(differences: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                       level: float = 0.95) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean of ``differences`` (cases resampled with replacement).

    ``resamples`` draws of ``n`` case indices from ``numpy.random.default_rng(seed)``; None without data.
    """
    d = np.asarray(differences, dtype=np.float64)
    if d.size == 0:
        return None
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(resamples, d.size))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def wilcoxon_p(differences: Sequence[float]) -> float | None:
    """Two-sided Wilcoxon signed-rank p-value of paired ``differences`` (``scipy.stats.wilcoxon``, zero
    differences dropped); None when no difference is non-zero (nothing to test)."""
    from scipy.stats import wilcoxon

    d = np.asarray(differences, dtype=np.float64)
    if not np.any(d != 0):
        return None
    return float(wilcoxon(d).pvalue)


@dataclass(frozen=True)
class PairedStats:
    """One metric of one class, a model against the baseline over the cases where both values are defined.

    Differences are ``model - baseline`` in the metric's unit; ``wins`` count cases where the model is better
    by more than the tie tolerance (higher Dice, lower HD95 or volume error), ``losses`` where it is worse.
    """

    metric: str
    class_id: int | None  # None: the mean over foreground classes
    class_name: str
    n: int
    n_undefined: int  # cases left out: the value undefined for either model (e.g. HD95 of an empty mask)
    baseline_mean: float | None
    model_mean: float | None
    mean_difference: float | None
    median_difference: float | None
    ci_low: float | None
    ci_high: float | None
    p_value: float | None
    wins: int
    ties: int
    losses: int

    @property
    def higher_is_better(self) -> bool:
        return METRICS[self.metric][1]

    def as_record(self) -> dict[str, object]:
        """Flat JSON/CSV-ready mapping."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def paired_stats(metric: str, class_id: int | None, class_name: str, baseline: Sequence[float | None],
                 model: Sequence[float | None], resamples: int = BOOTSTRAP_RESAMPLES,
                 seed: int = BOOTSTRAP_SEED) -> PairedStats:
    """Paired statistics of ``model`` against ``baseline`` (one value per case, same order; None: undefined)."""
    pairs = [(a, b) for a, b in zip(baseline, model, strict=True)
             if a is not None and b is not None and np.isfinite(a) and np.isfinite(b)]
    a = np.array([p[0] for p in pairs], dtype=np.float64)
    b = np.array([p[1] for p in pairs], dtype=np.float64)
    d = b - a
    tol = TIE_TOLERANCE[metric]
    better = d if METRICS[metric][1] else -d
    ci = bootstrap_interval(d, resamples, seed)

    def stat(x: np.ndarray, f) -> float | None:
        return float(f(x)) if x.size else None

    return PairedStats(metric, class_id, class_name, int(d.size), len(baseline) - int(d.size), stat(a, np.mean),
                       stat(b, np.mean), stat(d, np.mean), stat(d, np.median), ci[0] if ci else None,
                       ci[1] if ci else None, wilcoxon_p(d), int(np.sum(better > tol)),
                       int(np.sum(np.abs(d) <= tol)), int(np.sum(better < -tol)))


# ---------------------------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelInfo:
    """A compared model as the report names it: bundle name and file, weights checksum, training data, date."""

    name: str
    path: Path | None = None
    weights_sha256: str = ""
    created: str = ""
    manifest_name: str | None = None
    manifest_sha256: str | None = None
    manifest_path: Path | None = None
    fold: int | None = None
    train_cases: int | None = None
    #: ``init_from``: the source bundle's file name, its weights checksum and where it was read from.
    init_from: str | None = None
    init_from_sha256: str = ""
    init_from_path: Path | None = None

    def as_record(self) -> dict[str, object]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in
                ((k, getattr(self, k)) for k in self.__dataclass_fields__)}


def model_info(model: Path) -> ModelInfo:
    """The :class:`ModelInfo` of a run folder or bundle file (its spec only; weights not read)."""
    from medseg.models.bundle import read_bundle_spec, resolve_bundle_path

    path = resolve_bundle_path(Path(model))
    spec = read_bundle_spec(path)
    prov = spec.provenance
    config = prov.config or {}
    manifest = (config.get("data") or {}).get("manifest")
    init_path = (config.get("train") or {}).get("init_from")
    return ModelInfo(
        name=spec.name, path=path, weights_sha256=prov.weights_sha256, created=prov.created,
        manifest_name=prov.data.manifest_name, manifest_sha256=prov.data.manifest_sha256,
        manifest_path=Path(manifest) if manifest else None, fold=prov.data.fold, train_cases=prov.data.train_cases,
        init_from=prov.init_from.source if prov.init_from else None,
        init_from_sha256=prov.init_from.source_weights_sha256 if prov.init_from else "",
        init_from_path=Path(init_path) if prov.init_from and init_path else None)


def source_model(info: ModelInfo) -> tuple[ModelInfo | None, str]:
    """The model ``info`` was fine-tuned from, if its file is still where training read it and still holds the
    same weights; else None and why."""
    if info.init_from is None:
        return None, "not fine-tuned (no init_from in its provenance)"
    if info.init_from_path is None or not info.init_from_path.exists():
        return None, f"source model {info.init_from} not found at {info.init_from_path}"
    try:
        source = model_info(info.init_from_path)
    except CheckpointError as exc:
        return None, f"source model unreadable: {exc}"
    if info.init_from_sha256 and source.weights_sha256 != info.init_from_sha256:
        return None, (f"{source.path} now holds other weights (SHA-256 {source.weights_sha256[:12]}…, fine-tuning "
                      f"started from {info.init_from_sha256[:12]}…): retrained since")
    return source, ""


def provenance_chain(info: ModelInfo) -> list[ModelInfo]:
    """``info``, the model it was fine-tuned from, that one's source... as far as the files are reachable."""
    chain = [info]
    while len(chain) < MAX_CHAIN:
        source, _ = source_model(chain[-1])
        if source is None or any(source.path == c.path for c in chain):
            break
        chain.append(source)
    return chain


def display_names(infos: Sequence[ModelInfo]) -> list[str]:
    """Bundle names, made unique: a repeated name gets its run folder (or file) name, then a number."""
    names = [i.name for i in infos]
    shared = {name for name in names if names.count(name) > 1}
    for i, info in enumerate(infos):
        if info.name in shared and info.path is not None:
            where = info.path.parent.name if info.path.name in ("best.pt", "last.pt") else info.path.stem
            names[i] = f"{info.name} ({where})"
    seen: dict[str, int] = {}
    repeated = {name for name in names if names.count(name) > 1}
    for i, name in enumerate(names):
        if name in repeated:
            seen[name] = seen.get(name, 0) + 1
            names[i] = f"{name} #{seen[name]}"
    return names


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


# ---------------------------------------------------------------------------------------------- lesions


@dataclass(frozen=True)
class LesionChange:
    """Reference lesions of one case and lesion class that a model found and the baseline did not (gained),
    or the other way round (lost), by reference lesion index; and both models' false-positive counts."""

    case_id: str
    class_id: int
    gained: tuple[int, ...]
    lost: tuple[int, ...]
    gained_ml: tuple[float, ...]
    lost_ml: tuple[float, ...]
    baseline_false_positives: int
    model_false_positives: int

    def as_record(self) -> dict[str, object]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in
                ((k, getattr(self, k)) for k in self.__dataclass_fields__)}


def _detected(case: CaseResult, k: int) -> dict[int, float]:
    return {m.reference.index: m.reference.volume_ml for m in case.lesions.get(k, [])
            if m.status == MatchStatus.DETECTED and m.reference is not None}


def _false_positives(case: CaseResult, k: int) -> int:
    return sum(m.status == MatchStatus.FALSE_POSITIVE for m in case.lesions.get(k, []))


def lesion_changes(baseline: Sequence[CaseResult], model: Sequence[CaseResult], classes: Sequence[int]) -> list[LesionChange]:
    """Per case (paired lists) and lesion class, the reference lesions found or lost against the baseline;
    cases without a change are left out."""
    out = []
    for a, b in zip(baseline, model, strict=True):
        for k in classes:
            found_a, found_b = _detected(a, k), _detected(b, k)
            gained, lost = sorted(set(found_b) - set(found_a)), sorted(set(found_a) - set(found_b))
            fp_a, fp_b = _false_positives(a, k), _false_positives(b, k)
            if gained or lost or fp_a != fp_b:
                out.append(LesionChange(a.case_id, k, tuple(gained), tuple(lost), tuple(found_b[i] for i in gained),
                                        tuple(found_a[i] for i in lost), fp_a, fp_b))
    return out


# ---------------------------------------------------------------------------------------------- comparison


@dataclass
class ModelComparison:
    """One model against the baseline: paired statistics per metric and class, and lesion changes."""

    name: str
    stats: list[PairedStats]
    lesions: list[LesionChange]

    def stat(self, metric: str, class_name: str) -> PairedStats | None:
        return next((s for s in self.stats if s.metric == metric and s.class_name == class_name), None)

    @property
    def mean_dice(self) -> PairedStats:
        """The mean foreground Dice row (the headline of the report and ``--fail-if-worse``)."""
        found = self.stat("dice", MEAN_CLASS)
        assert found is not None
        return found


@dataclass
class ForgettingCheck:
    """A fine-tuned model and its source on the source's own test split (or why that could not be done)."""

    model: str
    tolerance: float
    source: ModelInfo | None = None
    manifest: Path | None = None
    split: str = "test"
    reason: str = ""  # why not checked, or a caveat (the manifest changed since the source was trained)
    comparison: ComparisonResult | None = None

    @property
    def checked(self) -> bool:
        return self.comparison is not None

    @property
    def drop(self) -> float | None:
        """Source minus fine-tuned mean foreground Dice on the source's test split (positive: forgot)."""
        if self.comparison is None:
            return None
        diff = self.comparison.comparisons[0].mean_dice.mean_difference
        return -diff if diff is not None else None

    @property
    def flagged(self) -> bool:
        """The drop exceeds the tolerance."""
        return self.drop is not None and self.drop > self.tolerance

    def describe(self) -> str:
        if self.comparison is None:
            return f"forgetting check of {self.model}: not done ({self.reason})"
        s = self.comparison.comparisons[0].mean_dice
        verdict = "FLAGGED: drop above" if self.flagged else "ok: within"
        return (f"forgetting check of {self.model} on {self.source.name if self.source else 'source'}'s "
                f"{self.split} split ({s.n} cases): mean Dice {_f(s.baseline_mean)} -> {_f(s.model_mean)}, drop "
                f"{_f(self.drop)} ({verdict} tolerance {self.tolerance:g})" + (f"; {self.reason}" if self.reason else ""))


@dataclass
class ComparisonResult:
    """Models evaluated on the same cases and each later one paired with the first (the baseline)."""

    names: list[str]
    evaluations: list[EvaluationResult]
    cases: list[str]  # evaluated for every model: the paired cases
    label_names: dict[int, str]
    comparisons: list[ModelComparison]
    config: EvaluateConfig
    models: list[ModelInfo | None] = field(default_factory=list)
    chains: list[list[ModelInfo]] = field(default_factory=list)
    forgetting: list[ForgettingCheck] = field(default_factory=list)
    #: What was compared: the manifest/labels, split and fold, the prediction folders.
    inputs: dict[str, object] = field(default_factory=dict)
    output_dir: Path | None = None
    files: dict[str, Path] = field(default_factory=dict)
    resamples: int = BOOTSTRAP_RESAMPLES
    seed: int = BOOTSTRAP_SEED

    @property
    def baseline(self) -> str:
        return self.names[0]

    def case_results(self, model: int) -> list[CaseResult]:
        """Model ``model``'s case results in :attr:`cases` order."""
        by_id = {c.case_id: c for c in self.evaluations[model].cases}
        return [by_id[c] for c in self.cases]

    def worse_than(self, delta: float) -> list[str]:
        """Why a model is worse than the baseline by more than ``delta`` mean foreground Dice (mean paired
        difference), or forgot its source's task (flagged); empty when none is."""
        reasons = [f"{c.name}: mean Dice {c.mean_dice.mean_difference:+.4f} against {self.baseline}"
                   for c in self.comparisons
                   if c.mean_dice.mean_difference is not None and c.mean_dice.mean_difference < -delta]
        reasons += [f"{f.model}: forgot its source's task (drop {f.drop:.4f} > {f.tolerance:g})"
                    for f in self.forgetting if f.flagged]
        return reasons

    def describe(self) -> str:
        """The terminal summary: per model against the baseline, mean Dice difference with its interval and
        p-value, wins/ties/losses, per-class lines, lesion changes, forgetting checks, files."""
        lines = [f"compared {len(self.names)} model(s) on {len(self.cases)} case(s); baseline: {self.baseline}"]
        for i, name in enumerate(self.names):
            mean = summarize(c.mean_dice for c in self.case_results(i)).mean
            lines.append(f"  [{i}] {name}: mean foreground Dice over the paired cases {_f(mean)}")
        for c in self.comparisons:
            m = c.mean_dice
            lines.append(f"  {c.name} - {self.baseline}: Dice {_f(m.mean_difference, sign=True)} "
                         f"[95% CI {_f(m.ci_low, sign=True)}, {_f(m.ci_high, sign=True)}], Wilcoxon p {_p(m.p_value)}, "
                         f"wins/ties/losses {m.wins}/{m.ties}/{m.losses} (n {m.n})")
            for s in c.stats:
                if s.class_name == MEAN_CLASS:
                    continue
                lines.append(f"    {s.class_name:<14} {METRICS[s.metric][0]:<20} {_f(s.baseline_mean)} -> "
                             f"{_f(s.model_mean)}  diff {_f(s.mean_difference, sign=True)} "
                             f"[{_f(s.ci_low, sign=True)}, {_f(s.ci_high, sign=True)}]  p {_p(s.p_value)}  "
                             f"{s.wins}/{s.ties}/{s.losses}")
            if self.config.lesion_classes:
                gained = sum(len(x.gained) for x in c.lesions)
                lost = sum(len(x.lost) for x in c.lesions)
                fp = sum(x.model_false_positives - x.baseline_false_positives for x in c.lesions)
                lines.append(f"    lesions: {gained} found that {self.baseline} missed, {lost} lost, "
                             f"false positives {fp:+d}")
        lines += ["  " + f.describe() for f in self.forgetting]
        lines.append("  (diff = model - baseline; CI: seeded bootstrap of the mean; wins: model better beyond the tie "
                     "tolerance)")
        lines += [f"  {key}: {path}" for key, path in self.files.items()]
        return "\n".join(lines)


def _f(value: float | None, digits: int = 4, sign: bool = False) -> str:
    if value is None or not np.isfinite(value):
        return "-"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _p(value: float | None) -> str:
    return "-" if value is None else (f"{value:.2g}" if value < 0.001 else f"{value:.3f}")


def compare_evaluations(names: Sequence[str], evaluations: Sequence[EvaluationResult], *,
                        resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> ComparisonResult:
    """Pair each evaluation after the first with the first, over the cases all of them evaluated."""
    if len(evaluations) < 2:
        raise MedsegError("compare needs at least two models (or prediction folders)")
    common = set.intersection(*({c.case_id for c in e.cases} for e in evaluations))
    cases = sorted(common)
    if not cases:
        raise MedsegError("no case was evaluated for every model: nothing to pair")
    for name, e in zip(names, evaluations, strict=True):
        left = sorted({c.case_id for c in e.cases} - common)
        if left:
            log.warning("%s: %d case(s) left out of the paired statistics (another model has no result for them): %s",
                        name, len(left), left[:5])
    label_names = dict(evaluations[0].label_names)
    classes = sorted({k for e in evaluations for c in e.cases for k in c.metrics if k != 0})
    result = ComparisonResult(list(names), list(evaluations), cases, label_names, [], evaluations[0].config,
                              resamples=resamples, seed=seed)
    base = result.case_results(0)
    for i in range(1, len(evaluations)):
        model = result.case_results(i)
        stats = [paired_stats("dice", None, MEAN_CLASS, [c.mean_dice for c in base], [c.mean_dice for c in model],
                              resamples, seed)]
        for k in classes:
            name = label_names.get(k, f"class_{k}")
            for metric in METRICS:
                stats.append(paired_stats(metric, k, name, [case_value(c, k, metric) for c in base],
                                          [case_value(c, k, metric) for c in model], resamples, seed))
        result.comparisons.append(ModelComparison(names[i], stats, lesion_changes(base, model, result.config.lesion_classes)))
    return result


def case_value(case: CaseResult, k: int, metric: str) -> float | None:
    """A case's value of one paired metric for class ``k`` (None: undefined or class absent)."""
    m = case.metrics.get(k)
    if m is None:
        return None
    if metric == "abs_volume_error_ml":
        return abs(m.volume_difference_ml)
    return getattr(m, metric)


__all__ = [
    "BOOTSTRAP_RESAMPLES", "BOOTSTRAP_SEED", "FORGETTING_TOLERANCE", "METRICS", "TIE_TOLERANCE", "ComparisonResult",
    "ForgettingCheck", "LesionChange", "ModelComparison", "ModelInfo", "PairedStats", "bootstrap_interval",
    "case_value", "compare_evaluations", "lesion_changes", "model_info", "paired_stats", "provenance_chain",
    "wilcoxon_p",
]
