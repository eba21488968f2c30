"""``medseg compare``: paired statistics equal scipy's and a plain computation, lesion changes, outputs and exit
status on prediction folders; models run on a manifest split with the forgetting check and provenance chain."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy.stats import wilcoxon

from medseg.cli import main
from medseg.data.manifest import Manifest, save_manifest
from medseg.evaluation.compare import TIE_TOLERANCE, bootstrap_interval, paired_stats, wilcoxon_p
from medseg.evaluation.compare_run import PredictOptions, compare_models, compare_prediction_folders
from medseg.models.bundle import DataProvenance, InitFromRecord, ModelBundle
from medseg.models.registry import build_model
from tests.conftest import tiny_config

BASELINE = [0.80, 0.70, 0.90, 0.60, 0.85]
MODEL = [0.85, 0.72, 1.00, 0.56, 0.92]  # differences +0.05, +0.02, +0.10, -0.04, +0.07


def test_paired_statistics_equal_scipy_and_a_plain_computation():
    s = paired_stats("dice", 1, "lung", BASELINE, MODEL, resamples=2000, seed=3)
    d = np.array(MODEL) - np.array(BASELINE)
    assert s.n == 5 and s.n_undefined == 0
    assert s.mean_difference == pytest.approx(0.04, abs=1e-12)
    assert s.median_difference == pytest.approx(0.05, abs=1e-12)
    assert s.baseline_mean == pytest.approx(0.77) and s.model_mean == pytest.approx(0.81)
    assert (s.wins, s.ties, s.losses) == (4, 0, 1)
    # Wilcoxon: scipy's value, and the exact null distribution by hand: |d| ranks 1..5, the negative one has
    # rank 2, so W- = 2; of the 32 sign patterns 3 have W- <= 2 ({}, {1}, {2}): two-sided p = 2 * 3/32.
    assert s.p_value == wilcoxon(MODEL, BASELINE).pvalue
    assert s.p_value == pytest.approx(2 * 3 / 32, abs=1e-12)
    # Bootstrap: the same seeded draws as a plain loop over resamples.
    rng = np.random.default_rng(3)
    means = [d[rng.integers(0, 5, size=5)].mean() for _ in range(2000)]
    assert (s.ci_low, s.ci_high) == tuple(np.percentile(means, [2.5, 97.5]))
    assert s.ci_low < s.mean_difference < s.ci_high


def test_lower_is_better_metrics_undefined_cases_ties_and_no_difference():
    # HD95 (mm): lower is better; a None (an empty mask) leaves the case out of the pairs.
    s = paired_stats("hd95_mm", 1, "lung", [5.0, 4.0, None, 3.0, 6.0], [4.0, 4.05, 2.0, 3.5, 6.0])
    assert (s.n, s.n_undefined) == (4, 1)
    assert (s.wins, s.ties, s.losses) == (1, 2, 1)  # -1 mm better, +0.05 and 0 within 0.1 mm, +0.5 worse
    assert TIE_TOLERANCE["hd95_mm"] == 0.1
    same = paired_stats("dice", 1, "lung", BASELINE, BASELINE)
    assert same.p_value is None and (same.ci_low, same.ci_high) == (0.0, 0.0) and same.ties == 5
    assert wilcoxon_p([0.0, 0.0]) is None and bootstrap_interval([]) is None
    assert bootstrap_interval([0.25] * 4) == (0.25, 0.25)


AFFINE = np.diag([1.0, 1.0, 2.0, 1.0])
LABELS = {0: "background", 1: "organ", 2: "lesion"}


def _save(data: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, AFFINE), str(path))


def _reference(shift: int) -> np.ndarray:
    ref = np.zeros((32, 32, 12), np.uint8)
    ref[6 + shift:20 + shift, 6:20, 2:9] = 1
    ref[24:28, 24:28, 4:7] = 2  # lesion #1
    ref[3:5, 26:29, 9:11] = 2  # lesion #2, small
    return ref


def write_pair_dataset(root: Path, cases: int = 4) -> Path:
    """Cases whose baseline prediction is shifted by 2 voxels and misses lesion #2; the 'improved' prediction
    is exact except in the last case, where it is shifted more and also misses lesion #1."""
    entries, ids = [], []
    for i in range(cases):
        case = f"case_{i:03d}"
        ids.append(case)
        ref = _reference(i % 3)
        _save(ref, root / "labels" / f"{case}.nii.gz")
        image = np.where(ref > 0, 100.0, 0.0).astype(np.float32) + np.float32(i)
        _save(image, root / "images" / f"{case}.nii.gz")
        base = np.roll(ref, 2, axis=0)
        base[3:5, 26:29, 9:11] = 0
        better = ref.copy()
        if i == cases - 1:
            better = np.roll(ref, 4, axis=0)
            better[24:28, 24:28, 4:7] = 0
        _save(base, root / "baseline" / f"{case}.nii.gz")
        _save(better, root / "improved" / f"{case}.nii.gz")
        entries.append({"id": case, "image": f"images/{case}.nii.gz", "label": f"labels/{case}.nii.gz"})
    manifest = Manifest.model_validate({"name": "pairs", "labels": LABELS, "cases": entries,
                                        "splits": {"train": [], "val": [], "test": ids}})
    return save_manifest(manifest, root / "pairs.json")


