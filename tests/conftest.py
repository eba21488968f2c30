"""Shared fixtures: the real data beside the repository (``../shared/data``), skipped when absent; and the
CI rule: under ``CI=true`` a test that would skip fails instead, naming what is missing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# --- CI never skips ---------------------------------------------------------------------------------
# A fresh clone without ../shared, Chromium, dciodvfy, promtool, Orthanc or an optional extra skips those
# tests with the reason. In CI (.ci/run exports CI=true, as GitHub Actions and GitLab do) everything is
# installed, so a skip there means a check silently did not run: it fails instead, with the skip's reason
# (what is missing). The one inherent exception is hardware: tests marked ``gpu`` are deselected (not
# skipped) on a machine without CUDA, in and out of CI; docs/decisions.md "CI never skips".


def ci_forbids_skips() -> bool:
    """True when the environment says CI (``CI`` is 1/true/yes, any case)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _skip_to_failure(report: pytest.CollectReport | pytest.TestReport) -> None:
    """Turn a skipped ``report`` into a failure whose message is the skip's reason."""
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (path, line, "Skipped: reason")
        where, reason = f"{longrepr[0]}:{longrepr[1]}", str(longrepr[2]).removeprefix("Skipped: ")
    else:
        where, reason = report.nodeid, str(longrepr)
    report.outcome = "failed"
    report.longrepr = f"CI=true: this test would be skipped, and CI runs every test. Missing: {reason} ({where})"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail") and ci_forbids_skips():
        _skip_to_failure(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and ci_forbids_skips():  # a module-level importorskip or skip
        _skip_to_failure(report)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect ``gpu``-marked tests where CUDA is absent: hardware, not a missing install."""
    gpu = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu:
        return
    import torch

    if torch.cuda.is_available():
        return
    config.hook.pytest_deselected(items=gpu)
    items[:] = [item for item in items if item.get_closest_marker("gpu") is None]


REPO_ROOT = Path(__file__).resolve().parents[1]
# Fixed beside the repository, not configurable: the shipped manifests (data_manifests/*.json) name these
# files by paths relative to themselves, so a second location could only ever serve some of the tests.
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (real scans we did not make); tests using it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (a fresh clone has no ../shared)")
    return SHARED_DATA


def link_file(link: Path, target: Path) -> None:
    """A symbolic link ``link`` -> ``target`` (folders made): real scans laid out as another tool's data set
    without copying them."""
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target.resolve())


def load_render_check():
    """``scripts/check_report_render.py`` as a module: the headless-Chromium checks the render tests share."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_report_render", REPO_ROOT / "scripts" / "check_report_render.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- tiny phantoms and a tiny trained model, shared by the pipeline tests -------------------------

from medseg.config import ExperimentConfig, config_from_dict  # noqa: E402
from medseg.data.phantom import PhantomSpec, write_phantom_dataset  # noqa: E402

TINY_SPEC = PhantomSpec(shape=(32, 32, 16), spacing=(4.0, 4.0, 5.0), noise_hu=15.0)


def tiny_config(manifest: Path, output_dir: Path, spatial_dims: int = 3, **train_overrides) -> ExperimentConfig:
    """A config small enough to train in seconds on 2 CPU cores."""
    patch = [32, 32, 16] if spatial_dims == 3 else [32, 32]
    raw = {
        "name": f"tiny{spatial_dims}d",
        "seed": 3,
        "data": {"manifest": str(manifest)},
        "model": {"name": "unet", "spatial_dims": spatial_dims, "channels": [8, 16, 32], "num_res_units": 1},
        "preprocessing": {"spacing": [4.0, 4.0, 5.0], "intensity": {"kind": "ct_window", "a_min": -1000, "a_max": 200}},
        "optim": {"lr": 0.01, "schedule": "constant"},
        "train": {"epochs": 3, "iterations_per_epoch": 6, "patch_size": patch, "batch_size": 2,
                  "samples_per_volume": 2, "val_interval": 1, "output_dir": str(output_dir), **train_overrides},
        "infer": {"sw_batch_size": 2, "overlap": 0.25},
    }
    return config_from_dict(raw, source="tiny test config")


@pytest.fixture(scope="session")
def phantom_manifest(tmp_path_factory) -> Path:
    """Six small synthetic CT phantoms (4 train, 1 val, 1 test) and their manifest."""
    return write_phantom_dataset(tmp_path_factory.mktemp("phantoms"), num_cases=6, seed=1, spec=TINY_SPEC)


@pytest.fixture(scope="session")
def trained_run(phantom_manifest, tmp_path_factory) -> Path:
    """A run folder of a tiny 3D U-Net trained for a few epochs on the phantoms."""
    from medseg.training.trainer import train

    run_dir = tmp_path_factory.mktemp("run") / "tiny3d"
    train(tiny_config(phantom_manifest, run_dir, epochs=6), device="cpu")
    return run_dir


# --- a real PostgreSQL server for the job-store suite ----------------------------------------------


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """A PostgreSQL server of the tests' own (tests/postgres_server.py), for the whole session; skipped with
    the reason when the server binaries (Debian ``postgresql``) or psycopg are missing."""
    from tests.postgres_server import postgres, unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with postgres() as url:
        yield url


def figure_text_overflow(fig) -> list[str]:
    """The texts of matplotlib figure ``fig`` that its Agg renderer draws past the figure's edges, and a
    suptitle that overlaps an axes title, as "text: why" lines (empty when everything fits)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    width, height = fig.bbox.width, fig.bbox.height
    problems = []
    texts = list(fig.texts) + [ax.title for ax in fig.axes]
    for text in texts:
        if not text.get_text():
            continue
        box = text.get_window_extent(renderer)
        if box.x0 < 0 or box.x1 > width or box.y0 < 0 or box.y1 > height:
            problems.append(f"{text.get_text()!r}: drawn at x {box.x0:.0f}..{box.x1:.0f}, y {box.y0:.0f}..{box.y1:.0f} "
                            f"on a {width:.0f} x {height:.0f} px figure")
    if fig.texts:
        title = fig.texts[0].get_window_extent(renderer)
        for ax in fig.axes:
            if ax.title.get_text() and ax.title.get_window_extent(renderer).overlaps(title):
                problems.append(f"{fig.texts[0].get_text()!r} overlaps the axes title {ax.title.get_text()!r}")
    return problems


#: The only patient and study attributes a DICOM-SEG may carry (the type 1 and 2 attributes of the Patient and
#: General Study modules, DICOM PS3.3 C.7.1.1 and C.7.2.1). Written here, not imported from medseg, so that
#: widening medseg's own list (medseg.io.mask_writers.PATIENT_STUDY_TAGS) makes the PHI tests fail.
SEG_ALLOWED_PATIENT_STUDY_TAGS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
)


class FakeClock:
    """A clock the test advances by hand (UNIX-like seconds): leases and rate limits without waiting."""

    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
