"""Boundaries and refusals of medseg.io.geometry that mutation testing found untested (docs/testing.md): a
scan exactly at the memory cap, non-finite affines, float label maps."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.errors import GeometryError, ScanError
from medseg.io.geometry import check_affine, check_label_matches_image, check_size

AFFINE = np.diag([0.8, 0.8, 2.5, 1.0])


def test_a_scan_exactly_at_the_memory_cap_is_accepted_and_one_byte_over_refused():
    check_size(Path("scan.nii.gz"), (10, 10, 10), 2, max_bytes=2000)
    with pytest.raises(ScanError, match="above the limit"):
        check_size(Path("scan.nii.gz"), (10, 10, 10), 2, max_bytes=1999)


@pytest.mark.parametrize("bad", ["inf", "nan", "3x4"])
def test_an_affine_with_a_non_finite_value_or_of_the_wrong_shape_is_refused(bad):
    affine = AFFINE.copy()
    if bad == "3x4":
        affine = affine[:3]
    else:
        affine[0, 3] = float(bad)
    with pytest.raises(GeometryError, match="non-finite values or is not 4x4"):
        check_affine(affine, Path("scan.nii.gz"))


def _pair(label_data: np.ndarray) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    return nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), AFFINE), nib.Nifti1Image(label_data, AFFINE)


def test_a_float_label_map_with_whole_values_is_accepted():
    data = np.zeros((4, 5, 6), np.float32)
    data[1, 1, 1] = 2.0
    check_label_matches_image(*_pair(data), {0, 1, 2}, Path("label.nii.gz"))


@pytest.mark.parametrize(("value", "message"), [(np.nan, "NaN or infinite"), (np.inf, "NaN or infinite"),
                                                (1.5, "non-integer values")])
def test_a_float_label_map_with_nan_or_fractions_is_refused(value, message):
    data = np.zeros((4, 5, 6), np.float32)
    data[2, 3, 4] = value
    with pytest.raises(ScanError, match=message):
        check_label_matches_image(*_pair(data), {0, 1, 2}, Path("label.nii.gz"))


def test_a_3d_label_on_a_multichannel_image_grid_is_accepted():
    image = nib.Nifti1Image(np.zeros((4, 5, 6, 2), np.float32), AFFINE)  # two channels on one grid
    check_label_matches_image(image, nib.Nifti1Image(np.zeros((4, 5, 6), np.uint8), AFFINE), {0, 1}, Path("l.nii.gz"))
