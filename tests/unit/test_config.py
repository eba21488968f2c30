"""The experiment config: one schema, errors that name the key and the file, shipped configs by name."""

from pathlib import Path

import pytest

from medseg.config import available_configs, dump_config, load_config, resolve_config_path
from medseg.errors import ConfigError

MINIMAL = "name: t\ndata: {manifest: m.json}\n"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def test_minimal_config_gets_defaults_and_resolves_manifest_beside_the_file(tmp_path):
    config = load_config(write(tmp_path, MINIMAL))
    assert config.data.manifest == (tmp_path / "m.json").resolve()
    assert config.model.spatial_dims == 3 and config.loss.name == "dice_ce"
    assert config.roi_size == config.train.patch_size


def test_unknown_key_is_an_error_naming_the_key_and_file(tmp_path):
    path = write(tmp_path, MINIMAL + "train: {epochz: 3}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "train.epochz" in str(err.value) and "unknown key" in str(err.value) and str(path) in str(err.value)


def test_wrong_type_is_an_error_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.batch_size"):
        load_config(write(tmp_path, MINIMAL + "train: {batch_size: many}\n"))


def test_patch_size_must_match_spatial_dims(tmp_path):
    with pytest.raises(ConfigError, match="patch_size has 3 entries but model.spatial_dims is 2"):
        load_config(write(tmp_path, MINIMAL + "model: {spatial_dims: 2}\ntrain: {patch_size: [64, 64, 32]}\n"))


def test_invalid_yaml_names_the_file(tmp_path):
    path = write(tmp_path, "name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_bare_name_finds_a_shipped_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_config_path("ct_lung.yaml").name == "ct_lung.yaml"
    assert resolve_config_path("demo").name == "demo.yaml"
    assert load_config("ct_lung.yaml").name == "ct_lung"


def test_missing_config_lists_the_shipped_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_config("nope.yaml")
    assert "config not found" in str(err.value)
    for name in available_configs():
        assert name in str(err.value)
    assert "ct_lung.yaml" in available_configs() and "demo.yaml" in available_configs()


def test_dumped_config_loads_back_identically(tmp_path):
    config = load_config(write(tmp_path, MINIMAL))
    again = load_config(write(tmp_path, dump_config(config)))
    assert again == config
