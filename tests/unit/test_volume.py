"""The Volume owns a scan's geometry: spacing, RAS spacing, orientation, channels, voxel volume, and the one
same-grid rule that channel stacking, evaluation and the label check all apply."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.config import EvaluateConfig
from medseg.errors import GeometryError
from medseg.evaluation.runner import evaluate_case
from medseg.io.display import DisplayGrid
from medseg.io.geometry import check_label_matches_image
from medseg.io.scans import load_volume
from medseg.io.volume import GRID_TOLERANCE_MM, Volume, check_same_grid, grid_mismatch

# Array axis 0 runs anterior->posterior (-A = P) at 0.8 mm, axis 1 right->left (L) at 0.7 mm, axis 2 up (S) at 3 mm.
LPS_PERMUTED = np.array([[0.0, -0.7, 0.0, 120.0],
                         [-0.8, 0.0, 0.0, 90.0],
                         [0.0, 0.0, 3.0, -40.0],
                         [0.0, 0.0, 0.0, 1.0]])


def _save(path: Path, affine: np.ndarray, shape=(6, 5, 4), dtype=np.float32) -> Path:
    nib.save(nib.Nifti1Image(np.arange(np.prod(shape), dtype=dtype).reshape(shape), affine), str(path))
    return path


def test_a_volume_answers_every_geometric_question_from_its_affine(tmp_path):
    volume = load_volume(_save(tmp_path / "scan.nii.gz", LPS_PERMUTED))
    assert volume.path == tmp_path / "scan.nii.gz" and volume.image.shape == (6, 5, 4)
    assert volume.shape == (6, 5, 4) and volume.channels == 1
    assert volume.spacing == pytest.approx((0.8, 0.7, 3.0))
    assert volume.ras_spacing == pytest.approx([0.7, 0.8, 3.0])  # R-L, A-P, S-I
    assert volume.orientation == "PLS"
    assert volume.voxel_volume_ml == pytest.approx(0.8 * 0.7 * 3.0 / 1000)
    # The display grid draws in RAS order and asks the same spacing.
    assert DisplayGrid(volume.affine, volume.shape).spacing == pytest.approx((0.7, 0.8, 3.0))


def test_stacked_channels_are_one_volume_with_their_files(tmp_path):
    a = _save(tmp_path / "c_0000.nii.gz", LPS_PERMUTED)
    b = _save(tmp_path / "c_0001.nii.gz", LPS_PERMUTED)
    volume = load_volume([a, b])
    assert volume.channels == 2 and volume.shape == (6, 5, 4) and volume.files == (a, b)
    assert volume.image.dataobj.dtype == np.float32 and np.allclose(volume.affine, LPS_PERMUTED, atol=1e-5)
    assert load_volume([a]).channels == 1  # a list of one file is that file


@pytest.mark.parametrize("shift_mm", [0.004, 0.02])
def test_one_tolerance_for_channels_predictions_and_labels(tmp_path, shift_mm):
    """The same shift is accepted (or refused) by every same-grid check alike."""
    moved = LPS_PERMUTED.copy()
    moved[2, 3] += shift_mm
    ref = _save(tmp_path / "ref_0000.nii.gz", LPS_PERMUTED, dtype=np.uint8)
    other = _save(tmp_path / "ref_0001.nii.gz", moved, dtype=np.uint8)
    accepted = shift_mm <= GRID_TOLERANCE_MM
    checks = {
        "channel": lambda: load_volume([ref, other]),
        "prediction": lambda: evaluate_case("c", ref, other, [1], EvaluateConfig()),
        "label": lambda: check_label_matches_image(nib.load(ref), nib.load(other), set(range(256)), other),
    }
    for name, check in checks.items():
        if accepted:
            check()
        else:
            with pytest.raises(GeometryError, match=r"ref_0001\.nii\.gz") as err:
                check()
            assert "origin" in str(err.value), name


def test_the_same_grid_error_names_both_files_and_what_differs(tmp_path):
    a = Volume(nib.Nifti1Image(np.zeros((6, 5, 4), np.float32), LPS_PERMUTED), tmp_path / "t1.nii.gz")
    rotated = LPS_PERMUTED.copy()
    rotated[:3, :3] = LPS_PERMUTED[:3, :3] @ np.array([[1, 0, 0], [0, np.cos(0.01), -np.sin(0.01)],
                                                     [0, np.sin(0.01), np.cos(0.01)]])
    b = Volume(nib.Nifti1Image(np.zeros((6, 5, 4), np.float32), rotated), tmp_path / "t2.nii.gz")
    with pytest.raises(GeometryError, match=r"t2\.nii\.gz: channel affine .* differs from first channel .*t1\.nii\.gz's "
                                            r".*\(orientation differs: voxel centres up to 0\.121\d mm apart"):
        check_same_grid(a, b)
    c = Volume(nib.Nifti1Image(np.zeros((6, 5, 3), np.float32), LPS_PERMUTED), tmp_path / "t3.nii.gz")
    with pytest.raises(GeometryError, match=r"t3\.nii\.gz: prediction shape \(6, 5, 3\) differs from reference "
                                            r".*t1\.nii\.gz's \(6, 5, 4\)"):
        a.check_same_grid(c, what="prediction", reference_what="reference")


def test_float32_header_rounding_is_the_same_grid(tmp_path):
    """A grid written by another tool (float32 affine entries, 512 voxels a side) is still the same grid."""
    affine = np.array([[0.703125, 0.0012, 0.0, -180.123456789],
                       [-0.0011, 0.703124, 0.0, -170.98765],
                       [0.0, 0.0, 1.25, 1000.1],
                       [0, 0, 0, 1]])
    rounded = affine.astype(np.float32).astype(np.float64)
    assert grid_mismatch(affine, (512, 512, 300), rounded, (512, 512, 300)) is None
    # ...but a spacing off by 1e-4 mm drifts 0.05 mm across 512 voxels: another grid.
    drifted = affine.copy()
    drifted[0, 0] += 1e-4
    assert grid_mismatch(affine, (512, 512, 300), drifted, (512, 512, 300)).part == "spacing"
