"""Where predict's time goes: every stage of every scan is timed, logged with -v and totalled in the summary."""

import logging
import time

import nibabel as nib
import numpy as np
import pytest

from medseg.cli import main
from medseg.data.phantom import make_phantom
from medseg.inference.timing import STAGES, StageTimes
from tests.conftest import TINY_SPEC


def test_stage_times_add_merge_and_order():
    times = StageTimes()
    with times.stage("network"):
        time.sleep(0.01)
    times.add("read", 0.5)
    times.add("read", 0.25)
    with pytest.raises(RuntimeError), times.stage("write"):  # a failing stage is still counted
        raise RuntimeError("disk full")
    assert list(times.as_record()) == ["read", "network", "write"]  # pipeline order
    assert times["read"] == 0.75 and times["network"] >= 0.01 and times["resample_in"] == 0.0
    totals = StageTimes()
    totals.merge(times)
    totals.merge(times)
    assert totals["read"] == 1.5
    assert totals.around_network() == pytest.approx(totals.total - totals["network"])
    assert "around the network" in totals.describe()


def test_predict_v_logs_each_scan_and_the_summary_totals(trained_run, tmp_path, capsys, caplog):
    rng = np.random.default_rng(0)
    inp = tmp_path / "in"
    inp.mkdir()
    for name in ("a", "b"):
        image, _, affine, _ = make_phantom(rng, TINY_SPEC)
        nib.save(nib.Nifti1Image(image, affine), inp / f"{name}.nii.gz")
    with caplog.at_level(logging.DEBUG, logger="medseg.inference.pipeline"):
        assert main(["-v", "predict", "--model", str(trained_run), "--input", str(inp), "--output",
                     str(tmp_path / "out"), "--precision", "float32"]) == 0
    per_scan = [r.getMessage() for r in caplog.records if r.getMessage().startswith(("a:", "b:"))]
    assert len(per_scan) == 2
    for line in per_scan:
        for stage in STAGES:
            assert f"{stage} " in line
    summary = capsys.readouterr().out
    assert "seconds per stage, all scans" in summary and all(f"{stage} " in summary for stage in STAGES)
