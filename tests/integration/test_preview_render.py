"""``medseg predict --preview`` pictures of real scans, as a browser shows them (headless Chromium).

The preview is drawn for the lung CT (lesion class, HU window) and a hippocampus MR (two classes) with their
reference masks standing in for a prediction, so where each structure is is known. Checked on the
screenshot: the page is not blank, the browser shows the PNG as written, and every class appears in its
label-table colour in all three planes. Skipped without Chromium or ../shared/data.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from matplotlib.image import imread
from nibabel.orientations import io_orientation

from medseg.data.labels import label_table
from medseg.inference.preview import render_preview, write_preview
from tests.conftest import figure_text_overflow, load_render_check

render_check = load_render_check()

CASES = {
    "lung1": ("lung_ct/lung1_ct.nii.gz", "lung_ct/lung1_lesion.nii.gz", {0: "background", 1: "lesion"}, "CT", [1]),
    "hippocampus_001": ("hippocampus/images/hippocampus_001.nii.gz", "hippocampus/labels/hippocampus_001.nii.gz",
                        {0: "background", 1: "anterior", 2: "posterior"}, "MR", []),
}


def _colour_pixels(pixels: np.ndarray, rgb: np.ndarray, tol: float = 0.12) -> np.ndarray:
    return np.all(np.abs(pixels - rgb) < tol, axis=-1)


@pytest.mark.parametrize("case", sorted(CASES))
def test_preview_shows_every_structure_in_three_planes_in_a_browser(shared_data: Path, tmp_path: Path, case: str) -> None:
    chromium = render_check.find_chromium()
    if chromium is None:
        pytest.skip("chromium not installed (apt-get install -y chromium)")
    image_rel, mask_rel, names, modality, lesion_classes = CASES[case]
    image, mask = nib.load(shared_data / image_rel), nib.load(shared_data / mask_rel)
    labels = label_table(names)
    png = write_preview(tmp_path / f"{case}.preview.png", image, mask, labels, case, modality, lesion_classes,
                        flags=["weak_model"])

    # The window and the planes are named on the figure itself.
    fig = render_preview(image, mask, labels, case, modality, lesion_classes, ["weak_model"])
    texts = [ax.get_xlabel() for ax in fig.axes] + [ax.get_title() for ax in fig.axes]
    if modality == "CT":
        assert any(re.fullmatch(r"CT (lung|soft tissue) window W \S+ / L \S+ HU", t) for t in texts), texts
    else:
        assert any(t.startswith("1st-99th percentile of the shown region") for t in texts), texts
    # Slices are named as a viewer opens them: the index in the file's own array (the lung CT is stored LPS,
    # so its display array is flipped and the two indices differ).
    ornt = io_orientation(mask.affine)
    labels_in_file = np.asanyarray(mask.dataobj) > 0
    for view, display_axis in (("axial", 2), ("coronal", 1), ("sagittal", 0)):
        file_axis = int(np.flatnonzero(ornt[:, 0] == display_axis)[0])
        titles = [t for t in texts if t.startswith(f"{view}, slice {'ijk'[file_axis]} = ")]
        assert titles and all(t.endswith(f" of {mask.shape[file_axis]}") for t in titles), texts
        for title in titles:  # the named file slice goes through a structure, as the picture shows
            index = int(re.search(r" = (\d+) of ", title).group(1))  # type: ignore[union-attr]
            assert np.take(labels_in_file, index, axis=file_axis).any(), title
    assert any(t.startswith("centre LPS (x, y, z) = (") for t in texts)
    assert "QC: weak_model" in fig.texts[0].get_text()
    # Every text of the figure is drawn inside it, the title too when a real scan raises many flags.
    assert figure_text_overflow(fig) == []
    many = ["modality_mismatch", "spacing_outside_training", "intensity_unlike_training", "uncertain_foreground",
            "low_confidence", "weak_model", *(f"volume_implausible:{n}" for n in names.values() if n != "background")]
    assert figure_text_overflow(render_preview(image, mask, labels, case, modality, lesion_classes, many)) == []

    page = tmp_path / "preview.html"
    page.write_text("<!doctype html><html><body style='margin:0;background:#fff'><img style='display:block' src="
                    f"'data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}'></body></html>")
    shot = tmp_path / "shot.png"
    written = imread(str(png))[..., :3]
    height, width = written.shape[:2]
    render_check.render(page, shot, chromium, width=max(width, 900), height=height + 40)
    assert render_check.check_screenshot(shot) == []
    seen = imread(str(shot))[..., :3][:height, :width]
    # The browser shows the PNG as written (decodes, not scaled or cut).
    assert seen.shape == written.shape
    assert float(np.mean(np.abs(seen - written))) < 0.02
    # Every class, in its label-table colour, in each of the three planes (the figure's three columns),
    # above the legend (the bottom 0.8 inch at 80 dpi), whose swatches carry the colours too.
    thirds = np.array_split(np.arange(width), 3)
    for label in labels[1:]:
        hits = _colour_pixels(seen[: height - 64], np.asarray(label.color) / 255.0)
        per_plane = [int(hits[:, cols].sum()) for cols in thirds]
        assert min(per_plane) >= 10, (label.name, per_plane)
