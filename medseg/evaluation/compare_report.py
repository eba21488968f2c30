"""Outputs of ``medseg compare``: ``comparison.csv`` (one row per case, class and model), ``comparison.json``
(everything, ``schema_version`` first) and a self-contained ``report.html`` (summary, paired differences, a
paired plot, side-by-side overlays of the cases that gained and lost most, forgetting checks, provenance).

Formats in docs/evaluation.md ("Comparing models"). Undefined values: empty CSV cells, JSON ``null``.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
from pathlib import Path

from medseg import __version__
from medseg.atomic import write_text_atomic
from medseg.evaluation.compare import (
    FORGETTING_TOLERANCE,
    MEAN_CLASS,
    METRICS,
    TIE_TOLERANCE,
    ComparisonResult,
    ForgettingCheck,
    ModelComparison,
    ModelInfo,
    case_value,
)
from medseg.evaluation.metrics import summarize
from medseg.evaluation.reports import (
    _CSS,
    _VIEW_NOTE,
    CASE_FIGURE_ERRORS,
    _clean,
    _img,
    _num,
    _table,
    csv_text,
)
from medseg.evaluation.runner import CaseResult

SCHEMA_VERSION = "1.0"
CSV_COLUMNS = ["case_id", "class_id", "class_name", "model", "dice", "hd95_mm", "volume_difference_ml",
               "abs_volume_error_ml", "dice_difference", "hd95_mm_difference", "abs_volume_error_ml_difference"]
#: Cases drawn per compared model: the ones that gained most and the ones that lost most (each).
OVERLAY_CASES = 2


def _class_ids(result: ComparisonResult) -> list[int]:
    return sorted({k for e in result.evaluations for c in e.cases for k in c.metrics if k != 0})


def comparison_rows(result: ComparisonResult) -> list[dict[str, object]]:
    """Per case, class (and the mean foreground Dice) and model: the values and their differences from the baseline."""
    rows: list[dict[str, object]] = []
    per_model = [result.case_results(i) for i in range(len(result.names))]
    for j, case_id in enumerate(result.cases):
        for k in [None, *_class_ids(result)]:
            base = per_model[0][j]
            for i, name in enumerate(result.names):
                case = per_model[i][j]
                if k is None:
                    row: dict[str, object] = {"case_id": case_id, "class_id": "", "class_name": MEAN_CLASS, "model": name,
                                              "dice": case.mean_dice}
                    if i and case.mean_dice is not None and base.mean_dice is not None:
                        row["dice_difference"] = case.mean_dice - base.mean_dice
                else:
                    m = case.metrics.get(k)
                    row = {"case_id": case_id, "class_id": k, "class_name": result.label_names.get(k, f"class_{k}"),
                           "model": name, "dice": m.dice if m else None, "hd95_mm": m.hd95_mm if m else None,
                           "volume_difference_ml": m.volume_difference_ml if m else None,
                           "abs_volume_error_ml": case_value(case, k, "abs_volume_error_ml")}
                    if i:
                        for metric in METRICS:
                            a, b = case_value(base, k, metric), case_value(case, k, metric)
                            if a is not None and b is not None:
                                row[f"{metric}_difference"] = b - a
                rows.append(row)
    return rows


def _model_record(info: ModelInfo | None, name: str) -> dict[str, object]:
    return {"name": name, **(info.as_record() if info is not None else {"path": None})}


def _forgetting_record(check: ForgettingCheck) -> dict[str, object]:
    comparison = check.comparison
    return {"model": check.model, "checked": check.checked, "reason": check.reason, "tolerance": check.tolerance,
            "source": check.source.as_record() if check.source else None,
            "manifest": str(check.manifest) if check.manifest else None, "split": check.split,
            "drop": check.drop, "flagged": check.flagged,
            "cases": comparison.cases if comparison else [],
            "stats": [s.as_record() for s in comparison.comparisons[0].stats] if comparison else []}


def comparison_document(result: ComparisonResult) -> dict[str, object]:
    """The JSON document of a comparison (``schema_version`` first)."""
    return _clean({
        "schema_version": SCHEMA_VERSION,
        "kind": "medseg-comparison",
        "medseg_version": __version__,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "inputs": result.inputs,
        "baseline": result.baseline,
        "models": [_model_record(info, name) for info, name in zip(result.models or [None] * len(result.names),
                                                                   result.names, strict=True)],
        "provenance_chains": [[link.as_record() for link in chain] for chain in result.chains],
        "label_names": {str(k): v for k, v in result.label_names.items()},
        "options": {"evaluate": result.config.model_dump(mode="json"), "tie_tolerance": TIE_TOLERANCE,
                    "bootstrap": {"resamples": result.resamples, "seed": result.seed, "level": 0.95,
                                  "statistic": "mean of the paired differences, percentile interval"},
                    "test": "two-sided Wilcoxon signed-rank (scipy.stats.wilcoxon, zero differences dropped)"},
        "cases": result.cases,
        "comparisons": [{"model": c.name, "baseline": result.baseline, "stats": [s.as_record() for s in c.stats],
                         "lesion_changes": [x.as_record() for x in c.lesions]} for c in result.comparisons],
        "forgetting": [_forgetting_record(f) for f in result.forgetting],
    })


def write_comparison(result: ComparisonResult) -> dict[str, Path]:
    """Write ``comparison.csv``, ``comparison.json`` and ``report.html`` into the result's output folder."""
    assert result.output_dir is not None
    out = Path(result.output_dir)
    files = {
        "per-case comparison": write_text_atomic(out / "comparison.csv", csv_text(CSV_COLUMNS, comparison_rows(result))),
        "json": write_text_atomic(out / "comparison.json",
                                  json.dumps(comparison_document(result), indent=1, allow_nan=False) + "\n"),
    }
    files["report"] = write_text_atomic(out / "report.html", comparison_html(result))
    return files


