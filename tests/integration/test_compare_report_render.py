"""The comparison report.html renders in headless Chromium as a self-contained page with the paired plot and the
side-by-side overlays (skipped without Chromium)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import to_rgb
from matplotlib.image import imread

from medseg.evaluation.compare_run import compare_prediction_folders
from medseg.io.display import PREDICTION_COLOR, REFERENCE_COLOR
from tests.conftest import load_render_check
from tests.unit.test_compare import write_pair_dataset

render_check = load_render_check()


def test_comparison_report_renders_paired_plot_and_side_by_side_overlays(tmp_path: Path) -> None:
    chromium = render_check.find_chromium()
    if chromium is None:
        pytest.skip("chromium not installed (apt-get install -y chromium)")
    manifest = write_pair_dataset(tmp_path)
    compare_prediction_folders([tmp_path / "baseline", tmp_path / "improved"], manifest, tmp_path / "cmp",
                               names=["old", "new"], split="test", resamples=200)
    report = tmp_path / "cmp" / "report.html"
    text = report.read_text()
    assert render_check.check_html(text) == []
    assert "alt='Dice per case across the models: one line per case'" in text
    # Two overlays per changed case (baseline left, model right): 2 gained + 1 lost cases.
    assert text.count("<div class='pair'><figure><img src='data:image/png;base64,") == 3
    png = tmp_path / "shot.png"
    render_check.render(report, png, chromium, height=3000)
    assert render_check.check_screenshot(png) == []
    pixels = imread(str(png))[..., :3]
    # The paired plot's lines (blue: better, orange: worse) and the overlays' outlines reached the screen.
    for color in ("#0072B2", "#D55E00", REFERENCE_COLOR, PREDICTION_COLOR):
        assert np.all(np.abs(pixels - np.asarray(to_rgb(color))) < 0.1, axis=-1).sum() > 100, color
