"""MLflow as an optional experiment tracker beside TensorBoard (``train.trackers: [tensorboard, mlflow]``).

Offline by default: the store is an SQLite file inside the run folder (``<run>/mlflow.db``) and the
artifacts go to ``<run>/mlartifacts``, so nothing leaves the machine; ``mlflow ui --backend-store-uri
sqlite:///<run>/mlflow.db`` browses it. ``train.mlflow_tracking_uri`` points it at a server instead.
Logged: the whole config as parameters (dotted keys), loss, learning rate and validation Dice per epoch,
and at the end the model bundle (``best.pt``), ``config.yaml`` and ``history.json`` as artifacts. A
resumed run continues the same MLflow run (its id is kept in ``<run>/mlflow_run_id``).

Only rank 0 tracks: the Trainer gives callbacks to the main process only.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from medseg import __version__
from medseg.atomic import write_text_atomic
from medseg.errors import ConfigError
from medseg.training.trainer import Trainer, TrainerCallback, TrainResult

log = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run_id"
MAX_PARAMS_PER_BATCH = 100  # MLflow's limit for one log_batch call


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train": {"epochs": 3}}`` -> ``{"train.epochs": "3"}`` (MLflow parameters are strings)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


def default_tracking_uri(run_dir: Path) -> str:
    """The offline store of a run: an SQLite file in its folder."""
    return f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"


class MLflowCallback(TrainerCallback):
    """Config as parameters, metrics per epoch, bundle and config as artifacts, in an MLflow run."""

    def __init__(self) -> None:
        self.client: Any = None
        self.run_id: str | None = None

    def on_fit_start(self, trainer: Trainer) -> None:
        try:
            from mlflow import MlflowClient
            from mlflow.entities import Param
        except ImportError:
            raise ConfigError("train.trackers names mlflow, which is not installed: pip install 'medseg[mlflow]'") from None
        run_dir, config = trainer.run_dir, trainer.config
        uri = config.train.mlflow_tracking_uri or default_tracking_uri(run_dir)
        self.client = MlflowClient(tracking_uri=uri)
        id_file = run_dir / RUN_ID_FILE
        if trainer.state.epoch >= 0 and id_file.is_file():  # --resume: the same MLflow run goes on
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
            return
        experiment = self.client.get_experiment_by_name(config.name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            # With the default store the artifacts stay in the run folder too (MLflow's default is ./mlartifacts
            # under the current folder).
            location = None if config.train.mlflow_tracking_uri else (run_dir / "mlartifacts").resolve().as_uri()
            experiment_id = self.client.create_experiment(config.name, artifact_location=location)
        tags = {"mlflow.runName": run_dir.name, "medseg.version": __version__}
        if config.train.init_from is not None:
            tags["medseg.init_from"] = str(config.train.init_from)
        self.run_id = self.client.create_run(experiment_id, tags=tags).info.run_id
        write_text_atomic(id_file, self.run_id + "\n")
        params = [Param(k, v) for k, v in flatten(config.model_dump(mode="json")).items()]
        for i in range(0, len(params), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[i:i + MAX_PARAMS_PER_BATCH])
        log.info("MLflow: run %s in %s", self.run_id, uri)

    def on_epoch_end(self, trainer: Trainer, record: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        step = int(record["epoch"])
        metrics = [Metric(k, float(v), now, step) for k, v in record.items()
                   if k != "epoch" and isinstance(v, int | float) and v == v]  # v == v: NaN (class absent) is not logged
        self.client.log_batch(self.run_id, metrics=metrics)

    def on_fit_end(self, trainer: Trainer, result: TrainResult | None) -> None:
        if self.client is None or self.run_id is None:
            return
        run_dir = trainer.run_dir
        if result is not None:
            if result.best_checkpoint.is_file():
                self.client.log_artifact(self.run_id, str(result.best_checkpoint), artifact_path="model")
            for name in ("config.yaml", "history.json", "postprocessing.json"):
                if (run_dir / name).is_file():
                    self.client.log_artifact(self.run_id, str(run_dir / name))
        self.client.set_terminated(self.run_id, status="FINISHED" if result is not None else "KILLED")