# ---------------------------------------------------------------------------------------------- HTML

_EXTRA_CSS = """
.pair{display:grid;grid-template-columns:1fr 1fr;gap:8px;align-items:start} .pair figure{margin:0}
.ok{color:#1a6d1a;font-weight:bold} code{font-size:12px}
"""


def _sign(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:+.{digits}f}"


def _p(value: float | None) -> str:
    return "–" if value is None else (f"{value:.2g}" if value < 0.001 else f"{value:.3f}")


def _models_table(result: ComparisonResult) -> str:
    rows = []
    for i, name in enumerate(result.names):
        info = result.models[i] if result.models else None
        if info is None:
            rows.append([html.escape(name), html.escape(str(result.inputs.get("predictions", [""] * (i + 1))[i])),
                         "–", "–", "–", "–"])
            continue
        rows.append([html.escape(name) + (" <b>(baseline)</b>" if i == 0 else ""), html.escape(str(info.path)),
                     f"<code title='{html.escape(info.weights_sha256)}'>{html.escape(info.weights_sha256[:16])}…</code>",
                     html.escape(info.created or "–"), html.escape(_data(info)),
                     html.escape(f"{info.init_from} ({info.init_from_sha256[:12]}…)" if info.init_from else "–")])
    return _table(["model", "file", "weights SHA-256", "created", "trained on", "fine-tuned from"], rows, left=6)


def _data(info: ModelInfo) -> str:
    parts = [info.manifest_name or "?"]
    if info.train_cases is not None:
        parts.append(f"{info.train_cases} training cases")
    if info.fold is not None:
        parts.append(f"fold {info.fold}")
    return ", ".join(parts)


