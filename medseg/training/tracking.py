"""MLflow and Weights & Biases as optional experiment trackers beside TensorBoard (``train.trackers``).

MLflow (``train.trackers: [tensorboard, mlflow]``, :class:`MLflowCallback`):

Offline by default: the store is an SQLite file inside the run folder (``<run>/mlflow.db``) and the
artifacts go to ``<run>/mlartifacts``, so nothing leaves the machine; ``mlflow ui --backend-store-uri
sqlite:///<run>/mlflow.db`` browses it. ``train.mlflow_tracking_uri`` points it at a server instead.
Logged: the whole config as parameters (dotted keys), loss, learning rate and validation Dice per epoch,
and at the end the model bundle (``best.pt``), ``config.yaml`` and ``history.json`` as artifacts. A
resumed run continues the same MLflow run (its id is kept in ``<run>/mlflow_run_id``).

W&B (``train.trackers: [tensorboard, wandb]``, :class:`WandbCallback`): offline by default too, the run
lands in ``<run>/wandb/offline-run-*`` and ``wandb sync`` uploads it later; an explicit ``WANDB_MODE``
(``online``/``offline``/``disabled``) wins. Logged: the whole config, the same metrics per epoch (W&B step =
epoch), and at the end the bundle, ``config.yaml`` and ``history.json`` as run files. A resumed run keeps
its W&B run id (``<run>/wandb_run_id``).

Only rank 0 tracks: the Trainer gives callbacks to the main process only.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

from medseg import __version__
from medseg.atomic import write_text_atomic
from medseg.errors import ConfigError
from medseg.training.loop import TrainerCallback, TrainingRun, TrainResult

log = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run_id"
WANDB_RUN_ID_FILE = "wandb_run_id"
WANDB_MODES = ("online", "offline", "disabled")
WANDB_FILES_PREFIX = "medseg"  # the run's own files under this folder of the W&B run's files
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

    def on_fit_start(self, trainer: TrainingRun) -> None:
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

    def on_epoch_end(self, trainer: TrainingRun, record: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        step = int(record["epoch"])
        metrics = [Metric(k, v, now, step) for k, v in epoch_metrics(record).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def on_fit_end(self, trainer: TrainingRun, result: TrainResult | None) -> None:
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


def epoch_metrics(record: dict) -> dict[str, float]:
    """The numbers of one history record but its epoch, without NaN (the Dice of a class absent from val)."""
    return {k: float(v) for k, v in record.items() if k != "epoch" and isinstance(v, int | float) and v == v}


def wandb_mode() -> str:
    """``WANDB_MODE`` when set (the user asked for it), else offline: nothing leaves the machine by default."""
    mode = os.environ.get("WANDB_MODE", "").strip().lower() or "offline"
    if mode not in WANDB_MODES:
        raise ConfigError(f"WANDB_MODE={mode!r}: expected one of {', '.join(WANDB_MODES)}")
    return mode


def link_or_copy(source: Path, target: Path) -> None:
    """``target`` gets ``source``'s bytes: a hard link (no extra disk), a copy across file systems."""
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


class WandbCallback(TrainerCallback):
    """Config, metrics per epoch, bundle and config as files, in a W&B run (offline in the run folder by default)."""

    def __init__(self) -> None:
        self.run: Any = None

    def on_fit_start(self, trainer: TrainingRun) -> None:
        try:
            import wandb
        except ImportError:
            raise ConfigError("train.trackers names wandb, which is not installed: pip install 'medseg[wandb]'") from None
        run_dir, config = trainer.run_dir, trainer.config
        mode = wandb_mode()
        if mode != "online":
            # wandb-core reports its own errors to W&B unless told not to: nothing leaves the machine offline.
            os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
        id_file = run_dir / WANDB_RUN_ID_FILE
        resuming = trainer.state.epoch >= 0 and id_file.is_file()  # --resume: the same W&B run goes on
        run_id = id_file.read_text().strip() if resuming else secrets.token_hex(6)  # a W&B run id: letters and digits
        settings = wandb.Settings(
            silent=True,  # no banners; our own log line says where the run is
            console="off",  # no stdout/stderr capture: tqdm and logs stay as they are
            x_disable_stats=True,  # no system-metrics sampler competing for the CPU
            x_disable_machine_info=True,
            disable_git=True, save_code=False, disable_job_creation=True,
        )
        try:
            self.run = wandb.init(
                project=config.train.wandb_project or config.name, name=run_dir.name, id=run_id,
                resume="allow" if resuming else None, dir=str(run_dir), mode=mode,
                config=config.model_dump(mode="json"), settings=settings,
                tags=[f"medseg-{__version__}"],
                notes=f"init_from: {config.train.init_from}" if config.train.init_from else None,
            )
        except wandb.Error as e:  # online without credentials, a project name W&B refuses, ...
            raise ConfigError(f"W&B ({mode}) could not start a run for {run_dir}: {e}") from None
        if mode != "disabled" and not resuming:
            write_text_atomic(id_file, run_id + "\n")
        log.info("W&B: run %s (%s) in %s", run_id, mode, self.run.dir if mode == "offline" else self.run.url)

    def on_epoch_end(self, trainer: TrainingRun, record: dict) -> None:
        self.run.log(epoch_metrics(record), step=int(record["epoch"]))

    def on_fit_end(self, trainer: TrainingRun, result: TrainResult | None) -> None:
        if self.run is None:
            return
        import wandb

        if result is not None and not self.run.disabled:
            files = [result.best_checkpoint] + [trainer.run_dir / n for n in ("config.yaml", "history.json", "postprocessing.json")]
            # Copies (hard links where possible) under files/medseg/ of the W&B run: its own files/config.yaml is
            # W&B's config, and a link out of the run would break when the run folder moves.
            files_dir = Path(self.run.dir)
            for path in files:
                if path.is_file():
                    link_or_copy(path, files_dir / WANDB_FILES_PREFIX / path.name)
                    self.run.save(str(files_dir / WANDB_FILES_PREFIX / path.name), base_path=str(files_dir), policy="now")
        self.run.finish(exit_code=0 if result is not None else 1)
        self.run = None
        if wandb.run is None:  # no other W&B run in this process: stop its wandb-core service with ours
            wandb.teardown()
