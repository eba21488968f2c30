"""A predict run killed with SIGKILL leaves no half-written mask; rerunning completes the rest and cleans up."""

import json
import os
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np

from medseg.data.phantom import make_phantom
from tests.conftest import REPO_ROOT, TINY_SPEC


def test_kill_9_mid_batch_then_rerun_gives_every_mask_complete(trained_run, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        image, _, affine, _ = make_phantom(rng, TINY_SPEC)
        nib.save(nib.Nifti1Image(image, affine), inputs / f"case{i}.nii.gz")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "medseg.cli", "predict", "--model", str(trained_run), "--input", str(inputs),
           "--output", str(out), "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (out.is_dir() and any(p.name.endswith(".nii.gz") and not p.name.startswith(".") for p in out.iterdir())):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = {p.name for p in out.iterdir() if not p.name.startswith(".") and p.name.endswith(".nii.gz")}
    assert 1 <= len(done_before) < 6, done_before
    for name in done_before:  # whatever was visible at the kill is a complete, readable mask
        assert nib.load(out / name).shape == TINY_SPEC.shape

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(done_before)} already present (skipped)" in rerun.stdout
    for i in range(6):
        assert np.asarray(nib.load(out / f"case{i}.nii.gz").dataobj).shape == TINY_SPEC.shape
    # The killed run's temporary mask and claim (lock) files are gone once the rerun is done.
    assert sorted(p.name for p in out.iterdir()) == [f"case{i}.nii.gz" for i in range(6)] + ["statistics.csv",
                                                                                          "statistics.json"]
    # Statistics are merged before each mask is written, so the killed run's masks have their rows too.
    assert sorted(json.loads((out / "statistics.json").read_text())["cases"]) == [f"case{i}" for i in range(6)]
