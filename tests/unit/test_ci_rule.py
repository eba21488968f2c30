"""The CI rule of tests/conftest.py: under CI=true a skip (in a test, a fixture or at module level) fails and
names what is missing; without CI it stays a skip with its reason; ``gpu`` tests are deselected without CUDA."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT

SAMPLE = '''
import pytest

@pytest.fixture
def data():
    pytest.skip("real data not found at /nowhere/shared/data")

def test_needs_data(data):
    pass

def test_needs_tool():
    pytest.skip("dciodvfy not installed")

@pytest.mark.gpu
def test_needs_a_gpu():
    pass

def test_runs():
    pass
'''
MODULE_SKIP = 'import pytest\npytest.importorskip("no_such_extra_module", reason="the frobnicate extra is missing")\n'


def _inner_pytest(folder: Path, ci: str | None) -> subprocess.CompletedProcess:
    # The inner run uses this repository's conftest (its hooks) as a plugin, on sample tests in ``folder``.
    (folder / "conftest.py").write_text("from tests.conftest import *  # noqa: F403\n"
                                        "from tests.conftest import pytest_runtest_makereport, "
                                        "pytest_make_collect_report, pytest_collection_modifyitems  # noqa: F401\n")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = str(REPO_ROOT)
    if ci is not None:
        env["CI"] = ci
    # --continue-on-collection-errors: the module-level skip (a collection error under CI) does not hide the rest.
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider",
                           "--continue-on-collection-errors",
                           "-m", "gpu or not gpu", "-o", "markers=gpu: needs CUDA", str(folder)],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=120)


def test_under_ci_a_skip_fails_naming_what_is_missing(tmp_path):
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    (tmp_path / "test_module_skip.py").write_text(MODULE_SKIP)
    run = _inner_pytest(tmp_path, ci="true")
    assert run.returncode != 0
    summary = run.stdout.strip().splitlines()[-1]
    # A skip in a fixture fails the setup (an error), in the test body a failure, at module level the collection.
    assert summary.startswith("1 failed, 1 passed, 1 deselected, 2 errors in "), run.stdout
    assert "Missing: real data not found at /nowhere/shared/data" in run.stdout
    assert "Missing: dciodvfy not installed" in run.stdout
    assert "Missing: the frobnicate extra is missing" in run.stdout


def test_without_ci_the_same_tests_skip_with_their_reason(tmp_path):
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    (tmp_path / "test_module_skip.py").write_text(MODULE_SKIP)
    run = _inner_pytest(tmp_path, ci=None)
    assert run.returncode == 0, run.stdout
    summary = run.stdout.strip().splitlines()[-1]
    assert "1 passed" in summary and "3 skipped" in summary and "failed" not in summary, summary
    assert "1 deselected" in summary or __import__("torch").cuda.is_available(), summary
    assert "real data not found at /nowhere/shared/data" in run.stdout
    assert "the frobnicate extra is missing" in run.stdout


def test_gpu_tests_are_deselected_not_skipped_without_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():  # the rule only applies to machines without CUDA
        return
    (tmp_path / "test_sample.py").write_text("import pytest\n\n@pytest.mark.gpu\ndef test_gpu():\n    pass\n\n"
                                             "def test_cpu():\n    pass\n")
    run = _inner_pytest(tmp_path, ci="true")
    assert run.returncode == 0, run.stdout
    summary = run.stdout.strip().splitlines()[-1]
    assert "1 passed, 1 deselected" in summary, summary
