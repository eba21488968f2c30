"""report.html renders in headless Chromium as a self-contained page (skipped without Chromium)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.evaluation.runner import evaluate_folders

_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "check_report_render.py"
_spec = importlib.util.spec_from_file_location("check_report_render", _SCRIPT)
assert _spec is not None and _spec.loader is not None
render_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(render_check)


def test_report_renders_with_figures_and_no_external_references(tmp_path: Path) -> None:
    chromium = render_check.find_chromium()
    if chromium is None:
        pytest.skip("chromium not installed (apt-get install -y chromium)")
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    ref = np.zeros((32, 32, 16), np.uint8)
    ref[8:20, 8:20, 4:10] = 1
    ref[22:26, 22:26, 6:9] = 2
    for case, shift in (("good", 0), ("bad", 3)):
        for folder, data in (("ref", ref), ("pred", np.roll(ref, shift, axis=0))):
            (tmp_path / folder).mkdir(exist_ok=True)
            nib.save(nib.Nifti1Image(data, affine), str(tmp_path / folder / f"{case}.nii.gz"))
    evaluate_folders(tmp_path / "pred", tmp_path / "ref", tmp_path / "out", lesion_classes=[2], progress=False)
    report = tmp_path / "out" / "report.html"
    assert render_check.check_html(report.read_text()) == []
    png = tmp_path / "shot.png"
    render_check.render(report, png, chromium, height=1400)
    assert render_check.check_screenshot(png) == []
