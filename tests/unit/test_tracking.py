"""MLflow tracking, offline: the run's config as parameters, metrics per epoch, the bundle and config as
artifacts, in an SQLite store inside the run folder; a resumed run continues the same MLflow run."""

from __future__ import annotations

import pytest

from medseg.config import ExperimentConfig
from medseg.models.bundle import load_bundle
from medseg.training.tracking import RUN_ID_FILE, default_tracking_uri, flatten
from medseg.training.trainer import train
from tests.conftest import tiny_config

mlflow = pytest.importorskip("mlflow", reason="MLflow is the optional extra medseg[mlflow]")


def test_flatten_names_every_config_key():
    flat = flatten({"train": {"epochs": 3, "patch_size": [32, 32, 16]}, "seed": 0, "infer": {"roi_size": None}})
    assert flat == {"train.epochs": "3", "train.patch_size": "[32, 32, 16]", "seed": "0", "infer.roi_size": "None"}


def test_a_run_is_tracked_offline_in_its_folder(phantom_manifest, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may land in the current folder (MLflow's default ./mlruns, ./mlartifacts)
    run_dir = tmp_path / "run"
    config = tiny_config(phantom_manifest, run_dir, epochs=1, iterations_per_epoch=1, choose_postprocessing=False,
                         trackers=["tensorboard", "mlflow"])
    train(config, device="cpu")
    config.train.epochs = 2
    train(config, resume=True, device="cpu")

    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    client = mlflow.MlflowClient(tracking_uri=default_tracking_uri(run_dir))
    runs = client.search_runs([client.get_experiment_by_name("tiny3d").experiment_id])
    assert len(runs) == 1  # the resumed run went on in the same MLflow run
    run = runs[0]
    assert run.info.run_id == (run_dir / RUN_ID_FILE).read_text().strip()
    assert run.info.status == "FINISHED"
    assert run.data.params["train.patch_size"] == "[32, 32, 16]" and run.data.params["model.name"] == "unet"
    assert len(run.data.params) == len(flatten(ExperimentConfig.model_validate(config.model_dump()).model_dump(mode="json")))
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in losses] == [1, 2]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_dice_lung")] == [1, 2]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "history.json", "model"} <= artifacts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "model")] == ["model/best.pt"]
    local = client.download_artifacts(run.info.run_id, "model/best.pt", str(tmp_path / "run" / "download"))
    assert load_bundle(local).spec.provenance.weights_sha256 == load_bundle(run_dir).spec.provenance.weights_sha256
