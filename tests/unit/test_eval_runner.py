"""evaluate_folders / lesion_inventory / the evaluate CLI on small synthetic NIfTI folders."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medseg.cli import main
from medseg.errors import CheckpointError, MedsegError
from medseg.evaluation.runner import evaluate_folders, lesion_inventory, load_label_names

AFFINE = np.diag([1.5, 1.5, 3.0, 1.0])


def save(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE, dtype=np.uint8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data.astype(dtype), affine), str(path))
    return path


def label_map() -> np.ndarray:
    data = np.zeros((24, 24, 12), np.uint8)
    data[4:12, 4:12, 3:8] = 1
    data[14:18, 14:18, 4:7] = 2
    return data


@pytest.fixture()
def folders(tmp_path: Path) -> dict[str, Path]:
    """Three reference cases, two predictions plus one prediction without reference."""
    ref, pred, img = tmp_path / "ref", tmp_path / "pred", tmp_path / "img"
    for case in ("a", "b", "c"):
        save(ref / f"{case}.nii.gz", label_map())
        save(img / f"{case}_0000.nii.gz", np.full((24, 24, 12), 7.0), dtype=np.float32)
    save(pred / "a.nii.gz", label_map())  # perfect
    shifted = np.roll(label_map(), 1, axis=0)
    shifted[2, 2, 2] = 2  # a one-voxel false-positive lesion
    save(pred / "b.nii.gz", shifted)
    save(pred / "zzz.nii.gz", label_map())
    return {"ref": ref, "pred": pred, "img": img, "out": tmp_path / "out"}


def test_folder_evaluation_writes_tables_json_and_report(folders: dict[str, Path]) -> None:
    result = evaluate_folders(folders["pred"], folders["ref"], folders["out"], images_dir=folders["img"],
                              lesion_classes=[2], progress=False)
    assert result.missing_predictions == ["c"] and result.unmatched_predictions == ["zzz"]
    assert [c.case_id for c in result.cases] == ["a", "b"]
    assert set(result.per_class) == {"class_1", "class_2"}
    assert result.per_class["class_1"].n == 2
    # Case a is perfect (Dice 1); case b's 8 x 8 x 5 box is shifted by one voxel: 7 x 8 x 5 = 280 of 320 voxels
    # overlap, Dice 2 * 280 / 640 = 0.875; the mean of the two is 0.9375.
    assert [c.metrics[1].dice for c in result.cases] == pytest.approx([1.0, 0.875])
    assert result.per_class["class_1"].mean == pytest.approx(0.9375)
    assert result.mean_foreground_dice == pytest.approx(np.mean([s.mean for s in result.per_class.values()]))

    rows = list(csv.DictReader((folders["out"] / "metrics_per_case.csv").open()))
    assert len(rows) == 4 and rows[0]["case_id"] == "a" and float(rows[0]["dice"]) == 1.0
    doc = json.loads((folders["out"] / "evaluation.json").read_text())
    assert doc["schema_version"] == "1.1"
    assert doc["missing_predictions"] == ["c"]
    assert doc["summary"]["class_1"]["metrics"]["dice"]["n"] == 2
    lesion = doc["lesion_summary"]["class_2"]["detection"]["all"]
    assert (lesion["tp"], lesion["fn"], lesion["fp"]) == (2, 0, 1)
    lesions = list(csv.DictReader((folders["out"] / "lesions.csv").open()))
    fp = [r for r in lesions if r["status"] == "false_positive"]
    assert len(fp) == 1 and fp[0]["case_id"] == "b" and float(fp[0]["prediction_mean_intensity"]) == 7.0
    assert float(fp[0]["prediction_volume_ml"]) == pytest.approx(1.5 * 1.5 * 3 / 1000)
    report = (folders["out"] / "report.html").read_text()
    # box plots, lesion plot, worst and best overlays, and one picture of the false positive
    assert report.count("data:image/png;base64,") >= 5
    assert "id='lesion-1'" in report and "href='#lesion-1'" in report
    # Two cases: b (Dice 0.875 and the lesion class) is the lower one, a (perfect) the higher; neither is
    # called "worst", and the perfect case is not captioned as the lower one.
    assert "lowest mean Dice (rank 1 of 2): b — mean Dice" in report
    assert "highest mean Dice (rank 2 of 2): a — mean Dice 1.000" in report
    assert "worst" not in report.lower() and "lowest mean Dice (rank 1 of 2): a" not in report
    assert "1 reference case(s) have no prediction (not scored): c</p>" in report
    assert "1 prediction(s) without reference (ignored): zzz</p>" in report
    assert "class_1" in result.describe() and "WARNING" in result.describe()


def test_missing_predictions_can_be_scored_as_empty(folders: dict[str, Path]) -> None:
    result = evaluate_folders(folders["pred"], folders["ref"], folders["out"], missing_as_empty=True,
                              html_report=False, progress=False)
    assert [c.case_id for c in result.cases] == ["a", "b", "c"]
    c = result.cases[-1]
    assert c.metrics[1].dice == 0.0 and c.metrics[1].hd95_mm is None
    assert result.per_class["class_1"].stats["hd95_mm"].n_undefined == 1
    assert not (folders["out"] / "report.html").exists()


def test_class_absent_everywhere_is_reported_as_both_empty(tmp_path: Path) -> None:
    save(tmp_path / "ref" / "x.nii", label_map())
    save(tmp_path / "pred" / "x.nii", label_map())
    manifest = {"name": "m", "labels": {"0": "background", "1": "liver", "2": "tumour", "3": "vessel"},
                "cases": [{"id": "x", "image": "ref/x.nii", "label": "ref/x.nii"}]}
    (tmp_path / "m.json").write_text(json.dumps(manifest))
    result = evaluate_folders(tmp_path / "pred", tmp_path / "m.json", tmp_path / "out", html_report=False, progress=False)
    assert list(result.per_class) == ["liver", "tumour", "vessel"]
    vessel = result.per_class["vessel"]
    assert vessel.mean is None and vessel.n_undefined == 1 and vessel.status_counts["both_empty"] == 1
    assert result.mean_foreground_dice == pytest.approx(1.0)  # the undefined class is not averaged in
    doc = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert doc["summary"]["vessel"]["metrics"]["dice"]["mean"] is None


def test_a_case_on_the_wrong_grid_is_listed_as_failed_and_the_others_are_written(folders: dict[str, Path]) -> None:
    save(folders["pred"] / "a.nii.gz", label_map()[:, :, :10])
    result = evaluate_folders(folders["pred"], folders["ref"], folders["out"], lesion_classes=[2], progress=False)
    assert [c.case_id for c in result.cases] == ["b"]
    assert [f.case_id for f in result.failures] == ["a"]
    assert re.search(r"a\.nii\.gz.*shape \(24, 24, 10\).*reference .*ref/a\.nii\.gz", result.failures[0].reason)
    doc = json.loads((folders["out"] / "evaluation.json").read_text())
    assert [f["case_id"] for f in doc["failures"]] == ["a"] and [c["case_id"] for c in doc["cases"]] == ["b"]
    assert [r["case_id"] for r in csv.DictReader((folders["out"] / "evaluation_failures.csv").open())] == ["a"]
    assert [r["case_id"] for r in csv.DictReader((folders["out"] / "metrics_per_case.csv").open())] == ["b", "b"]
    report = (folders["out"] / "report.html").read_text()
    assert "Failed cases" in report and "shape (24, 24, 10)" in report
    assert "1 case(s) failed" in result.describe()
    # The CLI writes everything and says so with exit code 1 (some cases failed), not 2 (nothing evaluated).
    assert main(["evaluate", "--pred", str(folders["pred"]), "--labels", str(folders["ref"]),
                 "--output", str(folders["out"] / "cli"), "--no-html"]) == 1


def test_affine_mismatch_fails_the_case_and_no_evaluable_case_is_an_error(folders: dict[str, Path]) -> None:
    moved = AFFINE.copy()
    moved[0, 3] = 5.0
    for case in ("a", "b"):
        save(folders["pred"] / f"{case}.nii.gz", label_map(), affine=moved)
    with pytest.raises(MedsegError, match=r"no case could be evaluated \(2 failed\).*affine .* differs from reference"):
        evaluate_folders(folders["pred"], folders["ref"], folders["out"], progress=False)


def test_probability_maps_are_refused(folders: dict[str, Path]) -> None:
    save(folders["pred"] / "a.nii.gz", label_map() * 0.4, dtype=np.float32)
    result = evaluate_folders(folders["pred"], folders["ref"], folders["out"], html_report=False, progress=False)
    assert [f.case_id for f in result.failures] == ["a"] and "non-integer" in result.failures[0].reason


def test_label_names_come_from_a_model_bundle_or_run_folder(folders: dict[str, Path], tmp_path: Path) -> None:
    from medseg.config import config_from_dict
    from medseg.models import build_model
    from medseg.models.bundle import ModelBundle

    run = tmp_path / "run"
    config = config_from_dict({"name": "t", "data": {"manifest": "m.json"}, "model": {"channels": [4, 8]},
                               "train": {"patch_size": [16, 16, 16]}})
    names = {0: "background", 1: "lung", 2: "nodule"}
    bundle = ModelBundle.from_config(config, names, in_channels=1)
    bundle.with_weights(build_model(config.model, 1, 3).state_dict()).save(run / "best.pt")
    assert load_label_names(run) == names
    result = evaluate_folders(folders["pred"], folders["ref"], folders["out"], label_names_from=run / "best.pt",
                              html_report=False, progress=False)
    assert list(result.per_class) == ["lung", "nodule"]
    with pytest.raises(CheckpointError, match="no best.pt"):
        load_label_names(tmp_path / "img")
    torch.save({"label_names": names, "model": {}}, run / "best.pt")  # not a medseg model
    with pytest.raises(CheckpointError, match="not a medseg model"):
        load_label_names(run)


def test_lesion_inventory_lists_predicted_lesions(folders: dict[str, Path]) -> None:
    inventory = lesion_inventory(folders["pred"], [2], images_dir=folders["img"], output_dir=folders["out"], progress=False)
    assert [len(inventory.lesions[c][2]) for c in ("a", "b", "zzz")] == [1, 2, 1]
    rows = list(csv.DictReader((folders["out"] / "lesion_inventory.csv").open()))
    assert len(rows) == 4 and {r["kept"] for r in rows} == {"True"}
    big = inventory.lesions["a"][2].lesions[0]
    assert big.volume_ml == pytest.approx(4 * 4 * 3 * 1.5 * 1.5 * 3 / 1000)
    assert big.axial_diameter_mm == pytest.approx(np.hypot(4 * 1.5 - 1.5, 4 * 1.5) , abs=0.01)
    assert json.loads((folders["out"] / "lesion_inventory.json").read_text())["schema_version"] == "1.1"


def test_cli_evaluate_passes_flags_and_reports_errors(folders: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    code = main(["evaluate", "--pred", str(folders["pred"]), "--labels", str(folders["ref"]), "--output", str(folders["out"]),
                 "--lesion-classes", "2", "--size-buckets", "3", "8", "--nsd-tolerance-class", "1=0.5", "--no-html"])
    assert code == 0
    doc = json.loads((folders["out"] / "evaluation.json").read_text())
    assert doc["options"]["size_buckets_mm"] == [3.0, 8.0]
    assert doc["summary"]["class_1"]["nsd_tolerance_mm"] == 0.5
    assert "mean foreground Dice" in capsys.readouterr().out
    code = main(["evaluate", "--pred", str(folders["img"]), "--labels", str(folders["ref"]), "--output", str(folders["out"])])
    assert code == 2
    assert "no prediction matches" in capsys.readouterr().err


def test_qc_flags_from_predict_are_shown_with_the_results(folders: dict[str, Path]) -> None:
    from medseg.inference.statistics import ClassStatistics, ScanStatistics, merge_statistics

    def scan(case: str, scan_flags: list[str], class_flags: list[str]) -> ScanStatistics:
        lesion = ClassStatistics(2, "class_2", 1, 0.007, None, None, None, None, None, 1, class_flags)
        return ScanStatistics(case, [24, 24, 12], [1.5, 1.5, 3.0], "HU", [lesion], qc_flags=scan_flags)

    merge_statistics(folders["pred"], [scan("a", [], []), scan("b", ["modality_mismatch"], ["volume_implausible:class_2"]),
                                       scan("zzz", ["empty_prediction"], [])])
    result = evaluate_folders(folders["pred"], folders["ref"], folders["out"], progress=False)
    assert result.qc_flags == {"a": [], "b": ["modality_mismatch", "volume_implausible:class_2"]}  # zzz: no reference
    doc = json.loads((folders["out"] / "evaluation.json").read_text())
    assert doc["qc_flags"]["b"] == ["modality_mismatch", "volume_implausible:class_2"]
    report = (folders["out"] / "report.html").read_text()
    assert "1 of 2 case(s) were flagged by medseg predict" in report
    assert "<td>modality_mismatch, volume_implausible:class_2</td>" in report
