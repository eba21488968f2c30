"""End to end on real scans (../shared/data): perturbed copies of real reference masks, known outcomes."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest

from medseg.evaluation.runner import evaluate_folders

_BENCH = Path(__file__).resolve().parents[2] / "bench" / "evaluate_real_data.py"
_spec = importlib.util.spec_from_file_location("evaluate_real_data", _BENCH)
assert _spec is not None and _spec.loader is not None
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_lung_lesion_perturbations_are_measured_in_mm_and_the_planted_lesion_is_a_false_positive(
    shared_data: Path, tmp_path: Path
) -> None:
    inputs = bench.build_lung_cases(shared_data, tmp_path / "in")
    result = evaluate_folders(inputs["pred"], inputs["ref"], tmp_path / "out", images_dir=inputs["images"],
                              lesion_classes=[1], label_names={0: "background", 1: "lesion"}, nsd_tolerance_mm=1.0,
                              html_report=False, progress=False)  # report rendering: unit test and bench script
    by_case = {c.case_id: c.metrics[1] for c in result.cases}
    # The reference lesion is ~1.36 mL (data README).
    assert all(m.reference_ml == pytest.approx(1.36, abs=0.01) for m in by_case.values())
    # A one-voxel shift along x moves every boundary by 0.57 mm and leaves the volume unchanged.
    shifted = by_case["lung1_shifted"]
    assert shifted.hd95_mm == pytest.approx(0.57, abs=0.01)
    assert shifted.volume_difference_ml == pytest.approx(0.0)
    assert by_case["lung1_eroded"].prediction_ml < 1.36 < by_case["lung1_dilated_fp"].prediction_ml
    # The planted false positive lies ~28 mm from the lesion: HD95 of that case jumps to tens of mm.
    assert by_case["lung1_dilated_fp"].hd95_mm > 15

    detection = result.lesion_summary["lesion"].detection["all"]
    assert (detection.tp, detection.fn, detection.fp) == (3, 0, 1)
    rows = list(csv.DictReader((tmp_path / "out" / "lesions.csv").open()))
    fp = next(r for r in rows if r["status"] == "false_positive")
    assert float(fp["prediction_axial_diameter_mm"]) == pytest.approx(2 * bench.FP_RADIUS_MM, abs=1.2)
    assert float(fp["prediction_mean_intensity"]) < -500  # planted in aerated lung
    ref = next(r for r in rows if r["case_id"] == "lung1_shifted")
    assert 14 < float(ref["reference_axial_diameter_mm"]) < 19
    assert float(ref["reference_diameter_mm"]) >= float(ref["reference_axial_diameter_mm"])


def test_hippocampus_manifest_evaluation_counts_the_emptied_class(shared_data: Path, tmp_path: Path) -> None:
    inputs = bench.build_hippocampus_cases(shared_data, tmp_path / "in")
    result = evaluate_folders(inputs["pred"], inputs["manifest"], tmp_path / "out", html_report=False, progress=False)
    assert list(result.per_class) == ["anterior", "posterior"]
    posterior = result.per_class["posterior"]
    assert posterior.status_counts["prediction_empty"] == 1
    assert posterior.stats["hd95_mm"].n_undefined == 1 and posterior.stats["hd95_mm"].n == 3
    assert posterior.dice.min == 0.0  # one side empty: Dice 0, by policy, and counted
    assert result.per_class["anterior"].dice.min > 0.75
    doc = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert doc["schema_version"] == "1.1" and doc["label_names"]["2"] == "posterior"
