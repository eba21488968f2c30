"""The preview's title fits the PNG as drawn: measured with matplotlib's Agg renderer against the figure's
width (a real CT's QC line was once wider than the figure and cut at both edges)."""

from __future__ import annotations

import nibabel as nib
import numpy as np

from medseg.data.labels import label_table
from medseg.inference.preview import render_preview
from tests.conftest import figure_text_overflow

#: Every QC flag medseg predict can raise on one scan, with long class names (docs/qc.md).
ALL_FLAGS = ["modality_mismatch", "spacing_outside_training", "intensity_unlike_training", "uncertain_foreground",
             "low_confidence", "weak_model", "volume_implausible:left_lung_upper_lobe",
             "volume_implausible:right_lung_lower_lobe", "empty:pulmonary_nodule", "empty_prediction"]


def _scan():
    image = np.zeros((40, 40, 20), np.float32)
    mask = np.zeros(image.shape, np.uint8)
    mask[10:20, 10:20, 5:10] = 1
    mask[25:30, 25:30, 10:14] = 2
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    return nib.Nifti1Image(image, affine), nib.Nifti1Image(mask, affine)


def test_a_title_with_every_qc_flag_stays_inside_the_figure_and_names_every_flag():
    image, mask = _scan()
    labels = label_table({0: "background", 1: "left_lung_upper_lobe", 2: "pulmonary_nodule"})
    case_id = "LIDC-IDRI-0001_1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"
    fig = render_preview(image, mask, labels, case_id, "CT", [2], ALL_FLAGS)
    assert figure_text_overflow(fig) == []
    title = fig.texts[0].get_text()
    assert title.startswith(f"{case_id}: predicted structures\nQC: ")
    assert all(flag in title for flag in ALL_FLAGS)
    assert title.count("\n") >= 2  # the flags did not fit on one line, so they wrapped


def test_a_short_title_stays_one_line_at_full_size():
    image, mask = _scan()
    fig = render_preview(image, mask, label_table({0: "background", 1: "a", 2: "b"}), "case1", "CT", [], ["weak_model"])
    assert fig.texts[0].get_text() == "case1: predicted structures\nQC: weak_model"
    assert fig.texts[0].get_fontsize() == 10
    assert figure_text_overflow(fig) == []
