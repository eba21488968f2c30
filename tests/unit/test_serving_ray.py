"""``medseg serve --ray``: the same API with the jobs on Ray Serve replicas that the autoscaler adds while
the backlog lasts and removes when idle; every mask equals ``medseg predict``'s."""

from __future__ import annotations

import time

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")
ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'medseg[ray]')")
pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'medseg[ray]')")

from fastapi.testclient import TestClient  # noqa: E402

from medseg.data.phantom import PhantomSpec, make_phantom  # noqa: E402
from medseg.inference.runner import predict_paths  # noqa: E402
from medseg.serving.app import create_app  # noqa: E402
from medseg.serving.ray_serve import RayScaling  # noqa: E402
from tests.unit.test_serving import TOKEN, _auth, _post, _same_mask, _settings, model_run  # noqa: E402, F401

#: Big enough that one job takes seconds on one CPU (several sliding windows): a backlog of six outlasts the
#: seconds a second replica takes to start.
SPEC = PhantomSpec(shape=(48, 48, 32), spacing=(4.0, 4.0, 5.0), noise_hu=15.0)


def test_ray_replicas_scale_up_with_the_backlog_and_down_when_idle(model_run, tmp_path):  # noqa: F811
    scans = tmp_path / "scans"
    scans.mkdir()
    for seed in range(6):
        image, _, affine, _ = make_phantom(np.random.default_rng(20 + seed), SPEC)
        nib.save(nib.Nifti1Image(image.astype(np.float32), affine), scans / f"scan{seed}.nii.gz")
    predict_paths(model_run, [scans], tmp_path / "predicted", device="cpu")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        scaling = RayScaling(address="auto", min_replicas=1, max_replicas=2, cpus_per_replica=1,
                             upscale_delay_s=1.0, downscale_delay_s=5.0, look_back_period_s=2.0,
                             metrics_interval_s=0.5)
        settings = _settings(model_run, tmp_path / "data", ray=scaling, max_upload_bytes=64 * 1024 * 1024)
        with TestClient(create_app(settings)) as client:
            assert client.get("/readyz").json()["replicas"] == 1  # min_replicas, model loaded
            jobs = {}
            for path in sorted(scans.iterdir()):
                r = _post(client, path.read_bytes())
                assert r.status_code == 202, r.text
                jobs[r.json()["job_id"]] = tmp_path / "predicted" / path.name
            seen, deadline = [], time.monotonic() + 300
            while time.monotonic() < deadline:
                states = [client.get(f"/v1/jobs/{j}", headers=_auth()).json()["status"] for j in jobs]
                seen.append(client.get("/readyz").json()["replicas"])
                if all(s in ("done", "failed") for s in states):
                    break
                time.sleep(0.5)
            assert states == ["done"] * len(jobs), states
            assert max(seen) == 2, seen  # the backlog brought a second replica
            for job, reference in jobs.items():
                _same_mask(client.get(f"/v1/jobs/{job}/mask", headers=_auth()).content, reference, tmp_path)
            # Idle: the extra replica goes (its pool leaves the replica table), back to min_replicas.
            deadline = time.monotonic() + 120
            while client.get("/readyz").json()["replicas"] > 1 and time.monotonic() < deadline:
                time.sleep(0.5)
            assert client.get("/readyz").json()["replicas"] == 1
            assert "medseg_replicas 1.0" in client.get("/metrics").text
    finally:
        from ray import serve

        serve.shutdown()  # stops this process's handles too, so none outlives the cluster
        ray.shutdown()
