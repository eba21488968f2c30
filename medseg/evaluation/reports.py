"""Evaluation outputs: CSV tables, one JSON document (with ``schema_version``), and a self-contained report.html.

File formats are described in docs/evaluation.md. Undefined values are empty cells in CSV and ``null`` in
JSON, never NaN (which JSON does not have) and never 0.
"""

from __future__ import annotations

import csv
import datetime as _dt
import html
import io
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from medseg import __version__
from medseg.atomic import write_text_atomic
from medseg.evaluation.lesions import Lesion, LesionMatch, bucket_names, size_bucket

if TYPE_CHECKING:
    from medseg.config import EvaluateConfig
    from medseg.evaluation.runner import EvaluationResult, LesionInventory

SCHEMA_VERSION = "1.0"

CASE_COLUMNS = ["case_id", "class_id", "class_name", "status", "dice", "nsd", "nsd_tolerance_mm", "hd95_mm", "assd_mm",
                "reference_ml", "prediction_ml", "volume_difference_ml"]
SUMMARY_COLUMNS = ["class_id", "class_name", "metric", "n", "n_undefined", "mean", "std", "median", "q1", "q3", "iqr",
                   "min", "max", "n_both_present", "n_reference_empty", "n_prediction_empty", "n_both_empty"]
LESION_FIELDS = ["index", "voxels", "volume_ml", "diameter_mm", "axial_diameter_mm", "centroid_r_mm", "centroid_a_mm",
                 "centroid_s_mm", "mean_intensity"]
LESION_COLUMNS = (["case_id", "class_id", "class_name", "status", "note", "size_bucket", "iou", "dice"]
                  + [f"reference_{f}" for f in LESION_FIELDS] + [f"prediction_{f}" for f in LESION_FIELDS])
DETECTION_COLUMNS = ["class_id", "class_name", "size_bucket", "tp", "fn", "fp", "sensitivity", "precision", "f1"]
INVENTORY_COLUMNS = ["case_id", "class_id", "class_name", "kept", *LESION_FIELDS]


def _clean(value: object) -> object:
    """JSON-safe value: NaN/inf become None; numpy scalars become Python numbers."""
    if hasattr(value, "item") and not isinstance(value, str | bytes):
        value = value.item()  # type: ignore[union-attr]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def _cell(value: object) -> str:
    value = _clean(value)
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def csv_text(columns: Sequence[str], rows: Iterable[dict[str, object]]) -> str:
    """CSV text with a header; missing or undefined cells are empty."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row.get(c)) for c in columns])
    return buffer.getvalue()


def _lesion_fields(lesion: Lesion | None, prefix: str) -> dict[str, object]:
    if lesion is None:
        return {}
    r, a, s = lesion.centroid_ras_mm
    values = {"index": lesion.index, "voxels": lesion.voxels, "volume_ml": lesion.volume_ml,
              "diameter_mm": lesion.diameter_mm, "axial_diameter_mm": lesion.axial_diameter_mm,
              "centroid_r_mm": r, "centroid_a_mm": a, "centroid_s_mm": s, "mean_intensity": lesion.mean_intensity}
    return {f"{prefix}{k}": v for k, v in values.items()}


def case_rows(result: EvaluationResult) -> list[dict[str, object]]:
    """One row per case and foreground class."""
    return [{"case_id": c.case_id, "class_id": k, "class_name": result.label_names.get(k, f"class_{k}"), **m.as_record()}
            for c in result.cases for k, m in sorted(c.metrics.items())]


def summary_rows(result: EvaluationResult) -> list[dict[str, object]]:
    """One row per class and metric, with the class's empty-case counts repeated on each row."""
    rows = []
    for s in result.per_class.values():
        counts = {f"n_{status}": n for status, n in s.status_counts.items()}
        for metric, stats in s.stats.items():
            rows.append({"class_id": s.class_id, "class_name": s.name, "metric": metric, **stats.as_record(), **counts})
    return rows


def lesion_rows(result: EvaluationResult) -> list[dict[str, object]]:
    """One row per matched pair, missed or false-positive lesion; dropped small lesions as ``dropped_small``."""
    cfg = result.config
    rows: list[dict[str, object]] = []
    for c in result.cases:
        for k, matches in c.lesions.items():
            base = {"case_id": c.case_id, "class_id": k, "class_name": result.label_names.get(k, f"class_{k}")}
            for m in matches:
                sized = m.reference if m.reference is not None else m.prediction
                assert sized is not None
                rows.append({**base, "status": str(m.status), "note": m.note, "iou": m.iou, "dice": m.dice,
                             "size_bucket": size_bucket(sized.size_mm(cfg.size_by), cfg.size_buckets_mm),
                             **_lesion_fields(m.reference, "reference_"), **_lesion_fields(m.prediction, "prediction_")})
            for side, lesions in c.dropped.get(k, {}).items():
                for lesion in lesions:
                    rows.append({**base, "status": "dropped_small", "note": f"below {cfg.min_lesion_volume_ml:g} mL",
                                 **_lesion_fields(lesion, f"{side}_")})
    return rows


