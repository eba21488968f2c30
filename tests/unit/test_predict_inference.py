"""The predictor's own arithmetic: test-time mirroring undoes its flips, keep-largest-component runs at
predict time, and an ensemble averages its members and keeps only the components every member chose."""

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn

from medseg.inference.predictor import Predictor
from medseg.models.bundle import ModelBundle, load_bundle

CPU = torch.device("cpu")


class PositionDependent(nn.Module):
    """Logits that depend on where a voxel is, so a flipped input gives a differently flipped output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d, h, w = x.shape[2:]
        ramp = (torch.linspace(0, 1, d)[:, None, None] + 2 * torch.linspace(0, 1, h)[None, :, None]
                + 3 * torch.linspace(0, 1, w)[None, None, :]).expand_as(x)
        return torch.cat([x * ramp, -x, ramp - 3], dim=1)


class Pointwise(nn.Module):
    """A 1x1x1 "network": each voxel's logits from its own intensity only, so it commutes with flips."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([0.5 - x, x - 0.5, torch.full_like(x, -10.0)], dim=1) * 20


@pytest.fixture(scope="module")
def trained(trained_run):
    return load_bundle(trained_run)


def _image(trained, seed=0) -> torch.Tensor:
    """A random batch of one patch (1, 1, *patch): one sliding window covers it exactly."""
    return torch.rand((1, 1, *trained.inference.roi_size), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("axes", [[0, 1, 2], [1]])
def test_mirrored_probabilities_are_the_mean_of_flipped_back_predictions(trained, axes):
    model = PositionDependent()
    predictor = Predictor(model, trained, CPU, mirror_axes=axes)
    image = _image(trained)
    expected = torch.softmax(model(image), dim=1)
    for axis in axes:
        flip = [axis + 2]
        expected += torch.flip(torch.softmax(model(torch.flip(image, flip)), dim=1), flip)
    expected /= 1 + len(axes)
    torch.testing.assert_close(predictor.probabilities(image), expected, atol=1e-5, rtol=1e-5)


def test_mirroring_a_flip_equivariant_model_changes_nothing(trained):
    plain = Predictor(Pointwise(), trained, CPU, mirror_axes=[])
    mirrored = Predictor(Pointwise(), trained, CPU, mirror_axes=[0, 1, 2])
    image = _image(trained, seed=1)
    torch.testing.assert_close(mirrored.probabilities(image), plain.probabilities(image), atol=1e-6, rtol=1e-6)


def _two_blobs(trained) -> nib.Nifti1Image:
    """A scan on the model's own grid (RAS, its spacing) with two separate bright cubes, 27 and 8 voxels."""
    spacing = trained.spec.preprocessing.spacing
    data = np.full(trained.inference.roi_size, -1000.0, dtype=np.float32)
    data[4:7, 4:7, 4:7] = 100.0
    data[20:22, 20:22, 10:12] = 100.0
    return nib.Nifti1Image(data, np.diag([*spacing, 1.0]))


@pytest.mark.parametrize("keep, components", [([1], 1), ([], 2), ([2], 2)])
def test_keep_largest_component_is_applied_at_predict_time(trained, keep, components):
    predictor = Predictor(Pointwise(), _with_keep(trained, keep), CPU, mirror_axes=[])
    mask = np.asarray(predictor.predict_image(_two_blobs(trained)).dataobj)
    labelled, found = ndimage.label(mask == 1)
    assert found == components
    assert (mask == 1).sum() == (27 if components == 1 else 35)


def _with_keep(trained: ModelBundle, keep: list[int], weights=None) -> ModelBundle:
    """The trained bundle with its own keep-largest choice (and other weights, checksum restamped)."""
    spec = trained.spec.model_copy(update={"inference": trained.inference.model_copy(update={"keep_largest_component": keep})})
    return ModelBundle(spec, trained.weights).with_weights(weights if weights is not None else trained.weights)


def _member(trained, tmp_path, name, keep, seed=None):
    """A model file of the trained run with its own keep-largest choice (and weights nudged by ``seed``)."""
    state = {k: v.clone() for k, v in trained.weights.items()}
    if seed is not None:
        gen = torch.Generator().manual_seed(seed)
        state = {k: v + 0.3 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
                 for k, v in state.items()}
    return _with_keep(trained, keep, state).save(tmp_path / f"{name}.pt")


@pytest.mark.parametrize("choices, kept", [(([1, 2], [1]), [1]), (([1], [1, 2]), [1]), (([1, 2], [2, 1]), [1, 2]),
                                           (([2], [1]), []), (([1, 2], []), [])])
def test_an_ensemble_keeps_the_largest_component_only_of_classes_every_member_chose(trained, tmp_path, choices, kept):
    paths = [_member(trained, tmp_path, f"m{i}", keep) for i, keep in enumerate(choices)]
    assert Predictor.from_checkpoint(paths, "cpu").settings.keep_largest_component == kept


def test_an_ensemble_averages_its_members_probabilities(trained, tmp_path):
    a = _member(trained, tmp_path, "a", [1])
    b = _member(trained, tmp_path, "b", [1], seed=7)
    image = _image(trained, seed=2)
    pa = Predictor.from_checkpoint(a, "cpu", mirror=False).probabilities(image)
    pb = Predictor.from_checkpoint(b, "cpu", mirror=False).probabilities(image)
    assert (pa - pb).abs().max() > 0.05, "the members must disagree for the test to mean anything"
    both = Predictor.from_checkpoint([a, b], "cpu", mirror=False).probabilities(image)
    torch.testing.assert_close(both, (pa + pb) / 2, atol=1e-5, rtol=1e-5)
