"""Fast prediction path: the separable scan <-> model grid resampling gives MONAI's geometry and labels,
keep-largest-component matches MONAI's, too-large scans are refused from their header (recorded, batch goes
on), and the read-ahead / background-write pipeline keeps the order, the failures and the claims."""

import csv
import threading

import nibabel as nib
import numpy as np
import pytest
import torch
from monai import transforms as mt
from monai.data import MetaTensor
from torch import nn

import medseg.inference.pipeline as pipeline
import medseg.inference.runner as runner
from medseg.atomic import claim
from medseg.data.transforms import IMAGE, preprocessing
from medseg.inference.memory import MAX_MEMORY_ENV, nifti_header_size
from medseg.inference.predictor import Predictor, keep_largest_components
from medseg.inference.resampling import GridPlan
from medseg.inference.runner import predict_paths
from medseg.models.bundle import ModelBundle
from tests.conftest import tiny_config

CPU = torch.device("cpu")
SPACING = (1.1, 0.9, 1.5)


def _rotation(deg: float) -> np.ndarray:
    a = np.deg2rad(deg)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    b = np.deg2rad(deg / 2)
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


def _affine(kind: str) -> np.ndarray:
    """Scan affines: axis-aligned RAS, LPS (DICOM-like), permuted axes, and oblique (rotated 20 degrees)."""
    zooms = np.diag([0.7, 0.8, 2.0])
    linear = {"ras": np.eye(3), "lps": np.diag([-1.0, -1.0, 1.0]),
              "permuted": np.array([[0, 0, 1.0], [-1.0, 0, 0], [0, 1.0, 0]]), "oblique": _rotation(20)}[kind]
    affine = np.eye(4)
    affine[:3, :3] = linear @ zooms
    affine[:3, 3] = [13.3, -20.1, 7.7]
    return affine


def _meta(affine: np.ndarray, shape) -> dict:
    return {"affine": affine.copy(), "original_affine": affine.copy(), "spatial_shape": np.asarray(shape),
            "original_channel_dim": float("nan"), "space": "RAS"}


@pytest.mark.parametrize("kind", ["ras", "lps", "permuted", "oblique"])
def test_separable_resampling_matches_monai_spacingd_and_invertd(kind):
    rng = np.random.default_rng(0)
    array = rng.normal(size=(37, 29, 11)).astype(np.float32)
    affine = _affine(kind)
    pre = tiny_config("m.json", "out").preprocessing.model_copy(update={"spacing": list(SPACING)})
    transform = preprocessing(pre, keys=(IMAGE,), load=False)
    data = transform({IMAGE: MetaTensor(array, meta=_meta(affine, array.shape))})
    plan = GridPlan.for_scan(affine, array.shape, "RAS", SPACING)
    assert plan is not None, "Orientationd + Spacingd always give a per-axis voxel map"

    # Forward: the model grid's shape, affine and values are MONAI's (intensity windowing applied to ours).
    ours = Predictor.__new__(Predictor)
    ours.intensity = mt.Compose(transform.transforms[-1:])
    model_image = ours.intensity({IMAGE: plan.scan_to_model(array).unsqueeze(0)})[IMAGE]
    assert tuple(plan.model_shape) == tuple(data[IMAGE].shape[1:])
    np.testing.assert_allclose(plan.model_affine, data[IMAGE].affine.numpy(), atol=1e-6)
    np.testing.assert_allclose(np.asarray(model_image), data[IMAGE].numpy(), atol=1e-5)

    # Backward: labels on the scan grid agree with MONAI's Invertd + argmax.
    probs = torch.softmax(torch.randn((3, *plan.model_shape), generator=torch.Generator().manual_seed(1)), 0)
    data["pred"] = MetaTensor(probs, meta=dict(data[IMAGE].meta))
    inverted = mt.Invertd("pred", transform=transform, orig_keys=IMAGE, nearest_interp=False)(data)["pred"]
    expected = torch.argmax(inverted, dim=0).numpy()
    labels = plan.oriented_to_scan(plan.labels_on_scan(probs))
    assert labels.shape == array.shape
    assert (labels == expected).mean() >= 0.999
    # float16 probabilities (what prediction keeps on the CPU) change only near-ties.
    assert (plan.oriented_to_scan(plan.labels_on_scan(probs.half())) == expected).mean() >= 0.999


def test_slabs_do_not_change_the_result(monkeypatch):
    array = np.random.default_rng(2).normal(size=(20, 18, 30)).astype(np.float32)
    plan = GridPlan.for_scan(_affine("lps"), array.shape, "RAS", SPACING)
    probs = torch.rand((2, *plan.model_shape), generator=torch.Generator().manual_seed(3))
    whole = plan.scan_to_model(array), plan.labels_on_scan(probs)
    monkeypatch.setattr("medseg.inference.resampling.SLAB_BYTES", 4 * 20 * 18 * 3)  # 3 slices per slab
    sliced = plan.scan_to_model(array), plan.labels_on_scan(probs)
    torch.testing.assert_close(sliced[0], whole[0], atol=0, rtol=0)
    np.testing.assert_array_equal(sliced[1], whole[1])