def detection_rows(result: EvaluationResult) -> list[dict[str, object]]:
    """Detection counts per lesion class and size bucket (``all`` first)."""
    return [{"class_id": s.class_id, "class_name": s.name, "size_bucket": bucket, **counts.as_record()}
            for s in result.lesion_summary.values() for bucket, counts in s.detection.items()]


def _match_record(m: LesionMatch) -> dict[str, object]:
    return {"status": str(m.status), "note": m.note, "iou": m.iou, "dice": m.dice,
            "reference": m.reference.as_record() if m.reference else None,
            "prediction": m.prediction.as_record() if m.prediction else None}


def result_document(result: EvaluationResult, pred_dir: Path, labels: Path, images_dir: Path | None) -> dict[str, object]:
    """The JSON document of an evaluation (``schema_version`` first)."""
    cfg = result.config
    return _clean({
        "schema_version": SCHEMA_VERSION,
        "kind": "medseg-evaluation",
        "medseg_version": __version__,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "inputs": {"predictions": str(Path(pred_dir).resolve()), "labels": str(Path(labels).resolve()),
                   "images": str(Path(images_dir).resolve()) if images_dir else None},
        "options": cfg.model_dump(mode="json"),
        "label_names": {str(k): v for k, v in result.label_names.items()},
        "mean_foreground_dice": result.mean_foreground_dice,
        "missing_predictions": result.missing_predictions,
        "unmatched_predictions": result.unmatched_predictions,
        "summary": {name: {"class_id": s.class_id, "nsd_tolerance_mm": s.nsd_tolerance_mm, "status_counts": s.status_counts,
                           "metrics": {m: st.as_record() for m, st in s.stats.items()}}
                    for name, s in result.per_class.items()},
        "lesion_summary": {name: {"class_id": s.class_id, "mean_lesion_dice": s.mean_lesion_dice,
                                  "dropped_reference": s.dropped_reference, "dropped_prediction": s.dropped_prediction,
                                  "detection": {b: d.as_record() for b, d in s.detection.items()}}
                           for name, s in result.lesion_summary.items()},
        "cases": [{"case_id": c.case_id, "reference": str(c.reference_path),
                   "prediction": str(c.prediction_path) if c.prediction_path else None,
                   "image": str(c.image_path) if c.image_path else None, "spacing_mm": list(c.spacing_mm),
                   "mean_dice": c.mean_dice,
                   "metrics": {result.label_names.get(k, f"class_{k}"): m.as_record() for k, m in sorted(c.metrics.items())},
                   "lesions": {result.label_names.get(k, f"class_{k}"): {
                       "matches": [_match_record(m) for m in ms],
                       "dropped": {side: [x.as_record() for x in xs] for side, xs in c.dropped.get(k, {}).items()}}
                       for k, ms in c.lesions.items()}}
                  for c in result.cases],
    })


def write_reports(result: EvaluationResult, pred_dir: Path, labels: Path, images_dir: Path | None) -> dict[str, Path]:
    """Write all tables, the JSON document and (unless disabled) report.html; return their paths by role."""
    out = Path(result.output_dir)
    files = {
        "per-case metrics": write_text_atomic(out / "metrics_per_case.csv", csv_text(CASE_COLUMNS, case_rows(result))),
        "summary": write_text_atomic(out / "summary.csv", csv_text(SUMMARY_COLUMNS, summary_rows(result))),
    }
    if result.lesion_summary:
        files["lesions"] = write_text_atomic(out / "lesions.csv", csv_text(LESION_COLUMNS, lesion_rows(result)))
        files["lesion detection"] = write_text_atomic(out / "lesion_detection.csv", csv_text(DETECTION_COLUMNS, detection_rows(result)))
    document = result_document(result, pred_dir, labels, images_dir)
    files["json"] = write_text_atomic(out / "evaluation.json", json.dumps(document, indent=1, allow_nan=False) + "\n")
    if result.config.html_report:
        files["report"] = write_text_atomic(out / "report.html", html_report(result, images_dir))
    return files


