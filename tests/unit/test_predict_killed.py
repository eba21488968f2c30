"""A predict run killed with SIGKILL leaves no half-written mask; rerunning completes the rest, cleans up, and
gives the same masks, voxel for voxel, as a run that was never interrupted."""

import json
import os
import subprocess
import sys
import textwrap

import nibabel as nib
import numpy as np

from medseg.data.phantom import make_phantom
from tests.conftest import REPO_ROOT, TINY_SPEC

#: The killed run dies right after its KILL_AFTER-th NIfTI mask is on disk (a fixed point, not a clock).
KILL_AFTER = 2
CASES = [f"case{i}" for i in range(6)]

# `medseg predict` with NiftiMaskWriter.write wrapped to SIGKILL its own process after the N-th mask (argv[1]).
# The reader and the other sidecar writers keep running ahead, so the kill lands with later scans read,
# predicted, and their sidecars or temporary files possibly half done.
KILLING_PREDICT = textwrap.dedent("""
    import os, signal, sys
    from medseg.io import mask_writers
    kill_after = int(sys.argv.pop(1))
    original = mask_writers.NiftiMaskWriter.write
    written = []
    def write(self, *args, **kwargs):
        original(self, *args, **kwargs)
        written.append(1)
        if len(written) == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    mask_writers.NiftiMaskWriter.write = write
    from medseg.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _masks(folder):
    return {p.name for p in folder.iterdir() if p.name.endswith(".nii.gz") and not p.name.startswith(".")}


def test_kill_9_mid_batch_then_rerun_gives_every_mask_as_an_uninterrupted_run(trained_run, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    for name in CASES:
        image, _, affine, _ = make_phantom(rng, TINY_SPEC)
        nib.save(nib.Nifti1Image(image, affine), inputs / f"{name}.nii.gz")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}

    def predict_args(out):
        return ["predict", "--model", str(trained_run), "--input", str(inputs), "--output", str(out), "--device", "cpu"]

    reference = tmp_path / "reference"
    plain = subprocess.run([sys.executable, "-m", "medseg.cli", *predict_args(reference)], env=env,
                           capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0, plain.stderr

    out = tmp_path / "out"
    killed = subprocess.run([sys.executable, "-c", KILLING_PREDICT, str(KILL_AFTER), *predict_args(out)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, (killed.returncode, killed.stderr)
    # Scans run in name order and one thread writes, so exactly the first KILL_AFTER masks were finished.
    assert _masks(out) == {f"{name}.nii.gz" for name in CASES[:KILL_AFTER]}

    rerun = subprocess.run([sys.executable, "-m", "medseg.cli", *predict_args(out)], env=env,
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{KILL_AFTER} already present (skipped)" in rerun.stdout
    # The killed run's temporary mask and claim (lock) files are gone once the rerun is done.
    expected_files = sorted([f"{name}{suffix}" for name in CASES for suffix in (".nii.gz", ".ctbl", ".itksnap.txt")]
                            + ["statistics.csv", "statistics.json"])
    assert sorted(p.name for p in out.iterdir()) == expected_files
    assert sorted(p.name for p in reference.iterdir()) == expected_files
    # Every mask, those finished before the kill and those of the rerun, equals the uninterrupted run's:
    # every voxel, the affine and the whole header.
    for name in CASES:
        got, want = nib.load(out / f"{name}.nii.gz"), nib.load(reference / f"{name}.nii.gz")
        got_array, want_array = np.asarray(got.dataobj), np.asarray(want.dataobj)
        assert got_array.shape == want_array.shape == TINY_SPEC.shape
        assert got_array.dtype == want_array.dtype
        assert np.array_equal(got_array, want_array), name
        assert np.array_equal(got.affine, want.affine), name
        assert got.header.binaryblock == want.header.binaryblock, name
        for suffix in (".ctbl", ".itksnap.txt"):
            assert (out / f"{name}{suffix}").read_bytes() == (reference / f"{name}{suffix}").read_bytes()
    # Statistics are merged before each mask is written, so the killed run's masks have their rows too.
    assert sorted(json.loads((out / "statistics.json").read_text())["cases"]) == CASES
    assert (json.loads((out / "statistics.json").read_text())["cases"]
            == json.loads((reference / "statistics.json").read_text())["cases"])
