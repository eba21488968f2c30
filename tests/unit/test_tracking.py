"""MLflow and W&B tracking, offline: the run's config, metrics per epoch, the bundle and config, inside the run
folder; a resumed run continues the same tracker run."""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path

import pytest

from medseg.config import ExperimentConfig
from medseg.errors import ConfigError
from medseg.models.bundle import load_bundle
from medseg.training.tracking import (
    RUN_ID_FILE,
    WANDB_RUN_ID_FILE,
    WandbCallback,
    default_tracking_uri,
    flatten,
    wandb_mode,
)
from medseg.training.trainer import train
from tests.conftest import tiny_config


def child_processes() -> list[str]:
    """Commands of this process's live (not zombie) children, from /proc."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        if int(fields[1]) == os.getpid() and fields[0] != "Z":
            out.append(stat.with_name("cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
    return out


def test_flatten_names_every_config_key():
    flat = flatten({"train": {"epochs": 3, "patch_size": [32, 32, 16]}, "seed": 0, "infer": {"roi_size": None}})
    assert flat == {"train.epochs": "3", "train.patch_size": "[32, 32, 16]", "seed": "0", "infer.roi_size": "None"}


def test_a_run_is_tracked_offline_in_its_folder(phantom_manifest, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow", reason="MLflow is the optional extra medseg[mlflow]")
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


def wandb_records(path: Path) -> list:
    """The records of an offline W&B run file (``run-<id>.wandb``): a LevelDB-style log of protobuf records
    (32 KiB blocks, 7-byte chunk headers), read here without W&B's servers or its CLI."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        left = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # a block's zero-filled tail
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: one record is complete
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def logged_epochs(records: list) -> dict[int, dict]:
    """``{step: {metric: value}}`` from the history records of an offline W&B run."""
    out: dict[int, dict] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
            out[int(items.pop("_step"))] = {k: v for k, v in items.items() if not k.startswith("_")}
    return out


def test_a_run_is_tracked_in_wandb_offline_in_its_folder(phantom_manifest, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="W&B is the optional extra medseg[wandb]")
    monkeypatch.chdir(tmp_path)  # nothing may land in the current folder
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the default: offline
    monkeypatch.setenv("WANDB_API_KEY", "")  # no credentials: offline must not need any
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # and would fail fast if it tried the network
    run_dir = tmp_path / "run"
    config = tiny_config(phantom_manifest, run_dir, epochs=1, iterations_per_epoch=1, choose_postprocessing=False,
                         trackers=["wandb"])
    train(config, device="cpu")
    run_id = (run_dir / WANDB_RUN_ID_FILE).read_text().strip()
    config.train.epochs = 2
    train(config, resume=True, device="cpu")

    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    if Path("/proc/self/stat").is_file():
        assert child_processes() == []  # wandb-core exited with the run
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(p.name.endswith(f"-{run_id}") for p in offline)  # resumed: the same run id
    history = json.loads((run_dir / "history.json").read_text())
    logged: dict[int, dict] = {}
    for folder in offline:
        records = wandb_records(folder / f"run-{run_id}.wandb")
        logged.update(logged_epochs(records))
        run_record = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        assert run_record.run_id == run_id and run_record.project == "tiny3d" and run_record.display_name == "run"
        logged_config = {i.key: json.loads(i.value_json) for i in run_record.config.update if i.key != "_wandb"}
        expected_config = config.model_dump(mode="json")
        del logged_config["train"]["epochs"], expected_config["train"]["epochs"]  # 1, then 2 when resumed
        assert logged_config == expected_config
        files = {p.relative_to(folder / "files").as_posix() for p in (folder / "files").rglob("*") if p.is_file()}
        assert {"medseg/best.pt", "medseg/config.yaml", "medseg/history.json"} <= files
    assert sorted(logged) == [r["epoch"] for r in history] == [1, 2]
    for record in history:
        expected = {k: v for k, v in record.items() if k != "epoch" and v == v}  # NaN (class absent) is not logged
        assert logged[record["epoch"]] == pytest.approx(expected)
    assert {"loss", "lr", "val_dice", "val_dice_lung"} <= set(logged[2])
    saved = offline[-1] / "files" / "medseg" / "best.pt"
    assert load_bundle(saved).spec.provenance.weights_sha256 == load_bundle(run_dir).spec.provenance.weights_sha256


def test_wandb_mode_honours_the_environment(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_MODE", "Online")
    assert wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "cloud")
    with pytest.raises(ConfigError, match="WANDB_MODE"):
        wandb_mode()


def test_wandb_listed_but_not_installed_is_a_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    with pytest.raises(ConfigError, match=r"medseg\[wandb\]"):
        WandbCallback().on_fit_start(None)  # the import is checked before the trainer is looked at


def test_wandb_disabled_by_the_environment_writes_nothing(phantom_manifest, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="W&B is the optional extra medseg[wandb]")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    run_dir = tmp_path / "run"
    train(tiny_config(phantom_manifest, run_dir, epochs=1, iterations_per_epoch=1, choose_postprocessing=False,
                      trackers=["wandb"]), device="cpu")
    assert (run_dir / "best.pt").is_file()
    assert not (run_dir / "wandb").exists() and not (run_dir / WANDB_RUN_ID_FILE).exists()
