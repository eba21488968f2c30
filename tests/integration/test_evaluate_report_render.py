"""report.html renders in headless Chromium as a self-contained page (skipped without Chromium)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from matplotlib.colors import to_rgb
from matplotlib.image import imread

from medseg.evaluation.runner import evaluate_folders
from medseg.io.display import PREDICTION_COLOR, REFERENCE_COLOR
from tests.conftest import load_render_check

render_check = load_render_check()


def test_report_renders_lesion_overlays_failures_and_no_external_references(tmp_path: Path) -> None:
    chromium = render_check.find_chromium()
    if chromium is None:
        pytest.skip("chromium not installed (apt-get install -y chromium)")
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    ref = np.zeros((32, 32, 16), np.uint8)
    ref[8:20, 8:20, 4:10] = 1
    ref[22:26, 22:26, 6:9] = 2
    pred = np.roll(ref, 3, axis=0)
    ref_missed = ref.copy()
    ref_missed[2:4, 28:30, 13] = 2  # a small lesion the prediction misses, far from the big structure
    pred[28:30, 2:4, 2] = 2  # a small false positive
    cases = {"good": (ref, ref), "bad": (ref_missed, pred)}
    for case, (reference, prediction) in cases.items():
        for folder, data in (("ref", reference), ("pred", prediction)):
            (tmp_path / folder).mkdir(exist_ok=True)
            nib.save(nib.Nifti1Image(data, affine), str(tmp_path / folder / f"{case}.nii.gz"))
    (tmp_path / "pred" / "broken.nii.gz").write_bytes(b"not a NIfTI file")  # one unreadable case
    nib.save(nib.Nifti1Image(ref, affine), str(tmp_path / "ref" / "broken.nii.gz"))
    result = evaluate_folders(tmp_path / "pred", tmp_path / "ref", tmp_path / "out", lesion_classes=[2], progress=False)
    assert [f.case_id for f in result.failures] == ["broken"]
    report = tmp_path / "out" / "report.html"
    text = report.read_text()
    assert render_check.check_html(text) == []
    # One picture per missed and per false-positive lesion, each linked from the lesion table.
    off_target = [m for c in result.cases for m in c.lesions[2] if m.status != "detected"]
    assert len(off_target) >= 2
    for n in range(1, len(off_target) + 1):
        assert f"<div id='lesion-{n}'><figure><img src='data:image/png;base64," in text and f"href='#lesion-{n}'" in text
    assert "Failed cases" in text and "broken" in text and "LPS" in text
    assert "no image on the reference grid" in text  # no images given: the captions say so, not a window
    png = tmp_path / "shot.png"
    render_check.render(report, png, chromium, height=4000)
    assert render_check.check_screenshot(png) == []
    # The overlays reached the screen: both outline colours (reference orange, prediction blue) are on it.
    pixels = imread(str(png))[..., :3]
    for color in (REFERENCE_COLOR, PREDICTION_COLOR):
        assert np.all(np.abs(pixels - np.asarray(to_rgb(color))) < 0.1, axis=-1).sum() > 200, color
