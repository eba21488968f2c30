"""Planning on real MRI: ten hippocampus cases fingerprint and plan quickly into a config that loads."""

from __future__ import annotations

import time
from pathlib import Path

from medseg.config import load_config
from medseg.planning import PlanOptions, write_plan

REPO = Path(__file__).resolve().parents[2]


def test_ten_hippocampus_cases_plan_into_a_loadable_config(shared_data, tmp_path):
    manifest = REPO / "data_manifests" / "hippocampus.json"
    # "Quickly" in CPU time of this process, which a machine busy with other work does not inflate
    # (wall time did); under a second here, so the bound catches a slow fingerprint, not a slow machine.
    t0 = time.process_time()
    config_path, fingerprint_path, _ = write_plan(manifest, tmp_path / "hippo.yaml", max_cases=10, progress=False,
                                                  options=PlanOptions(name="hippo", cuda=False))
    assert time.process_time() - t0 < 10
    config = load_config(config_path)
    assert config.data.manifest == manifest.resolve()
    assert config.preprocessing.intensity.kind == "zscore"
    assert list(config.preprocessing.spacing) == [1.0, 1.0, 1.0]
    # Cases are about 35 x 50 x 36 voxels: the patch covers a whole case, pooled three times.
    assert all(30 <= p <= 64 for p in config.train.patch_size) and len(config.model.strides) == 3
    assert fingerprint_path.is_file()
