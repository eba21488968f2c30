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
from medseg.errors import MedsegError
from medseg.evaluation.lesions import Lesion, LesionMatch, bucket_names, size_bucket
from medseg.io.display import PREDICTION_COLOR, REFERENCE_COLOR

if TYPE_CHECKING:
    from medseg.config import EvaluateConfig
    from medseg.evaluation.results import EvaluationResult, LesionInventory

SCHEMA_VERSION = "1.1"  # 1.1: short axis, centroid voxel and LPS, failures

CASE_COLUMNS = ["case_id", "class_id", "class_name", "status", "dice", "nsd", "nsd_tolerance_mm", "hd95_mm", "assd_mm",
                "reference_ml", "prediction_ml", "volume_difference_ml"]
SUMMARY_COLUMNS = ["class_id", "class_name", "metric", "n", "n_undefined", "mean", "std", "median", "q1", "q3", "iqr",
                   "min", "max", "n_both_present", "n_reference_empty", "n_prediction_empty", "n_both_empty"]
LESION_FIELDS = ["index", "voxels", "volume_ml", "diameter_mm", "axial_diameter_mm", "centroid_r_mm", "centroid_a_mm",
                 "centroid_s_mm", "mean_intensity", "short_axis_mm", "centroid_i", "centroid_j", "centroid_k"]
LESION_COLUMNS = (["case_id", "class_id", "class_name", "status", "note", "size_bucket", "iou", "dice"]
                  + [f"reference_{f}" for f in LESION_FIELDS] + [f"prediction_{f}" for f in LESION_FIELDS])