class Smooth(nn.Module):
    """Logits that change smoothly with intensity and position: boundaries fall between voxels, not on ties."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[2]
        ramp = torch.linspace(-1, 1, d)[:, None, None].expand_as(x[:, :1])
        return torch.cat([x, 1 - x, 0.3 + 0.4 * ramp], dim=1) * 4


def _bundle() -> ModelBundle:
    config = tiny_config("m.json", "out")
    return ModelBundle.from_config(config, {0: "background", 1: "organ", 2: "lesion"}, 1)


@pytest.mark.parametrize("kind", ["lps", "oblique"])
def test_predict_image_fast_path_gives_monai_labels_and_the_scan_header(kind):
    rng = np.random.default_rng(4)
    z, y, x = np.mgrid[:40, :36, :14]
    array = (1000 * np.sin(z / 6.0) * np.cos(y / 5.0) - 300 + rng.normal(0, 30, z.shape)).astype(np.int16)
    scan = nib.Nifti1Image(array, _affine(kind))
    predictor = Predictor(Smooth(), _bundle(), CPU)
    fast = predictor.predict_image(scan)
    predictor.separable = False
    reference = predictor.predict_image(scan)
    assert (np.asarray(fast.dataobj) == np.asarray(reference.dataobj)).mean() >= 0.999
    assert len(np.unique(np.asarray(fast.dataobj))) >= 2, "the test scan must produce several classes"
    assert fast.shape == scan.shape and fast.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(fast.affine, scan.header.get_best_affine())  # as stored in the file
    for field in ("qform_code", "sform_code", "srow_x", "srow_y", "srow_z", "pixdim"):
        np.testing.assert_array_equal(fast.header[field], scan.header[field])


def test_a_voxel_map_that_is_not_per_axis_takes_the_monai_path(monkeypatch):
    scan = nib.Nifti1Image(np.random.default_rng(5).normal(0, 500, (30, 30, 10)).astype(np.float32), _affine("lps"))
    predictor = Predictor(Smooth(), _bundle(), CPU)
    called = []
    original = Predictor._labels_monai
    monkeypatch.setattr(GridPlan, "for_scan", classmethod(lambda cls, *a, **k: None))
    monkeypatch.setattr(Predictor, "_labels_monai", lambda self, *a: called.append(1) or original(self, *a))
    predictor.predict_image(scan)
    assert called == [1]


def test_keep_largest_components_matches_monai():
    rng = np.random.default_rng(6)
    labels = (rng.random((24, 24, 12)) < 0.08).astype(np.uint8) * rng.integers(1, 3, (24, 24, 12)).astype(np.uint8)
    labels[2:9, 2:9, 2:6] = 1
    labels[12:20, 12:18, 5:10] = 2
    keep = mt.KeepLargestConnectedComponent(applied_labels=[1, 2], is_onehot=False, independent=True)
    expected = np.asarray(keep(labels[None].copy())[0])
    ours = labels.copy()
    keep_largest_components(ours, [1, 2])
    np.testing.assert_array_equal(ours, expected)


# --- memory: refused from the header, recorded, the batch goes on ----------------------------------

def _header_only_scan(path, shape=(512, 512, 1500)):
    """A NIfTI file whose header says ``shape`` int16 but that holds no voxels: reading it would fail."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.int16)
    header.set_zooms((0.7, 0.7, 1.0))
    header.set_sform(np.diag([-0.7, -0.7, 1.0, 1.0]), code=1)
    with open(path, "wb") as f:
        header.write_to(f)
        f.write(b"\0" * 4)  # pad to vox_offset 352: the voxel data is missing
    return path


def _small_scan(path, seed=0):
    array = np.random.default_rng(seed).normal(-300, 400, (30, 28, 10)).astype(np.int16)
    nib.save(nib.Nifti1Image(array, _affine("lps")), path)
    return path


def test_the_size_of_a_512x512x1500_ct_comes_from_its_header_without_reading_it(tmp_path):
    path = _header_only_scan(tmp_path / "big.nii")
    size = nifti_header_size(path, "RAS", (0.8, 0.8, 2.5), classes=2)
    assert size is not None and size.voxels == 512 * 512 * 1500 and size.itemsize == 2
    assert size.model_voxels == pytest.approx(size.voxels * 0.7 * 0.7 * 1.0 / (0.8 * 0.8 * 2.5), rel=0.02)
    assert size.peak_bytes > size.scan_bytes


