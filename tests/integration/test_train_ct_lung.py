"""The shipped ct_lung config and manifest train on the real chest CT (one short step, not accuracy)."""

import nibabel as nib
import numpy as np

from medseg.config import ModelConfig, load_config
from medseg.inference.runner import predict_paths
from medseg.training.trainer import train


def test_ct_lung_config_trains_and_predicts_on_the_real_ct(shared_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config("ct_lung.yaml")  # bare name: the shipped config, manifest beside it
    config.train.epochs = 1
    config.train.iterations_per_epoch = 1
    config.train.batch_size = 1
    config.train.samples_per_volume = 1
    config.train.patch_size = [64, 64, 16]
    config.model = ModelConfig(**{**config.model.model_dump(), "channels": [4, 8, 16], "strides": [2, 2]})
    config.preprocessing.spacing = (2.0, 2.0, 5.0)
    result = train(config, device="cpu")
    assert result.run_dir == tmp_path / "runs" / "ct_lung"
    assert np.isfinite(result.history[0]["loss"]) and "val_dice_lesion" in result.history[0]

    ct_path = shared_data / "lung_ct" / "lung1_ct.nii.gz"
    predict_paths(result.run_dir, [ct_path], tmp_path / "masks", device="cpu")
    mask, ct = nib.load(tmp_path / "masks" / "lung1_ct.nii.gz"), nib.load(ct_path)
    assert mask.shape == ct.shape and np.array_equal(mask.affine, ct.affine)
