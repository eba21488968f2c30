"""Planning on real MRI: ten hippocampus cases fingerprint and plan into a config that loads."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from medseg.config import load_config
from medseg.planning import PlanOptions, write_plan

REPO = Path(__file__).resolve().parents[2]


def test_ten_hippocampus_cases_plan_into_a_loadable_config(shared_data, tmp_path):
    manifest = REPO / "data_manifests" / "hippocampus.json"
    config_path, fingerprint_path, _ = write_plan(manifest, tmp_path / "hippo.yaml", max_cases=10, progress=False,
                                                  options=PlanOptions(name="hippo", cuda=False))
    config = load_config(config_path)
    assert config.data.manifest == manifest.resolve()
    assert config.preprocessing.intensity.kind == "zscore"
    assert list(config.preprocessing.spacing) == [1.0, 1.0, 1.0]
    # Cases are about 35 x 50 x 36 voxels (median 36 x 50.5 x 36.5): the patch covers a whole case, rounded
    # up to a multiple of 8, pooled three times.
    assert list(config.train.patch_size) == [40, 56, 40] and len(config.model.strides) == 3
    fingerprint = json.loads(fingerprint_path.read_text())
    assert fingerprint["num_cases"] == 10 and fingerprint["median_shape"] == [36.0, 50.5, 36.5]
    # The fingerprint's per-case counts are the label file's, voxel for voxel.
    first = fingerprint["cases"][0]
    labels = np.asarray(nib.load(shared_data / "hippocampus" / "labels" / f"{first['id']}.nii.gz").dataobj)
    assert first["shape"] == list(labels.shape)
    assert first["class_voxels"] == {str(k): int((labels == k).sum()) for k in (0, 1, 2)}