def test_compare_prediction_folders_pairs_cases_lesions_and_writes_its_outputs(tmp_path, capsys):
    manifest = write_pair_dataset(tmp_path)
    out = tmp_path / "cmp"
    args = ["compare", "--pred", str(tmp_path / "baseline"), str(tmp_path / "improved"), "--labels", str(manifest),
            "--split", "test", "--names", "old", "new", "--lesion-classes", "2", "--output", str(out),
            "--bootstrap", "500"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "new - old: Dice +" in printed and "wins/ties/losses 3/0/1 (n 4)" in printed
    doc = json.loads((out / "comparison.json").read_text())
    assert doc["kind"] == "medseg-comparison" and doc["baseline"] == "old" and doc["cases"] == [
        "case_000", "case_001", "case_002", "case_003"]
    stats = {(s["class_name"], s["metric"]): s for s in doc["comparisons"][0]["stats"]}
    # The improved organ is exact in 3 cases (Dice 1) and shifted by 4 in the last: per case differences
    # agree with each model's own evaluation.
    rows = list(csv.DictReader((out / "comparison.csv").open()))
    organ = [r for r in rows if r["class_name"] == "organ"]
    assert len(organ) == 8 and {r["model"] for r in organ} == {"old", "new"}
    assert [float(r["dice"]) for r in organ if r["model"] == "new"][:3] == [1.0, 1.0, 1.0]
    # Each model's own evaluation (full precision) is what the statistics pair up.
    new, old = ([c["metrics"]["organ"]["dice"] for c in json.loads((out / "evaluations" / n / "evaluation.json")
                                                                    .read_text())["cases"]] for n in ("new", "old"))
    assert new[:3] == [1.0, 1.0, 1.0]
    assert stats[("organ", "dice")]["mean_difference"] == pytest.approx(np.mean(np.array(new) - np.array(old)), abs=1e-5)
    assert stats[("organ", "dice")]["p_value"] == pytest.approx(wilcoxon(new, old).pvalue, abs=1e-12)
    # Lesions: the improved model finds lesion #2 in the first three cases, loses lesion #1 in the last.
    changes = {c["case_id"]: c for c in doc["comparisons"][0]["lesion_changes"]}
    assert [changes[f"case_00{i}"]["gained"] for i in range(3)] == [[2], [2], [2]]
    assert changes["case_003"]["lost"] == [1] and changes["case_003"]["gained"] == []
    assert "3 found that old missed, 1 lost" in printed
    html = (out / "report.html").read_text()
    assert "Paired plot" in html and "gained: case_000" in html and "lost: case_003" in html
    assert html.count("<div class='pair'>") == 3  # 2 gained + 1 lost, each side by side
    # A report, not a gate: the result changes the exit status only with --fail-if-worse.
    reverse = ["compare", "--pred", str(tmp_path / "improved"), str(tmp_path / "baseline"), "--labels", str(manifest),
               "--output", str(tmp_path / "rev"), "--bootstrap", "200"]
    assert main(reverse) == 0
    assert main([*reverse, "--fail-if-worse", "0.01"]) == 1
    assert "WORSE: baseline: mean Dice -" in capsys.readouterr().out
    assert main([*reverse, "--fail-if-worse", "0.9"]) == 0


def test_compare_refuses_mixed_or_missing_inputs(tmp_path, capsys):
    manifest = write_pair_dataset(tmp_path, cases=2)
    assert main(["compare", "--pred", str(tmp_path / "baseline"), "--output", str(tmp_path / "o")]) == 2
    assert "--labels" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "a"), "--output", str(tmp_path / "o")]) == 2
    assert "two or more models" in capsys.readouterr().err
    with pytest.raises(Exception, match="are a folder"):
        compare_prediction_folders([tmp_path / "baseline", tmp_path / "improved"], tmp_path / "labels", tmp_path / "o",
                                   split="test")
    assert manifest.is_file()