def _summary_table(result: ComparisonResult) -> str:
    rows = []
    for i, name in enumerate(result.names):
        cases = result.case_results(i)
        row = [html.escape(name), _num(summarize(c.mean_dice for c in cases).mean)]
        for k in _class_ids(result):
            row += [_num(summarize(case_value(c, k, "dice") for c in cases).mean),
                    _num(summarize(case_value(c, k, "hd95_mm") for c in cases).median, 2),
                    _num(summarize(case_value(c, k, "abs_volume_error_ml") for c in cases).mean, 3)]
        rows.append(row)
    header = ["model", "mean Dice"]
    for k in _class_ids(result):
        n = result.label_names.get(k, f"class_{k}")
        header += [f"{n} Dice mean", f"{n} HD95 median mm", f"{n} |ΔV| mean mL"]
    return _table(header, rows)


def _stats_table(comparison: ModelComparison) -> str:
    rows = []
    for s in comparison.stats:
        label, _ = METRICS[s.metric]
        ci = f"[{_sign(s.ci_low)}, {_sign(s.ci_high)}]" if s.ci_low is not None else "–"
        rows.append([html.escape(s.class_name), html.escape(label), str(s.n) + (f" ({s.n_undefined} undef.)" if s.n_undefined else ""),
                     _num(s.baseline_mean), _num(s.model_mean), _sign(s.mean_difference), ci,
                     _sign(s.median_difference), _p(s.p_value), f"{s.wins} / {s.ties} / {s.losses}"])
    return _table(["class", "metric", "n", "baseline mean", "model mean", "mean diff", "95% CI (bootstrap)",
                   "median diff", "Wilcoxon p", "wins / ties / losses"], rows, left=2)


def _lesion_table(result: ComparisonResult, comparison: ModelComparison) -> str:
    if not comparison.lesions:
        return "<p class='muted'>No lesion was found or lost against the baseline, and false-positive counts are unchanged.</p>"
    rows = [[html.escape(x.case_id), html.escape(result.label_names.get(x.class_id, f"class_{x.class_id}")),
             html.escape(", ".join(f"#{i} ({v:.3g} mL)" for i, v in zip(x.gained, x.gained_ml, strict=True)) or "–"),
             html.escape(", ".join(f"#{i} ({v:.3g} mL)" for i, v in zip(x.lost, x.lost_ml, strict=True)) or "–"),
             f"{x.baseline_false_positives} → {x.model_false_positives}"] for x in comparison.lesions]
    gained = sum(len(x.gained) for x in comparison.lesions)
    lost = sum(len(x.lost) for x in comparison.lesions)
    return (f"<p>{gained} reference lesion(s) found that the baseline missed, {lost} lost.</p>"
            + _table(["case", "class", "found (reference lesion, volume)", "lost", "false positives"], rows, left=4))


def _ranked(result: ComparisonResult, model: int) -> tuple[list[int], list[int]]:
    """Indices of the cases (in :attr:`cases` order) that gained most and lost most mean Dice with ``model``."""
    base, other = result.case_results(0), result.case_results(model)
    diffs = [(j, b.mean_dice - a.mean_dice) for j, (a, b) in enumerate(zip(base, other, strict=True))
             if a.mean_dice is not None and b.mean_dice is not None]
    gained = [j for j, d in sorted(diffs, key=lambda t: -t[1]) if d > 0][:OVERLAY_CASES]
    lost = [j for j, d in sorted(diffs, key=lambda t: t[1]) if d < 0][:OVERLAY_CASES]
    return gained, lost


def _overlay(case: CaseResult, label_names: dict[int, str], name: str) -> str:
    from medseg.evaluation import figures

    try:
        overlay = figures.case_overlay(case, label_names)
    except CASE_FIGURE_ERRORS as exc:
        return f"<p class='warn'>{html.escape(name)}: no picture ({html.escape(str(exc))})</p>"
    return _img(overlay.png, f"{name}: mean Dice {_num(case.mean_dice)}; {overlay.describe()}")


