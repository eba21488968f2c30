"""`medseg demo` in a reduced size: phantoms -> train -> predict held-out cases -> evaluate."""

import json

import nibabel as nib
import numpy as np
import pytest

from medseg.cli import main
from medseg.demo import run_demo
from medseg.errors import OutputError
from tests.conftest import TINY_SPEC

SMALL = {
    "model": {"channels": [8, 16, 32], "strides": [2, 2]},
    "train": {"epochs": 2, "iterations_per_epoch": 3, "patch_size": [32, 32, 16], "val_interval": 1},
    "infer": {"sw_batch_size": 2},
}


def test_reduced_demo_runs_end_to_end_and_reports_where_everything_is(tmp_path):
    out = tmp_path / "demo"
    result = run_demo(out, num_cases=5, minutes=2, phantom_spec=TINY_SPEC, config_overrides=SMALL)
    test_ids = json.loads((out / "data" / "manifest_test.json").read_text())["splits"]["test"]
    assert test_ids
    for case in test_ids:
        mask = nib.load(out / "predictions" / f"{case}.nii.gz")
        image = nib.load(out / "data" / "images" / f"{case}.nii.gz")
        assert mask.shape == image.shape and np.array_equal(mask.affine, image.affine)
    assert (out / "run" / "best.pt").is_file() and (out / "evaluation" / "report.html").is_file()
    assert set(result.per_class_dice) == {"lung", "nodule"}
    assert 0.0 <= result.mean_foreground_dice <= 1.0
    text = result.describe()
    for part in ("data", "run", "predictions", "evaluation"):
        assert str(out / part) in text


def test_demo_never_overwrites_an_earlier_demo_silently(tmp_path, capsys):
    (tmp_path / "demo" / "run").mkdir(parents=True)
    with pytest.raises(OutputError, match="--overwrite"):
        run_demo(tmp_path / "demo", num_cases=5, phantom_spec=TINY_SPEC, config_overrides=SMALL)
    assert main(["demo", "--output-dir", str(tmp_path / "demo")]) == 2
    assert "--overwrite" in capsys.readouterr().err