def test_a_scan_too_large_for_the_memory_limit_is_refused_recorded_and_the_batch_goes_on(tmp_path, monkeypatch):
    inputs = tmp_path / "in"
    inputs.mkdir()
    _small_scan(inputs / "a_small.nii.gz")
    _header_only_scan(inputs / "b_big.nii")
    _small_scan(inputs / "c_small.nii.gz", seed=1)
    rss_gib = int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**30
    monkeypatch.setenv(MAX_MEMORY_ENV, f"{rss_gib + 1.0:.3f}")  # 1 GiB above what the process uses now
    summary = predict_paths(None, [inputs], tmp_path / "out", predictor=Predictor(Smooth(), _bundle(), CPU))
    assert sorted(p.name for p in summary.written) == ["a_small.nii.gz", "c_small.nii.gz"]
    [failure] = summary.failed
    assert failure.error == "ScanTooLargeError"  # not a read error: the missing voxels were never read
    assert "(512, 512, 1500)" in failure.message and "GiB" in failure.message and MAX_MEMORY_ENV in failure.message
    with open(tmp_path / "out" / "failures.csv", newline="") as f:
        assert [row["mask"] for row in csv.DictReader(f)] == ["b_big.nii.gz"]


# --- read-ahead and background writing ---------------------------------------------------------------

def test_read_ahead_and_background_writes_keep_order_failures_and_claims(tmp_path, monkeypatch):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i, name in enumerate(["a", "b", "d", "e"]):
        _small_scan(inputs / f"{name}.nii.gz", seed=i)
    (inputs / "c.nii.gz").write_bytes(b"not a nifti")
    out = tmp_path / "out"
    out.mkdir()
    threads: dict[str, set[str]] = {"read": set(), "write": set()}
    load, write = pipeline.load_scan, pipeline.write_outputs
    monkeypatch.setattr(pipeline, "load_scan", lambda s, **k: threads["read"].add(threading.current_thread().name)
                        or load(s, **k))
    monkeypatch.setattr(pipeline, "write_outputs", lambda *a: threads["write"].add(threading.current_thread().name)
                        or write(*a))
    with claim(out / "d.nii.gz"):  # another run is writing d
        summary = predict_paths(None, [inputs], out, predictor=Predictor(Smooth(), _bundle(), CPU))
    assert [p.name for p in summary.written] == ["a.nii.gz", "b.nii.gz", "e.nii.gz"]
    assert [p.name for p in summary.claimed] == ["d.nii.gz"]
    assert [(f.path.name, f.error) for f in summary.failed] == [("c.nii.gz", "ScanError")]
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["a.nii.gz", "b.nii.gz", "e.nii.gz"]
    assert any(name.startswith("medseg-read") for name in threads["read"]), threads
    assert all(name.startswith("medseg-write") for name in threads["write"]), threads
    for name in ["a", "b", "e"]:
        mask = nib.load(out / f"{name}.nii.gz")
        np.testing.assert_array_equal(mask.affine, nib.load(inputs / f"{name}.nii.gz").affine)


def test_cli_max_memory_gib_reaches_the_batch(tmp_path, monkeypatch):
    from medseg.cli import main
    from medseg.inference.runner import PredictSummary

    seen = {}

    def fake_predict_paths(**kwargs):
        seen.update(kwargs)
        return PredictSummary(tmp_path)

    monkeypatch.setattr(runner, "predict_paths", fake_predict_paths)
    assert main(["predict", "--model", str(tmp_path / "m"), "--input", str(tmp_path), "--output", str(tmp_path / "o"),
                 "--max-memory-gib", "3.5"]) == 0
    assert seen["max_memory_gib"] == 3.5


def test_two_classes_take_the_difference_shortcut_with_the_same_labels():
    """A binary model's labels come from one interpolated difference p1 - p0; they equal the per-class
    comparison (a third, all-zero class sends the same probabilities down that path), and the
    probabilities passed in are left as they were."""
    plan = GridPlan.for_scan(_affine("oblique"), (40, 36, 14), "RAS", SPACING)
    logits = torch.randn((2, *plan.model_shape), generator=torch.Generator().manual_seed(7))
    probs = torch.softmax(torch.nn.functional.avg_pool3d(logits[None], 3, 1, 1)[0] * 4, 0)
    before = probs.clone()
    binary = plan.labels_on_scan(probs)
    torch.testing.assert_close(probs, before, atol=0, rtol=0)
    per_class = plan.labels_on_scan(torch.cat([probs, torch.zeros_like(probs[:1])]))
    assert 0.05 < binary.mean() < 0.95, "the test map must hold both classes"
    assert (binary == per_class).mean() >= 0.9999