DETECTION_COLUMNS = ["class_id", "class_name", "size_bucket", "tp", "fn", "fp", "sensitivity", "precision", "f1"]
INVENTORY_COLUMNS = ["case_id", "class_id", "class_name", "kept", *LESION_FIELDS]
FAILURE_COLUMNS = ["case_id", "reason"]


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
    i, j, k = lesion.viewer_voxel
    values = {"index": lesion.index, "voxels": lesion.voxels, "volume_ml": lesion.volume_ml,
              "diameter_mm": lesion.diameter_mm, "axial_diameter_mm": lesion.axial_diameter_mm,
              "short_axis_mm": lesion.short_axis_mm, "centroid_r_mm": r, "centroid_a_mm": a, "centroid_s_mm": s,
              "mean_intensity": lesion.mean_intensity, "centroid_i": i, "centroid_j": j, "centroid_k": k}
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
        "failures": [{"case_id": f.case_id, "reason": f.reason} for f in result.failures],
        "qc_flags": result.qc_flags,
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
        # Always written (header only when none failed): a stale list from an earlier run is never left behind.
        "failures": write_text_atomic(out / "evaluation_failures.csv", csv_text(
            FAILURE_COLUMNS, ({"case_id": f.case_id, "reason": f.reason} for f in result.failures))),
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
dl.defs{font-size:13px} dl.defs dt{font-weight:bold;margin-top:4px} dl.defs dd{margin-left:16px}
.sw{display:inline-block;width:22px;height:12px;border:1px solid #333;vertical-align:middle}
.reason{font-family:monospace;font-size:12px;white-space:pre-wrap}
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
    if result.failures:
        parts.append(f"<h2 id='failed-cases'>Failed cases</h2><p class='warn'>{len(result.failures)} case(s) could not be "
                     "evaluated and are left out of every figure and statistic below (also in evaluation_failures.csv):</p>")
        parts.append(_table(["case", "reason"], ([html.escape(f.case_id), f"<span class='reason'>{html.escape(f.reason)}</span>"]
                                                 for f in result.failures), left=2))

    flagged = {case: flags for case, flags in result.qc_flags.items() if flags}
    if flagged:
        parts.append(f"<h2 id='qc-flags'>QC flags at predict time</h2><p class='warn'>{len(flagged)} of "
                     f"{len(result.qc_flags)} case(s) were flagged by medseg predict (statistics.json of the "
                     "predictions): the input was unlike the training data, the prediction uncertain, a volume "
                     "implausible or empty, or the model weak. Read their results with care.</p>")
        parts.append(_table(["case", "flags"], ([html.escape(case), html.escape(", ".join(flags))]
                                                for case, flags in sorted(flagged.items())), left=2))

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
        parts += _lesion_sections(result)

    ranked = sorted((c for c in result.cases if c.mean_dice is not None), key=lambda c: c.mean_dice)  # type: ignore[arg-type,return-value]
    # The lower half of the ranking can be "lowest", the upper half "highest": in a two-case evaluation one
    # of each (both used to be captioned "worst", a Dice 1.000 case too). A lone case is just "the only case".
    k = len(ranked)
    n_low = min(cfg.overlay_cases, (k + 1) // 2) if k > 1 else 0
    n_high = min(cfg.overlay_cases, k - n_low) if k > 1 else 0
    chosen = ([("lowest mean Dice", c) for c in ranked[:n_low]]
              + [("highest mean Dice", c) for c in ranked[::-1][:n_high]])
    if k == 1 and cfg.overlay_cases:
        chosen = [("the only case", ranked[0])]
    if chosen:
        parts.append("<h2>Cases with the lowest and highest mean Dice</h2><p class='muted'>Slices through the "
                     f"largest reference structure; rank r of {k} counts from the lowest mean Dice. " + _VIEW_NOTE + "</p>")
        for tag, case in chosen:
            tag = f"{tag} (rank {ranked.index(case) + 1} of {k})"
            try:
                overlay = figures.case_overlay(case, result.label_names)
            except CASE_FIGURE_ERRORS as exc:
                parts.append(f"<p class='warn'>{tag}: {html.escape(case.case_id)}: no picture ({html.escape(str(exc))})</p>")
                continue
            parts.append(_img(overlay.png, f"{tag}: {case.case_id} — mean Dice {_num(case.mean_dice)}; {overlay.describe()}"))

    parts.append("<h2>All cases</h2><details><summary>per-case Dice</summary>")
    classes = list(result.per_class.values())
    rows = [[html.escape(c.case_id), _num(c.mean_dice)] + [_num(c.metrics[s.class_id].dice) if s.class_id in c.metrics else "–"
                                                          for s in classes]
            + ([html.escape(", ".join(result.qc_flags.get(c.case_id, [])) or "–")] if result.qc_flags else [])
            for c in result.cases]
    parts.append(_table(["case", "mean"] + [s.name for s in classes] + (["QC flags"] if result.qc_flags else []), rows)
                 + "</details>")
    parts.append(_footer(result))
    parts.append("</body></html>\n")
    return "\n".join(parts)


# Errors that leave one picture out of the report (with the reason) instead of the whole report.
CASE_FIGURE_ERRORS: tuple[type[Exception], ...] = (MedsegError, OSError, ValueError)

# Lesion pictures drawn at most (the table lists every lesion): each is a ~100 kB PNG in the page.
MAX_LESION_OVERLAYS = 40
MAX_LESION_ROWS = 200

_VIEW_NOTE = ("Radiological view (patient right on the left). "
              f"<span class='sw' style='background:{REFERENCE_COLOR}'></span> <b>orange, solid outline</b>: reference; "
              f"<span class='sw' style='background:{PREDICTION_COLOR}'></span> <b>blue, dashed outline</b>: prediction. Slice numbers are voxel "
              "indices (i, j, k) of the scan file's own array, as 3D Slicer and ITK-SNAP show them; positions are "
              "LPS mm (x to the patient's left, y to the back, z up: the DICOM and Slicer convention). The "
              "intensity window of each picture is named in its caption.")


def _location(lesion: Lesion | None) -> tuple[str, str]:
    """Viewer voxel and LPS position of a lesion centroid, for a table cell."""
    if lesion is None:
        return "–", "–"
    return (html.escape(", ".join(str(v) for v in lesion.viewer_voxel)),
            html.escape(", ".join(f"{v:.1f}" for v in lesion.centroid_lps_mm)))


def _lesion_sections(result: EvaluationResult) -> list[str]:
    """The missed / false-positive / dropped lesion table (with locations) and one picture per missed and
    false-positive lesion, centred on it."""
    from medseg.evaluation import figures as fig
    from medseg.evaluation.lesions import MatchStatus

    cfg = result.config
    parts: list[str] = []
    pictures: list[str] = []
    anchors: dict[tuple[str, int, str, int], str] = {}
    drawn = 0
    wanted = 0
    for case in result.cases:
        todo = [(k, m) for k, ms in case.lesions.items() for m in ms if m.status != MatchStatus.DETECTED]
        if not todo:
            continue
        wanted += len(todo)
        if drawn >= MAX_LESION_OVERLAYS:
            continue
        try:
            view = fig.load_case_view(case)
        except CASE_FIGURE_ERRORS as exc:
            pictures.append(f"<p class='warn'>{html.escape(case.case_id)}: no lesion pictures ({html.escape(str(exc))})</p>")
            continue
        for k, m in todo:
            if drawn >= MAX_LESION_OVERLAYS:
                break
            side = "reference" if m.status == MatchStatus.MISSED else "prediction"
            lesion = m.reference if side == "reference" else m.prediction
            assert lesion is not None
            name = result.label_names.get(k, f"class_{k}")
            what = "missed" if side == "reference" else "false positive"
            title = (f"{case.case_id} · {name} · {what} lesion {side} #{lesion.index}: {lesion.volume_ml:.3g} mL, "
                     f"{lesion.axial_diameter_mm:.1f} × {lesion.short_axis_mm:.1f} mm")
            overlay = fig.lesion_overlay(view, lesion, k, side, title, result.label_names, cfg.connectivity)
            drawn += 1
            anchor = f"lesion-{drawn}"
            anchors[(case.case_id, k, side, lesion.index)] = anchor
            pictures.append(f"<div id='{anchor}'>" + _img(overlay.png, f"{title}; {overlay.describe()}") + "</div>")

    rows_data = [r for r in lesion_rows(result) if r["status"] != "detected"]
    if rows_data:
        rows = []
        for r in rows_data[:MAX_LESION_ROWS]:
            side = "reference" if r.get("reference_index") is not None else "prediction"
            lesion = _find_lesion(result, str(r["case_id"]), int(r["class_id"]), side, int(r[f"{side}_index"]))  # type: ignore[call-overload]
            voxel, lps = _location(lesion)
            anchor = anchors.get((str(r["case_id"]), int(r["class_id"]), side, int(r[f"{side}_index"])))  # type: ignore[call-overload]
            link = f"<a href='#{anchor}'>picture</a>" if anchor else "–"
            rows.append([html.escape(str(r["case_id"])), html.escape(str(r["class_name"])), html.escape(str(r["status"])),
                         html.escape(str(r.get("note", ""))), _num(r.get("reference_volume_ml"), 3),  # type: ignore[arg-type]
                         _num(r.get("prediction_volume_ml"), 3),  # type: ignore[arg-type]
                         _num(r.get(f"{side}_axial_diameter_mm"), 1), _num(r.get(f"{side}_short_axis_mm"), 1),  # type: ignore[arg-type]
                         voxel, lps, link])
        more = (f" The first {MAX_LESION_ROWS} of {len(rows_data)} are listed; all are in lesions.csv."
                if len(rows_data) > MAX_LESION_ROWS else "")
        parts.append("<h3>Missed, false-positive and dropped lesions</h3><p class='muted'>Location: the lesion's centroid "
                     "as the voxel (i, j, k) of the scan file (what 3D Slicer and ITK-SNAP show at the cursor) and in "
                     "LPS mm. Long axis: longest axial diameter (RECIST 1.1); short axis: longest diameter perpendicular "
                     "to it in the same axial plane (WHO: long × short)." + more + "</p>"
                     + _table(["case", "class", "status", "note", "ref mL", "pred mL", "long axis mm", "short axis mm",
                               "voxel (i, j, k)", "LPS (x, y, z) mm", "figure"], rows, left=4))
    if pictures:
        more = (f" {MAX_LESION_OVERLAYS} of {wanted} drawn; the rest are listed above and in lesions.csv."
                if wanted > drawn else "")
        parts.append("<h3>Missed and false-positive lesions, one picture each</h3><p class='muted'>Each picture is "
                     "centred on its lesion (white dotted ring): the whole axial slice with the zoomed area boxed, then "
                     "axial, coronal and sagittal zooms through the planes where the lesion is largest. "
                     + _VIEW_NOTE + more + "</p>")
        parts += pictures
    return parts


def _find_lesion(result: EvaluationResult, case_id: str, class_id: int, side: str, index: int) -> Lesion | None:
    for case in result.cases:
        if case.case_id != case_id:
            continue
        for m in case.lesions.get(class_id, []):
            lesion = m.reference if side == "reference" else m.prediction
            if lesion is not None and lesion.index == index:
                return lesion
        for lesion in case.dropped.get(class_id, {}).get(side, []):
            if lesion.index == index:
                return lesion
    return None


def documentation_url() -> str | None:
    """The installed package's documentation address (``[project.urls]`` in pyproject), if it has one."""
    from importlib.metadata import PackageNotFoundError, metadata

    try:
        urls = metadata("medseg").get_all("Project-URL") or []
    except PackageNotFoundError:
        return None
    found = dict(u.split(",", 1) for u in urls if "," in u)
    found = {k.strip().lower(): v.strip() for k, v in found.items()}
    for key in ("documentation", "homepage", "repository", "source"):
        if found.get(key, "").startswith(("https://", "http://")):
            return found[key]
    return None


_DEFINITIONS = [
    ("Dice", "2|P∩R| / (|P| + |R|) over voxels; undefined when both masks are empty, 0 when one is."),
    ("HD95", "95th percentile Hausdorff distance (mm) between the two mask boundaries, the larger of both directions; "
             "undefined when either mask is empty."),
    ("ASSD", "average symmetric surface distance (mm)."),
    ("NSD", "normalised surface Dice: share of both surfaces within the class tolerance (mm) of the other."),
    ("Lesion", "a connected component of a lesion class; matched one to one by IoU (Hungarian), IoU ≥ the stated "
               "threshold. Missed: an unmatched reference lesion; false positive: an unmatched predicted lesion."),
    ("Long / short axis", "longest diameter in an axial plane of the patient (RECIST 1.1), and the longest diameter "
                          "perpendicular to it in the same plane (WHO), measured on the marching-cubes surface."),
    ("Coordinates", "voxel (i, j, k): index in the scan file's array (3D Slicer, ITK-SNAP); LPS mm: the DICOM patient "
                    "frame (x left, y posterior, z superior), from the file's affine."),
    ("Windows", "CT: named HU windows, lung W 1500 / L −600 or soft tissue W 400 / L 40, chosen by the share of air "
                "and lung in the shown region; other images: 1st–99th percentile of the shown region."),
]


def _footer(result: EvaluationResult) -> str:
    """Definitions in the page itself (it travels without the docs) and, if known, the documentation address."""
    items = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in _DEFINITIONS)
    url = documentation_url()
    more = (f"Full definitions: <a href='{html.escape(url)}'>{html.escape(url)}</a> (Evaluation)." if url
            else "Full definitions: docs/evaluation.md in the medseg source.")
    files = ("metrics_per_case.csv, summary.csv, evaluation_failures.csv, evaluation.json"
             + (", lesions.csv, lesion_detection.csv" if result.lesion_summary else ""))
    return (f"<h2>Definitions</h2><dl class='defs'>{items}</dl><p class='muted'>{more} Tables beside this page: "
            f"{html.escape(files)}.</p>")


__all__ = ["SCHEMA_VERSION", "bucket_names", "csv_text", "documentation_url", "html_report", "write_inventory",
           "write_reports"]