def _pairs_section(result: ComparisonResult, model: int) -> list[str]:
    gained, lost = _ranked(result, model)
    if not gained and not lost:
        return ["<p class='muted'>No case changed its mean Dice.</p>"]
    base, other = result.case_results(0), result.case_results(model)
    parts = []
    for tag, chosen in (("gained", gained), ("lost", lost)):
        for j in chosen:
            a, b = base[j], other[j]
            parts.append(f"<h4>{tag}: {html.escape(result.cases[j])} — mean Dice {_num(a.mean_dice)} → {_num(b.mean_dice)} "
                         f"({_sign(b.mean_dice - a.mean_dice)})</h4>")  # type: ignore[operator]
            parts.append("<div class='pair'>" + _overlay(a, result.label_names, result.baseline)
                         + _overlay(b, result.label_names, result.names[model]) + "</div>")
    return parts


def _forgetting_section(check: ForgettingCheck, chain: list[ModelInfo]) -> list[str]:
    parts = [f"<h3>{html.escape(check.model)}</h3>"]
    if check.comparison is None:
        parts.append(f"<p class='warn'>Not checked: {html.escape(check.reason)}.</p>")
    else:
        s = check.comparison.comparisons[0].mean_dice
        verdict = (f"<span class='warn'>FLAGGED: the mean Dice dropped by {check.drop:.4f}, more than the tolerance "
                   f"{check.tolerance:g}</span>" if check.flagged else
                   f"<span class='ok'>No forgetting beyond the tolerance {check.tolerance:g}</span> (drop "
                   f"{_sign(check.drop, 4)})")
        source = check.source.name if check.source else "source"
        parts.append(f"<p>On the source model's own test split ({s.n} cases of {html.escape(str(check.manifest))}): "
                     f"{html.escape(source)} {_num(s.baseline_mean)} → {html.escape(check.model)} {_num(s.model_mean)}, "
                     f"95% CI of the difference [{_sign(s.ci_low)}, {_sign(s.ci_high)}], Wilcoxon p {_p(s.p_value)}. "
                     f"{verdict}.</p>")
        if check.reason:
            parts.append(f"<p class='warn'>Caveat: {html.escape(check.reason)}.</p>")
        parts.append(_stats_table(check.comparison.comparisons[0]))
    if chain:
        rows = [[str(i), html.escape(link.name), html.escape(str(link.path)),
                 f"<code title='{html.escape(link.weights_sha256)}'>{html.escape(link.weights_sha256[:16])}…</code>",
                 html.escape(link.created or "–"), html.escape(_data(link)),
                 html.escape(f"{link.manifest_sha256[:12]}…" if link.manifest_sha256 else "–")]
                for i, link in enumerate(chain)]
        parts.append("<p class='muted'>Provenance chain (0: the fine-tuned model, then what it started from):</p>"
                     + _table(["#", "model", "file", "weights SHA-256", "created", "trained on", "manifest SHA-256"],
                              rows, left=7))
    return parts


