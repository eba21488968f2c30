"""`medseg predict --ray`: the same masks and failure record as serial predict, resume, progress, dying
workers, on a local Ray cluster of 2 CPUs; and Ray is never imported without the flag."""

import csv
import io
import logging
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from tqdm import tqdm

from medseg.cli import main
from medseg.data.phantom import make_phantom
from medseg.errors import MedsegError
from medseg.inference import ray_runner
from medseg.inference.ray_runner import plan_actors, predict_paths_ray
from medseg.inference.runner import predict_paths
from tests.conftest import REPO_ROOT, TINY_SPEC

NAMES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray instance of 2 CPUs for the module (starting one takes ~20 s on a busy machine)."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'medseg[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """Three phantom scans and one broken file."""
    folder = tmp_path_factory.mktemp("scans")
    rng = np.random.default_rng(5)
    for name in NAMES:
        image, _, affine, _ = make_phantom(rng, TINY_SPEC)
        nib.save(nib.Nifti1Image(image, affine), folder / f"{name}.nii.gz")
    (folder / "broken.nii.gz").write_bytes(b"not a nifti")
    return folder


@pytest.fixture(scope="module")
def serial(trained_run, scans, tmp_path_factory):
    """The reference: the same scans predicted serially, in this process."""
    out = tmp_path_factory.mktemp("serial")
    predict_paths(trained_run, [scans], out, device="cpu")
    return out


def _rows(out):
    with (out / "failures.csv").open() as f:
        return [(r["file"], r["mask"], r["error"]) for r in csv.DictReader(f)]


def _assert_same_masks(out, reference):
    for name in NAMES:
        got, want = nib.load(out / f"{name}.nii.gz"), nib.load(reference / f"{name}.nii.gz")
        assert np.array_equal(np.asanyarray(got.dataobj), np.asanyarray(want.dataobj)), name
        assert got.get_data_dtype() == want.get_data_dtype()
        assert got.header.binaryblock == want.header.binaryblock, f"{name}: header (affine, qform/sform) differs"
        assert np.array_equal(got.affine, want.affine)


class _RecordingBar(tqdm):
    """tqdm that always draws (into a buffer) and records the count after each update."""

    bars: list["_RecordingBar"] = []
    on_update = None

    def __init__(self, *args, **kwargs):
        kwargs.update(disable=False, file=io.StringIO())
        super().__init__(*args, **kwargs)
        self.seen = [self.n]
        _RecordingBar.bars.append(self)

    def update(self, n=1):
        super().update(n)
        self.seen.append(self.n)
        if _RecordingBar.on_update is not None:
            _RecordingBar.on_update()


@pytest.fixture
def bars(monkeypatch):
    _RecordingBar.bars, _RecordingBar.on_update = [], None
    monkeypatch.setattr(ray_runner, "tqdm", _RecordingBar)
    return _RecordingBar


def _kill_predict_actors(ray):
    for name in ray.util.list_named_actors():
        if name.startswith("medseg-predict-"):
            try:
                ray.kill(ray.get_actor(name))
            except ValueError:  # gone meanwhile
                pass


def test_ray_predict_gives_serial_masks_one_failure_record_progress_and_resumes(
        ray_session, trained_run, scans, serial, tmp_path, bars, capsys):
    out = tmp_path / "out"
    args = ["predict", "--model", str(trained_run), "--input", str(scans), "--output", str(out), "--device", "cpu",
            "--ray", "auto", "--ray-actors", "2", "--precision", "float32"]  # as serial (auto may pick bf16)
    assert main(args) == 1  # the broken scan failed; the others were written
    assert "3 mask(s) written" in capsys.readouterr().out
    _assert_same_masks(out, serial)
    assert _rows(out) == _rows(serial) == [(str(scans / "broken.nii.gz"), "broken.nii.gz", "ScanError")]
    [bar] = bars.bars
    assert bar.total == 4 and bar.seen == [0, 1, 2, 3, 4], "progress advances as each scan's result arrives"
    assert "4/4" in bar.fp.getvalue()

    # A rerun over the good scans skips them all (masks kept, not rewritten); the broken one's record stays.
    before = {name: (out / f"{name}.nii.gz").stat() for name in NAMES}
    summary = predict_paths_ray(trained_run, [scans / f"{n}.nii.gz" for n in NAMES], out, device="cpu")
    assert sorted(p.name for p in summary.skipped) == [f"{n}.nii.gz" for n in NAMES]
    assert not summary.written and not summary.failed
    after = {name: (out / f"{name}.nii.gz").stat() for name in NAMES}
    assert {n: (s.st_ino, s.st_mtime_ns) for n, s in after.items()} == {n: (s.st_ino, s.st_mtime_ns) for n, s in before.items()}
    assert _rows(out) == _rows(serial)


def test_scans_of_a_dying_worker_are_sent_again_and_give_the_same_masks(
        ray_session, trained_run, scans, serial, tmp_path, bars, caplog):
    killed = []

    def kill_once():
        if not killed:
            killed.append(True)
            _kill_predict_actors(ray_session)  # after its first scan, while the second is queued on it

    bars.on_update = kill_once
    with caplog.at_level(logging.WARNING, logger="medseg.inference.ray_runner"):
        summary = predict_paths_ray(trained_run, [scans], tmp_path / "out", device="cpu", actors=1)
    assert "worker died" in caplog.text, "no scan was in flight on a killed actor: nothing was retried"
    assert sorted(p.name for p in summary.written) == [f"{n}.nii.gz" for n in NAMES]
    assert [f.path.name for f in summary.failed] == ["broken.nii.gz"]
    _assert_same_masks(tmp_path / "out", serial)


def test_a_scan_whose_workers_keep_dying_is_recorded_as_failed_and_the_batch_ends(
        ray_session, trained_run, scans, tmp_path, bars):
    bars.on_update = lambda: _kill_predict_actors(ray_session)  # every replacement dies too
    summary = predict_paths_ray(trained_run, [scans], tmp_path / "out", device="cpu", actors=1)
    died = [f for f in summary.failed if f.error == "WorkerDied"]
    assert died, "killing every worker left no scan failed"
    assert all("Ray worker" in f.message for f in died)
    rows = _rows(tmp_path / "out")
    assert {r[1] for r in rows} == {f.mask for f in summary.failed}
    assert len(summary.written) + len(summary.failed) == 4


def test_a_model_that_cannot_be_loaded_stops_the_run_before_any_scan(ray_session, scans, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    code = main(["predict", "--model", str(tmp_path / "run"), "--input", str(scans), "--output", str(tmp_path / "out"),
                 "--device", "cpu", "--ray", "auto", "--ray-actors", "1"])
    assert code == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "run") in err and "Traceback" not in err
    assert not list((tmp_path / "out").glob("*.nii.gz")) and not (tmp_path / "out" / "failures.csv").exists()


def test_ray_flag_without_ray_installed_says_how_to_install(scans, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    code = main(["predict", "--model", "m", "--input", str(scans), "--output", str(tmp_path / "o"), "--ray", "auto"])
    assert code == 2 and "pip install 'medseg[ray]'" in capsys.readouterr().err


def test_plan_one_actor_per_gpu_or_per_cpus_never_more_than_scans():
    gpu_cluster = {"CPU": 32.0, "GPU": 4.0}
    plan = plan_actors(gpu_cluster, "auto", None, 1, scans=100)
    assert (plan.actors, plan.num_gpus, plan.device) == (4, 1, "cuda")
    plan = plan_actors(gpu_cluster, "cpu", None, 4, scans=100)
    assert (plan.actors, plan.num_gpus, plan.num_cpus, plan.device) == (8, 0, 4, "cpu")
    assert plan_actors({"CPU": 16.0}, "auto", None, 2, scans=3).actors == 3
    assert plan_actors({"CPU": 8.0}, "auto", 5, 1, scans=3).actors == 5  # as asked
    with pytest.raises(MedsegError, match="need 10 CPU, the cluster has 8"):
        plan_actors({"CPU": 8.0}, "auto", 5, 2, scans=3)
    with pytest.raises(MedsegError, match="no GPUs"):
        plan_actors({"CPU": 8.0}, "cuda", None, 1, scans=3)


def test_ray_flags_without_ray_are_refused(tmp_path, capsys):
    code = main(["predict", "--model", "m", "--input", str(tmp_path), "--output", str(tmp_path / "o"),
                 "--ray-actors", "2"])
    assert code == 2 and "--ray" in capsys.readouterr().err


def test_serial_predict_never_imports_ray(tmp_path):
    code = ("import sys; from medseg.cli import main; import medseg.inference.ray_runner; "
            f"main(['predict', '--model', 'm', '--input', {str(tmp_path / 'none')!r}, '--output', "
            f"{str(tmp_path / 'o')!r}]); assert 'ray' not in sys.modules, 'ray was imported'")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "no such file" in result.stderr
