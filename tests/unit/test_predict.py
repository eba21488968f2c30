"""Prediction: masks on exactly the input's grid (RAS, LPS, oblique), batches that survive bad scans."""

import csv

import nibabel as nib
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from medseg.cli import main
from medseg.data.phantom import make_phantom
from medseg.errors import OutputError
from medseg.inference.predictor import Predictor
from medseg.inference.runner import predict_paths
from tests.conftest import TINY_SPEC, tiny_config


def _asymmetric_phantom(seed: int = 5):
    """A phantom with its left half's lung removed, so a flipped output cannot pass for a correct one."""
    image, label, affine, _ = make_phantom(np.random.default_rng(seed), TINY_SPEC)
    half = image.shape[0] // 2
    image[:half][label[:half] > 0] = 40
    label[:half] = 0
    return image, label, affine


def _save(path, data, affine, qcode=1, scode=1):
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=qcode)
    img.set_sform(affine, code=scode)
    nib.save(img, path)
    return path


def _geometry_variants(affine: np.ndarray) -> dict[str, np.ndarray]:
    """RAS as generated, LPS (x and y flipped), and an oblique grid (20 deg about z, 10 deg about x)."""
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    rot = np.eye(4)
    rot[:3, :3] = Rotation.from_euler("zx", [20, 10], degrees=True).as_matrix()
    return {"ras": affine, "lps": lps, "oblique": rot @ affine}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum())


@pytest.mark.parametrize("variant", ["ras", "lps", "oblique"])
def test_mask_has_exactly_the_input_geometry_and_lands_on_the_anatomy(trained_run, tmp_path, variant):
    image, label, affine = _asymmetric_phantom()
    grid = _geometry_variants(affine)[variant]
    # The same voxels with a different voxel->world map: the anatomy moves with the grid.
    src = _save(tmp_path / f"{variant}.nii.gz", image, grid)
    summary = predict_paths(trained_run, [src], tmp_path / "out", device="cpu")
    assert not summary.failed
    mask_img = nib.load(tmp_path / "out" / f"{variant}.nii.gz")
    ref = nib.load(src)
    assert mask_img.shape == ref.shape
    assert np.array_equal(mask_img.affine, ref.affine)
    assert np.array_equal(mask_img.get_qform(), ref.get_qform()) and np.array_equal(mask_img.get_sform(), ref.get_sform())
    assert int(mask_img.header["qform_code"]) == 1 and int(mask_img.header["sform_code"]) == 1
    assert mask_img.get_data_dtype() == np.uint8
    mask = np.asarray(mask_img.dataobj)
    assert set(np.unique(mask)) <= {0, 1, 2}
    lung_dice = dice(mask == 1, label == 1)
    mirrored_dice = dice(mask[::-1] == 1, label == 1)
    assert lung_dice > 0.7, f"lung Dice {lung_dice:.3f} on the {variant} grid"
    assert lung_dice > mirrored_dice + 0.3, "the mask fits a mirrored anatomy as well as the real one"


def test_qform_only_input_keeps_its_codes(trained_run, tmp_path):
    image, _, affine = _asymmetric_phantom()
    src = _save(tmp_path / "qonly.nii.gz", image, affine, qcode=2, scode=0)
    predict_paths(trained_run, [src], tmp_path / "out", device="cpu")
    out = nib.load(tmp_path / "out" / "qonly.nii.gz")
    assert (int(out.header["qform_code"]), int(out.header["sform_code"])) == (2, 0)
    assert np.allclose(out.affine, nib.load(src).affine, atol=1e-6)


def test_2d_model_writes_a_3d_mask_on_the_source_grid(phantom_manifest, tmp_path):
    from medseg.training.trainer import train

    run = train(tiny_config(phantom_manifest, tmp_path / "run2d", spatial_dims=2, epochs=4), device="cpu")
    image, label, affine = _asymmetric_phantom()
    src = _save(tmp_path / "case.nii.gz", image, _geometry_variants(affine)["lps"])
    predict_paths(run.run_dir, [src], tmp_path / "out", device="cpu")
    out = nib.load(tmp_path / "out" / "case.nii.gz")
    assert out.shape == image.shape and np.array_equal(out.affine, nib.load(src).affine)
    assert dice(np.asarray(out.dataobj) == 1, label == 1) > 0.5


def test_one_bad_scan_is_recorded_and_the_rest_are_written(trained_run, tmp_path):
    image, _, affine = _asymmetric_phantom()
    (tmp_path / "in").mkdir()
    _save(tmp_path / "in" / "good.nii.gz", image, affine)
    (tmp_path / "in" / "broken.nii.gz").write_bytes(b"not a nifti at all")
    out = tmp_path / "out"
    code = main(["predict", "--model", str(trained_run), "--input", str(tmp_path / "in"), "--output", str(out), "--device", "cpu"])
    assert code == 1
    assert (out / "good.nii.gz").is_file() and not (out / "broken.nii.gz").exists()
    rows = list(csv.DictReader((out / "failures.csv").open()))
    assert [r["file"] for r in rows] == [str(tmp_path / "in" / "broken.nii.gz")]
    assert rows[0]["error"] == "ScanError" and "broken.nii.gz" in rows[0]["message"]


def test_existing_masks_are_skipped_unless_overwrite(trained_run, tmp_path):
    image, _, affine = _asymmetric_phantom()
    src = _save(tmp_path / "a.nii.gz", image, affine)
    out = tmp_path / "out"
    predictor = Predictor.from_checkpoint(trained_run, "cpu")
    first = predict_paths(trained_run, [src], out, predictor=predictor)
    assert len(first.written) == 1
    (out / "a.nii.gz").write_bytes(b"sentinel")
    second = predict_paths(trained_run, [src], out, predictor=predictor)
    assert second.skipped == [out / "a.nii.gz"] and (out / "a.nii.gz").read_bytes() == b"sentinel"
    third = predict_paths(trained_run, [src], out, overwrite=True, predictor=predictor)
    assert third.written == [out / "a.nii.gz"] and nib.load(out / "a.nii.gz").shape == image.shape
    assert not any(p.name.startswith(".") for p in out.iterdir()), "temporary files left behind"


def test_two_inputs_with_one_output_name_are_refused_before_any_work(trained_run, tmp_path):
    image, _, affine = _asymmetric_phantom()
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    a = _save(tmp_path / "x" / "case.nii.gz", image, affine)
    b = _save(tmp_path / "y" / "case.nii", image, affine)
    with pytest.raises(OutputError, match="written twice"):
        predict_paths(trained_run, [a, b], tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