PHANTOM_LABELS = {0: "background", 1: "lung", 2: "nodule"}


def make_bundle(path: Path, manifest: Path, seed: int, name: str, init_from: Path | None = None,
                labels: dict[int, str] = PHANTOM_LABELS, in_channels: int = 1) -> Path:
    """A freshly initialised tiny model saved as a bundle (its predictions need no training to be compared)."""
    import hashlib

    config = tiny_config(manifest, path.parent / "run", **({"init_from": str(init_from)} if init_from else {}))
    config.name = name
    torch.manual_seed(seed)
    net = build_model(config.model, in_channels, len(labels))
    data = DataProvenance(manifest_name="phantoms", manifest_sha256=hashlib.sha256(manifest.read_bytes()).hexdigest(),
                          train_cases=4)
    bundle = ModelBundle.from_config(config, labels, in_channels, data=data)
    bundle = bundle.with_weights(net.state_dict())
    if init_from is not None:
        from medseg.models.bundle import load_bundle

        source = load_bundle(init_from)
        record = InitFromRecord(source=init_from.name, source_weights_sha256=source.spec.provenance.weights_sha256,
                                loaded=26)
        bundle.spec = bundle.spec.model_copy(update={"provenance": bundle.spec.provenance.model_copy(
            update={"init_from": record})})
    return bundle.save(path)


def test_models_on_a_split_with_forgetting_check_and_provenance_chain(phantom_manifest, tmp_path, capsys):
    source = make_bundle(tmp_path / "source" / "best.pt", phantom_manifest, 1, "source")
    tuned = make_bundle(tmp_path / "tuned" / "best.pt", phantom_manifest, 2, "tuned", init_from=source)
    result = compare_models([source, tuned], phantom_manifest, "test", tmp_path / "cmp", resamples=200,
                            options=PredictOptions(device="cpu"))
    assert result.names == ["source", "tuned"] and result.cases == ["phantom_004", "phantom_005"]
    assert [m.name for m in result.chains[1]] == ["tuned", "source"] and len(result.chains[0]) == 1
    (check,) = result.forgetting
    assert check.checked and check.source is not None and check.source.name == "source"
    s = check.comparison.comparisons[0].mean_dice
    assert check.drop == pytest.approx(s.baseline_mean - s.model_mean)
    assert check.flagged == (check.drop > 0.02)
    html = (tmp_path / "cmp" / "report.html").read_text()
    assert "Did fine-tuning forget?" in html and "Provenance chain" in html
    doc = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert doc["forgetting"][0]["checked"] and doc["provenance_chains"][1][1]["name"] == "source"
    # Predicted with each model's weights named in the folder; the split's masks carry the manifest's ids.
    pred_dirs = sorted((tmp_path / "cmp" / "predictions").iterdir())
    assert len(pred_dirs) == 2 and all(list(d.rglob("phantom_005.nii.gz")) for d in pred_dirs)

    # The source retrained since (other weights in its file): the check is not done, and says why.
    make_bundle(source, phantom_manifest, 9, "source")
    args = ["compare", str(tuned), str(tuned.parent), "--manifest", str(phantom_manifest), "--split", "test",
            "--output", str(tmp_path / "cmp2"), "--device", "cpu", "--bootstrap", "50"]
    assert main([*args, "--fail-if-worse", "0"]) == 0  # the same model twice: no difference, nothing flagged
    printed = capsys.readouterr().out
    assert "forgetting check of tuned (tuned) #1: not done" in printed and "retrained since" in printed
    doc = json.loads((tmp_path / "cmp2" / "comparison.json").read_text())
    assert [f["checked"] for f in doc["forgetting"]] == [False, False]
    assert doc["comparisons"][0]["stats"][0]["mean_difference"] == 0.0


def test_repeated_bundle_names_get_their_run_folder_then_a_number():
    from medseg.evaluation.compare import ModelInfo, display_names

    infos = [ModelInfo("a", Path("/x/r1/best.pt")), ModelInfo("a", Path("/x/r2/best.pt")), ModelInfo("b"),
             ModelInfo("a", Path("/y/r1/best.pt")), ModelInfo("c", Path("/z/c.pt")), ModelInfo("c", Path("/z/d.pt"))]
    assert display_names(infos) == ["a (r1) #1", "a (r2)", "b", "a (r1) #2", "c (c)", "c (d)"]
