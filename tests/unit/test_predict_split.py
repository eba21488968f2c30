"""``medseg predict --manifest M --split S [--fold K]`` predicts exactly that split's cases (multi-channel cases
included), named by their case ids, and says which model runs; ``medseg evaluate --manifest M --split S``
scores exactly those cases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medseg.cli import main
from medseg.data.phantom import write_two_channel_nnunet
from medseg.models.bundle import read_bundle_spec
from tests.unit.test_compare import make_bundle


def _masks(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.nii.gz"))


def test_predict_and_evaluate_a_manifest_split(phantom_manifest, tmp_path, capsys):
    model = make_bundle(tmp_path / "model" / "best.pt", phantom_manifest, 1, "tiny-model")
    out = tmp_path / "pred"
    base = ["predict", "--model", str(model), "--manifest", str(phantom_manifest), "--output", str(out), "--device", "cpu",
            "--no-statistics"]
    assert main([*base, "--split", "test"]) == 0
    printed = capsys.readouterr().out
    sha = read_bundle_spec(model).provenance.weights_sha256
    assert f"model: tiny-model  weights SHA-256 {sha}" in printed and len(sha) == 64
    assert _masks(out) == ["phantom_004.nii.gz", "phantom_005.nii.gz"]  # the test split, and nothing else of the manifest
    assert main([*base, "--split", "val"]) == 0
    assert _masks(out) == ["phantom_003.nii.gz", "phantom_004.nii.gz", "phantom_005.nii.gz"]

    # Evaluate the test split only: the val mask in the same folder is neither scored nor listed as unmatched.
    assert main(["evaluate", "--pred", str(out), "--manifest", str(phantom_manifest), "--split", "test",
                 "--output", str(tmp_path / "eval"), "--no-html"]) == 0
    doc = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert [c["case_id"] for c in doc["cases"]] == ["phantom_004", "phantom_005"]
    assert doc["unmatched_predictions"] == [] and doc["missing_predictions"] == []
    # Without --split: every labelled case of the manifest (3 train cases have no prediction: listed as missing).
    assert main(["evaluate", "--pred", str(out), "--manifest", str(phantom_manifest), "--output", str(tmp_path / "all"),
                 "--no-html"]) == 0
    doc = json.loads((tmp_path / "all" / "evaluation.json").read_text())
    assert [c["case_id"] for c in doc["cases"]] == ["phantom_003", "phantom_004", "phantom_005"]
    assert len(doc["missing_predictions"]) == 3


@pytest.mark.parametrize(("args", "message"), [
    (["--split", "test"], "pass --manifest"),
    (["--manifest", "M"], "name the cases with --split"),
    (["--manifest", "M", "--split", "test", "--input", "x.nii.gz"], "not both"),
    (["--manifest", "M", "--split", "holdout"], "no cases in split 'holdout' (splits with cases: test, train, val)"),
    (["--manifest", "M", "--split", "val", "--fold", "2"], "has 0 folds; fold 2 does not exist"),
])
def test_predict_split_arguments_are_checked(phantom_manifest, tmp_path, capsys, args, message):
    args = [str(phantom_manifest) if a == "M" else a for a in args]
    assert main(["predict", "--model", str(tmp_path / "none"), "--output", str(tmp_path / "o"), *args]) == 2
    assert message in capsys.readouterr().err


def test_predict_a_multichannel_split_groups_each_cases_channels(tmp_path, capsys):
    folder = write_two_channel_nnunet(tmp_path / "Dataset900_Two", num_cases=4, seed=5, num_test=2)
    manifest = tmp_path / "two.json"
    assert main(["import", "nnunet", str(folder), "--output", str(manifest), "--folds", "2"]) == 0
    model = make_bundle(tmp_path / "model" / "best.pt", manifest, 1, "two-channel", labels={0: "background", 1: "lesion"},
                        in_channels=2)
    out = tmp_path / "pred"
    common = ["predict", "--model", str(model), "--manifest", str(manifest), "--output", str(out), "--device", "cpu",
              "--no-statistics"]
    assert main([*common, "--split", "test"]) == 0
    assert _masks(out) == ["case_004.nii.gz", "case_005.nii.gz"]  # imagesTs/case_00N_0000 + _0001, named by id
    assert main([*common, "--split", "val", "--fold", "1"]) == 0
    assert _masks(out) == ["case_001.nii.gz", "case_003.nii.gz", "case_004.nii.gz", "case_005.nii.gz"]
    # Test cases imported from imagesTs have no labels: evaluating them says so.
    assert main(["evaluate", "--pred", str(out), "--manifest", str(manifest), "--split", "test",
                 "--output", str(tmp_path / "eval")]) == 2
    assert "2 case(s) to evaluate have no reference label" in capsys.readouterr().err
    # A one-channel model cannot take the two-channel cases.
    one = make_bundle(tmp_path / "one" / "best.pt", manifest, 1, "one-channel", labels={0: "background", 1: "lesion"})
    assert main(["predict", "--model", str(one), "--manifest", str(manifest), "--split", "test", "--output",
                 str(tmp_path / "p1"), "--device", "cpu"]) == 2
    assert "has 2 channel file(s) but the model takes 1 input channel(s)" in capsys.readouterr().err


def test_evaluate_takes_labels_or_a_manifest_not_both(phantom_manifest, tmp_path, capsys):
    base = ["evaluate", "--pred", str(tmp_path), "--output", str(tmp_path / "out")]
    assert main(base) == 2
    assert "--labels (a folder or manifest) or --manifest M.json" in capsys.readouterr().err
    assert main([*base, "--labels", str(tmp_path), "--manifest", str(phantom_manifest)]) == 2
    assert main([*base, "--labels", str(tmp_path), "--split", "test"]) == 2
    assert "pass --manifest" in capsys.readouterr().err