def write_inventory(inventory: LesionInventory, output_dir: Path, config: EvaluateConfig) -> dict[str, Path]:
    """``lesion_inventory.csv`` (one row per lesion, dropped ones with ``kept`` false) and ``.json``."""
    rows: list[dict[str, object]] = []
    doc_cases: dict[str, object] = {}
    for case_id, per_class in inventory.lesions.items():
        doc_cases[case_id] = {}
        for k, found in per_class.items():
            name = inventory.label_names.get(k, f"class_{k}")
            for kept, lesions in ((True, found.lesions), (False, found.dropped)):
                rows += [{"case_id": case_id, "class_id": k, "class_name": name, "kept": kept,
                          **_lesion_fields(les, "")} for les in lesions]
            doc_cases[case_id][name] = {"lesions": [x.as_record() for x in found.lesions],  # type: ignore[index]
                                        "dropped": [x.as_record() for x in found.dropped]}
    document = _clean({"schema_version": SCHEMA_VERSION, "kind": "medseg-lesion-inventory", "medseg_version": __version__,
                       "options": {"connectivity": config.connectivity, "min_lesion_volume_ml": config.min_lesion_volume_ml,
                                   "lesion_classes": config.lesion_classes},
                       "cases": doc_cases})
    return {
        "lesion inventory": write_text_atomic(output_dir / "lesion_inventory.csv", csv_text(INVENTORY_COLUMNS, rows)),
        "json": write_text_atomic(output_dir / "lesion_inventory.json", json.dumps(document, indent=1, allow_nan=False) + "\n"),
    }