def comparison_html(result: ComparisonResult) -> str:
    """The self-contained report page (figures are embedded PNGs)."""
    from medseg.evaluation import figures

    where = ", ".join(f"{k} {v}" for k, v in result.inputs.items() if k != "predictions" and v is not None)
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>medseg comparison</title>"
             f"<style>{_CSS}{_EXTRA_CSS}</style></head><body>",
             "<h1>Model comparison</h1>",
             f"<p class='muted'>medseg {html.escape(__version__)} · {len(result.names)} models · {len(result.cases)} "
             f"paired case(s) · {html.escape(where)} · {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}</p>"]
    flagged = [f for f in result.forgetting if f.flagged]
    if flagged:
        parts.append("<p class='warn'>Forgetting flagged: " + html.escape(", ".join(f.model for f in flagged))
                     + " lost more than the tolerance on the source model's test split (see below).</p>")
    parts += ["<h2>Models</h2>", _models_table(result), "<h2>Summary</h2>",
              "<p class='muted'>Over the cases every model was evaluated on. Mean Dice: per case the mean over "
              "foreground classes where Dice is defined, then the mean over cases.</p>", _summary_table(result)]
    panels = {MEAN_CLASS: [[c.mean_dice for c in cases] for cases in zip(*(result.case_results(i) for i in range(len(result.names))), strict=True)]}
    for k in _class_ids(result):
        panels[result.label_names.get(k, f"class_{k}")] = [
            [case_value(c, k, "dice") for c in cases] for cases in zip(*(result.case_results(i) for i in range(len(result.names))), strict=True)]
    parts.append("<h2>Paired plot</h2>")
    parts.append(_img(figures.paired_plot(result.names, panels, tie=TIE_TOLERANCE["dice"]),
                      "Dice per case across the models: one line per case"))
    for i, comparison in enumerate(result.comparisons, start=1):
        parts.append(f"<h2>{html.escape(comparison.name)} against {html.escape(result.baseline)}</h2>")
        m = comparison.mean_dice
        parts.append(f"<p><b>Mean Dice difference {_sign(m.mean_difference, 4)}</b> (95% CI {_sign(m.ci_low, 4)} to "
                     f"{_sign(m.ci_high, 4)}; Wilcoxon p {_p(m.p_value)}; better in {m.wins}, tied in {m.ties}, worse in "
                     f"{m.losses} of {m.n} cases).</p>")
        parts.append(_stats_table(comparison))
        if result.config.lesion_classes:
            parts.append("<h3>Lesion detection changes</h3>" + _lesion_table(result, comparison))
        parts.append(f"<h3>Cases that gained and lost most</h3><p class='muted'>Left: {html.escape(result.baseline)}; "
                     f"right: {html.escape(comparison.name)}. Slices through the largest reference structure. "
                     + _VIEW_NOTE + "</p>")
        parts += _pairs_section(result, i)
    if result.forgetting:
        parts.append("<h2 id='forgetting'>Did fine-tuning forget?</h2><p class='muted'>Each fine-tuned model (bundle "
                     "provenance <code>init_from</code>) and its source model are both evaluated on the source's own "
                     f"test split; a drop of the mean Dice beyond the tolerance (default {FORGETTING_TOLERANCE:g}) is "
                     "flagged.</p>")
        chains = {name: chain for name, chain in zip(result.names, result.chains or [[]] * len(result.names), strict=True)}
        for check in result.forgetting:
            parts += _forgetting_section(check, chains.get(check.model, []))
    parts.append(_definitions())
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _definitions() -> str:
    tol = ", ".join(f"{METRICS[k][0]} {v:g}" for k, v in TIE_TOLERANCE.items())
    items = [
        ("Difference", "model − baseline per case, over the cases where both values are defined (HD95 is undefined "
                       "when a mask is empty; Dice when both are)."),
        ("95% CI", "percentile bootstrap of the mean difference: cases resampled with replacement, seeded (the "
                   "same inputs give the same interval)."),
        ("Wilcoxon p", "two-sided signed-rank test of the paired differences (scipy), zero differences dropped; "
                       "no p when every difference is zero."),
        ("Wins / ties / losses", f"cases where the model is better / within the tie tolerance / worse ({tol})."),
        ("|volume error|", "absolute difference between predicted and reference volume, mL."),
        ("Lesions found / lost", "reference lesions (connected components) detected by the model and missed by the "
                                 "baseline, or the other way round; matching as in medseg evaluate."),
    ]
    body = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in items)
    return (f"<h2>Definitions</h2><dl class='defs'>{body}</dl><p class='muted'>Tables beside this page: comparison.csv, "
            "comparison.json; each model's full evaluation under evaluations/. Full definitions: docs/evaluation.md.</p>")


__all__ = ["CSV_COLUMNS", "SCHEMA_VERSION", "comparison_document", "comparison_html", "comparison_rows", "write_comparison"]
