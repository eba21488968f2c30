"""Batch safety of `medseg predict`: outputs never land on inputs, failure records survive later runs,
killed runs' temporaries are cleaned, and runs sharing a folder split the work."""

import csv
import json
import os
import re
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from dicom_synth import write_series

from medseg.atomic import claim, lock_path
from medseg.cli import main
from medseg.data.phantom import make_phantom
from medseg.errors import OutputError
from medseg.inference.predictor import Predictor
from medseg.inference.runner import predict_paths
from tests.conftest import REPO_ROOT, TINY_SPEC


def _phantoms(folder, names, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in names:
        image, _, affine, _ = make_phantom(rng, TINY_SPEC)
        nib.save(nib.Nifti1Image(image, affine), folder / f"{name}.nii.gz")
    return folder


def _snapshot(folder):
    """Every file under ``folder`` with its bytes."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def predictor(trained_run):
    return Predictor.from_checkpoint(trained_run, "cpu")


# --- the output folder is, or is inside, an input ---------------------------------------------------

def _layouts(tmp_path):
    """(inputs, output) pairs where masks would land among the scans."""
    inp = _phantoms(tmp_path / "in", ["a", "b"])
    dicom = tmp_path / "dicom" / "series1"
    dicom.mkdir(parents=True)
    write_series(dicom, 4)
    (tmp_path / "link").symlink_to(inp, target_is_directory=True)
    return {
        "output is the input folder": ([inp], inp),
        "output inside the input folder": ([inp], inp / "masks"),
        "output is a symlink to the input folder": ([inp], tmp_path / "link"),
        "input folder given through a symlink": ([tmp_path / "link"], inp),
        "output holds an input file": ([inp / "a.nii.gz"], inp),
        "output is a DICOM series folder": ([dicom], dicom),
        "output inside a folder of DICOM series": ([tmp_path / "dicom"], tmp_path / "dicom" / "out"),
    }


LAYOUTS = ["output is the input folder", "output inside the input folder", "output is a symlink to the input folder",
           "input folder given through a symlink", "output holds an input file", "output is a DICOM series folder",
           "output inside a folder of DICOM series"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_output_among_the_inputs_is_refused_before_any_work(tmp_path, layout):
    inputs, output = _layouts(tmp_path)[layout]
    before = _snapshot(tmp_path)
    # No model exists: reaching model loading would raise CheckpointError, not OutputError.
    with pytest.raises(OutputError, match="input") as err:
        predict_paths(tmp_path / "no-model", inputs, output, overwrite=True, device="cpu")
    assert str(output) in str(err.value)
    assert _snapshot(tmp_path) == before, "something was written or changed"
    assert not (tmp_path / "in" / "masks").exists() and not (tmp_path / "dicom" / "out").exists()


def test_cli_refuses_output_into_the_input_folder_with_exit_2_and_leaves_the_scans_alone(trained_run, tmp_path, capsys):
    inp = _phantoms(tmp_path / "in", ["a", "b", "c", "d"])
    before = _snapshot(inp)
    for extra in (["--overwrite"], []):
        code = main(["predict", "--model", str(trained_run), "--input", str(inp), "--output", str(inp), "--device", "cpu",
                     *extra])
        assert code == 2
        err = capsys.readouterr().err
        assert "input folder" in err and str(inp) in err
        assert _snapshot(inp) == before


def test_output_beside_the_inputs_is_allowed(predictor, tmp_path):
    inp = _phantoms(tmp_path / "data" / "images", ["a"])
    summary = predict_paths(None, [inp / "a.nii.gz"], tmp_path / "data" / "masks", predictor=predictor)
    assert [p.name for p in summary.written] == ["a.nii.gz"]


# --- failures.csv describes the folder ----------------------------------------------------------------

def _rows(out):
    with (out / "failures.csv").open() as f:
        return list(csv.DictReader(f))


def test_a_later_run_keeps_earlier_failure_records_until_the_scan_succeeds(predictor, tmp_path):
    out = tmp_path / "out"
    first = _phantoms(tmp_path / "first", ["good"])
    broken = first / "broken.nii.gz"
    broken.write_bytes(b"not a nifti")
    s1 = predict_paths(None, [first], out, predictor=predictor)
    assert [f.path for f in s1.failed] == [broken]
    assert [(r["file"], r["mask"], r["error"]) for r in _rows(out)] == [(str(broken), "broken.nii.gz", "ScanError")]

    # Another batch into the same folder: the earlier failure is still unresolved, so its row stays.
    second = _phantoms(tmp_path / "second", ["other"], seed=1)
    s2 = predict_paths(None, [second], out, predictor=predictor)
    assert [p.name for p in s2.written] == ["other.nii.gz"] and not s2.failed
    assert [r["file"] for r in _rows(out)] == [str(broken)]

    # The same scan failing again replaces its row (one row per mask), with the new error.
    broken.write_bytes(b"still not a nifti, differently")
    predict_paths(None, [broken], out, predictor=predictor)
    rows = _rows(out)
    assert len(rows) == 1 and "not a readable NIfTI" in rows[0]["message"]

    # Repaired, it is written and its row goes; an empty record is no record.
    _phantoms(tmp_path / "fixed", ["broken"], seed=2)
    os.replace(tmp_path / "fixed" / "broken.nii.gz", broken)
    s4 = predict_paths(None, [first], out, predictor=predictor)
    assert [p.name for p in s4.written] == ["broken.nii.gz"]
    assert not (out / "failures.csv").exists()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "lock or temporary files left behind"


def test_a_record_written_before_the_mask_column_is_resolved_by_file(predictor, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    inp = _phantoms(tmp_path / "in", ["a"])
    (out / "failures.csv").write_text(f"file,error,message\n{inp / 'a.nii.gz'},ScanError,x\n/elsewhere/z.nii.gz,ScanError,y\n")
    predict_paths(None, [inp], out, predictor=predictor)
    assert [r["file"] for r in _rows(out)] == ["/elsewhere/z.nii.gz"]


# --- temporaries of killed runs ------------------------------------------------------------------------

def test_orphan_temporaries_are_removed_unless_a_live_run_holds_their_claim(predictor, tmp_path):
    inp = _phantoms(tmp_path / "in", ["a"])
    out = tmp_path / "out"
    out.mkdir()
    orphans = [out / ".a.nii.gz.tmp-k1ll3d.nii.gz", out / ".zz.nii.gz.tmp-0ther.nii.gz", out / ".failures.csv.tmp-x1"]
    for p in orphans:
        p.write_bytes(b"half a file")
    live = out / ".busy.nii.gz.tmp-l1ve.nii.gz"
    live.write_bytes(b"being written")
    with claim(out / "busy.nii.gz") as held:
        assert held is not None
        predict_paths(None, [inp], out, predictor=predictor)
        assert live.exists(), "a live run's temporary file was deleted"
        assert not [p for p in orphans if p.exists()]
    assert sorted(p.name for p in out.iterdir()) == [live.name, "a.ctbl", "a.itksnap.txt", "a.nii.gz",
                                                     "statistics.csv", "statistics.json"]


# --- runs sharing a folder ---------------------------------------------------------------------------------

def test_a_scan_claimed_by_another_run_is_left_to_it_and_reported(predictor, tmp_path):
    inp = _phantoms(tmp_path / "in", ["a", "b"])
    out = tmp_path / "out"
    out.mkdir()
    held = claim(out / "b.nii.gz")  # what another run does while it predicts b
    assert held is not None and claim(out / "b.nii.gz") is None, "a second claim on one mask must fail"
    try:
        summary = predict_paths(None, [inp], out, predictor=predictor)
    finally:
        held.release()
    assert [p.name for p in summary.written] == ["a.nii.gz"] and summary.claimed == [out / "b.nii.gz"]
    assert not (out / "b.nii.gz").exists() and not summary.failed
    assert "1 scan(s) left to another run" in summary.describe()
    again = predict_paths(None, [inp], out, predictor=predictor)
    assert [p.name for p in again.written] == ["b.nii.gz"] and [p.name for p in again.skipped] == ["a.nii.gz"]


def test_a_mask_another_run_wrote_after_this_one_started_is_not_redone_even_with_overwrite(predictor, tmp_path):
    inp = _phantoms(tmp_path / "in", ["a", "b"])
    out = tmp_path / "out"

    class OtherRunFinishesB:
        """Predicts a; meanwhile 'another run' writes b, which this run reaches next."""

        bundle = predictor.bundle

        def predict_image(self, image, with_uncertainty=False, times=None):
            result = predictor.predict_image(image, with_uncertainty=with_uncertainty, times=times)
            if not (out / "b.nii.gz").exists():  # a comes first
                nib.save(result[0] if with_uncertainty else result, out / "b.nii.gz")
            return result

    summary = predict_paths(None, [inp], out, overwrite=True, predictor=OtherRunFinishesB())
    assert [p.name for p in summary.written] == ["a.nii.gz"] and summary.claimed == [out / "b.nii.gz"]


def test_a_lock_file_left_by_a_killed_run_does_not_block(tmp_path):
    target = tmp_path / "a.nii.gz"
    lock_path(target).write_bytes(b"")  # a killed holder's file: the kernel has dropped its lock
    with claim(target) as held:
        assert held is not None
    assert not lock_path(target).exists()


def test_two_concurrent_runs_on_one_folder_write_each_mask_once(trained_run, tmp_path):
    inp = _phantoms(tmp_path / "in", [f"case{i}" for i in range(6)])
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "medseg.cli", "predict", "--model", str(trained_run), "--input", str(inp),
           "--output", str(out), "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [r[1] for r in results]
    written = [int(re.search(r"(\d+) mask\(s\) written", stdout).group(1)) for stdout, _ in results]
    assert sum(written) == 6, results
    assert sorted(p.name for p in out.iterdir()) == sorted([f"case{i}{suffix}" for i in range(6)
                                                            for suffix in (".nii.gz", ".ctbl", ".itksnap.txt")]
                                                           + ["statistics.csv", "statistics.json"])
    # Both runs merged their scans into one statistics file: every case once.
    assert sorted(json.loads((out / "statistics.json").read_text())["cases"]) == [f"case{i}" for i in range(6)]