# ---------------------------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px;margin-bottom:4px} h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;font-size:13px;margin:8px 0} th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f2f2f2} td.l,th.l{text-align:left} .muted{color:#777;font-size:12px} .warn{color:#a40000;font-weight:bold}
img{max-width:100%;border:1px solid #eee;margin:6px 0} figure{margin:8px 0} figcaption{font-size:12px;color:#555}
"""


def _num(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], left: int = 1) -> str:
    head = "".join(f"<th class='l'>{html.escape(h)}</th>" if i < left else f"<th>{html.escape(h)}</th>" for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f"<td class='l'>{c}</td>" if i < left else f"<td>{c}</td>" for i, c in enumerate(r)) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(png_b64: str, caption: str) -> str:
    return f"<figure><img src='data:image/png;base64,{png_b64}' alt='{html.escape(caption)}'><figcaption>{html.escape(caption)}</figcaption></figure>"


def html_report(result: EvaluationResult, images_dir: Path | None = None) -> str:
    """A self-contained HTML page (figures base64-embedded PNGs): summary, plots, lesion detection, overlays."""
    from medseg.evaluation import figures

    cfg = result.config
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>medseg evaluation</title><style>{_CSS}</style></head><body>",
             "<h1>Segmentation evaluation</h1>",
             f"<p class='muted'>medseg {html.escape(__version__)} · {len(result.cases)} case(s) · "
             f"{_dt.datetime.now().strftime('%Y-%m-%d %H:%M')} · output {html.escape(str(result.output_dir))}</p>",
             f"<p><b>Mean foreground Dice: {_num(result.mean_foreground_dice, 4)}</b> (mean over classes of the per-class mean; "
             "cases where Dice is undefined are left out and counted).</p>"]
    if result.missing_predictions:
        how = "scored as empty masks" if cfg.missing_as_empty else "not scored"
        parts.append(f"<p class='warn'>{len(result.missing_predictions)} reference case(s) have no prediction ({how}): "
                     f"{html.escape(', '.join(result.missing_predictions[:20]))}</p>")
    if result.unmatched_predictions:
        parts.append(f"<p class='muted'>{len(result.unmatched_predictions)} prediction(s) without reference (ignored): "
                     f"{html.escape(', '.join(result.unmatched_predictions[:20]))}</p>")

    parts.append("<h2>Per-class summary</h2>")
    rows = []
    for name, s in result.per_class.items():
        st = s.stats
        c = s.status_counts
        rows.append([html.escape(f"{name} ({s.class_id})"), str(st["dice"].n), _num(st["dice"].mean), _num(st["dice"].std),
                     _num(st["dice"].median), _num(st["dice"].iqr), _num(st["nsd"].mean), f"{s.nsd_tolerance_mm:g}",
                     _num(st["hd95_mm"].median, 2), _num(st["assd_mm"].median, 2), _num(st["volume_difference_ml"].mean, 3),
                     str(c.get("both_empty", 0)), str(c.get("reference_empty", 0)), str(c.get("prediction_empty", 0)),
                     str(st["hd95_mm"].n_undefined)])
    parts.append(_table(["class", "n", "Dice mean", "std", "median", "IQR", "NSD mean", "tol mm", "HD95 median mm",
                         "ASSD median mm", "ΔV mean mL", "both empty", "ref empty (FP)", "pred empty (missed)",
                         "HD undefined"], rows))
    parts.append("<p class='muted'>Dice is undefined when both masks are empty (not averaged); it is 0 when exactly one is "
                 "empty. HD95 and ASSD are undefined when either mask is empty. ΔV = predicted − reference volume.</p>")
    parts.append(_img(figures.metric_boxplots(result), "Per-class Dice and HD95 over cases (undefined values left out)"))

    if result.lesion_summary:
        parts.append("<h2>Lesion detection</h2>")
        parts.append(f"<p class='muted'>{cfg.connectivity}-connected components; one-to-one matching maximising IoU with "
                     f"IoU ≥ {cfg.match_min_iou:g}; size by longest {'axial' if cfg.size_by == 'axial' else '3D'} diameter "
                     f"of the reference lesion (false positives: their own); "
                     + (f"components below {cfg.min_lesion_volume_ml:g} mL dropped and counted.</p>" if cfg.min_lesion_volume_ml > 0
                        else "no minimum lesion volume.</p>"))
        for name, les in result.lesion_summary.items():
            rows = [[html.escape(b), str(d.tp), str(d.fn), str(d.fp), _num(d.sensitivity), _num(d.precision), _num(d.f1)]
                    for b, d in les.detection.items()]
            parts.append(f"<h3>{html.escape(name)}</h3>" + _table(["size", "TP", "FN", "FP", "sensitivity", "precision", "F1"], rows))
            parts.append(f"<p class='muted'>mean per-lesion Dice over reference lesions {_num(les.mean_lesion_dice)}; dropped "
                         f"small components: {les.dropped_reference} reference, {les.dropped_prediction} predicted.</p>")
            parts.append(_img(figures.lesion_figure(result, les.class_id), f"{name}: lesion volumes and detection by size"))
        notes = [r for r in lesion_rows(result) if r["status"] != "detected"]
        if notes:
            rows = [[html.escape(str(r["case_id"])), html.escape(str(r["class_name"])), html.escape(str(r["status"])),
                     html.escape(str(r.get("note", ""))), _num(r.get("reference_volume_ml"), 3),  # type: ignore[arg-type]
                     _num(r.get("prediction_volume_ml"), 3), _num(r.get("reference_axial_diameter_mm") or r.get("prediction_axial_diameter_mm"), 1)]  # type: ignore[arg-type]
                    for r in notes[:50]]
            parts.append("<h3>Missed, false-positive and dropped lesions</h3>"
                         + _table(["case", "class", "status", "note", "ref mL", "pred mL", "axial Ø mm"], rows, left=4))

    ranked = sorted((c for c in result.cases if c.mean_dice is not None), key=lambda c: c.mean_dice)  # type: ignore[arg-type,return-value]
    n = min(cfg.overlay_cases, len(ranked))
    if n:
        parts.append("<h2>Worst and best cases</h2><p class='muted'>Slices through the largest reference structure "
                     "(radiological view: patient right on the left). Solid: reference, dashed: prediction.</p>")
        chosen = [("worst", c) for c in ranked[:n]] + [("best", c) for c in ranked[::-1][:n] if c not in ranked[:n]]
        for tag, case in chosen:
            png = figures.case_overlay(case, result.label_names)
            parts.append(_img(png, f"{tag}: {case.case_id} — mean Dice {_num(case.mean_dice)}"))

    parts.append("<h2>All cases</h2><details><summary>per-case Dice</summary>")
    classes = list(result.per_class.values())
    rows = [[html.escape(c.case_id), _num(c.mean_dice)] + [_num(c.metrics[s.class_id].dice) if s.class_id in c.metrics else "–"
                                                          for s in classes] for c in result.cases]
    parts.append(_table(["case", "mean"] + [s.name for s in classes], rows) + "</details>")
    parts.append("<p class='muted'>Definitions: docs/evaluation.md. Tables: metrics_per_case.csv, summary.csv, "
                 "evaluation.json" + (", lesions.csv, lesion_detection.csv" if result.lesion_summary else "") + ".</p>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


__all__ = ["SCHEMA_VERSION", "bucket_names", "csv_text", "html_report", "write_inventory", "write_reports"]
