"""The experiment config: one schema, errors that name the key and the file, shipped configs by name."""

from pathlib import Path

import pytest

from medseg.cli import main
from medseg.config import (
    available_configs,
    config_from_dict,
    dump_config,
    load_config,
    resolve_config_path,
    with_overrides,
)
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
    with pytest.raises(ConfigError, match=r"train\.patch_size: has 3 entries but model\.spatial_dims is 2"):
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


# --- strict types: what the YAML says is what the config holds ------------------------------------


@pytest.mark.parametrize(("section", "text", "key"), [
    ("train", "{epochs: true}", "train.epochs"),      # was 1
    ("train", "{epochs: '3'}", "train.epochs"),       # was 3
    ("train", "{epochs: 3.0}", "train.epochs"),
    ("train", "{amp: 'no'}", "train.amp"),            # was False
    ("train", "{amp: 1}", "train.amp"),
    ("optim", "{lr: '1e-3'}", "optim.lr"),            # was 0.001
    ("optim", "{lr: true}", "optim.lr"),
    ("model", "{spatial_dims: 3.0}", "model.spatial_dims"),
    ("preprocessing", "{spacing: ['1', 1, 1]}", "preprocessing.spacing.0"),
    ("evaluate", "{lesion_classes: [true]}", "evaluate.lesion_classes.0"),
])
def test_wrong_types_are_refused_not_coerced(tmp_path, section, text, key):
    path = write(tmp_path, f"{MINIMAL}{section}: {text}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"  {key}: Input should be" in str(err.value) and str(path) in str(err.value)


def test_unquoted_numbers_paths_and_tuples_still_load(tmp_path):
    config = load_config(write(tmp_path, MINIMAL + "optim: {lr: 1e-3, weight_decay: 3e-05}\nloss: {lambda_dice: 2}\n"
                                         "preprocessing: {spacing: [1, 1, 2.5]}\ntrain: {output_dir: runs/x}\n"))
    assert config.optim.lr == 0.001 and config.optim.weight_decay == 3e-05 and config.loss.lambda_dice == 2.0
    assert config.preprocessing.spacing == (1.0, 1.0, 2.5)
    assert config.train.output_dir == (Path.cwd() / "runs/x").resolve()


def test_json_dump_round_trips_as_checkpoints_store_it(tmp_path):
    config = load_config(write(tmp_path, MINIMAL + "preprocessing: {spacing: [1, 1, 2.5]}\n"
                                         "evaluate: {nsd_tolerance_mm_per_class: {2: 1.5}}\n"))
    dumped = config.model_dump(mode="json")
    assert dumped["evaluate"]["nsd_tolerance_mm_per_class"] == {"2": 1.5}  # JSON keys are strings
    assert config_from_dict(dumped) == config
    assert with_overrides(config, {"train": {"epochs": 2}}).train.epochs == 2


@pytest.mark.parametrize("name", available_configs())
def test_every_shipped_config_loads_and_round_trips(name):
    config = load_config(name)
    assert config_from_dict(config.model_dump(mode="json")) == config


# --- values checked against each other at load ----------------------------------------------------


@pytest.mark.parametrize("code", ["RAS", "LPS", "PIR", "SPL"])
def test_orientation_naming_each_axis_once_loads(tmp_path, code):
    assert load_config(write(tmp_path, MINIMAL + f"preprocessing: {{orientation: {code}}}\n")).preprocessing.orientation == code


@pytest.mark.parametrize("code", ["RRR", "RAR", "ISR"])
def test_orientation_repeating_an_axis_is_refused(tmp_path, code):
    with pytest.raises(ConfigError, match=rf"preprocessing\.orientation: orientation '{code}' must name each axis once"):
        load_config(write(tmp_path, MINIMAL + f"preprocessing: {{orientation: {code}}}\n"))


def test_mirror_axis_beyond_the_spatial_dims_is_refused_at_load(tmp_path):
    with pytest.raises(ConfigError, match=r"infer\.mirror_axes: axes \[7\] are not spatial axes of a 3D model"):
        load_config(write(tmp_path, MINIMAL + "infer: {mirror_axes: [7]}\n"))
    with pytest.raises(ConfigError, match=r"infer\.mirror_axes: axes \[2\] are not spatial axes of a 2D model"):
        load_config(write(tmp_path, MINIMAL + "model: {spatial_dims: 2}\ntrain: {patch_size: [64, 64]}\ninfer: {mirror_axes: [0, 2]}\n"))
    with pytest.raises(ConfigError, match=r"infer\.mirror_axes: values must not repeat"):
        load_config(write(tmp_path, MINIMAL + "infer: {mirror_axes: [0, 0]}\n"))
    assert load_config(write(tmp_path, MINIMAL + "infer: {mirror_axes: [0, 1, 2]}\n")).infer.mirror_axes == [0, 1, 2]


def test_keep_largest_component_of_background_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"infer\.keep_largest_component: classes must be foreground"):
        load_config(write(tmp_path, MINIMAL + "infer: {keep_largest_component: [0, 1]}\n"))


def test_patch_size_not_divisible_by_the_downsampling_names_axis_multiple_and_nearest_sizes(tmp_path):
    # Default unet: 4 levels, 3 strides of 2 -> every side a multiple of 8 (else MONAI fails at the skip concat).
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, MINIMAL + "train: {patch_size: [64, 36, 64]}\n"))
    assert ("train.patch_size: axis 1 is 36, not a positive multiple of 8 (unet downsamples that axis 8x: the product of "
            "model.strides along it); nearest valid sizes: 32 or 40") in str(err.value)


def test_patch_size_multiple_follows_per_axis_strides_and_the_network(tmp_path):
    anisotropic = "model: {channels: [8, 16, 32], strides: [[2, 2, 1], [2, 2, 2]]}\n"
    assert load_config(write(tmp_path, MINIMAL + anisotropic + "train: {patch_size: [64, 64, 10]}\n"))
    with pytest.raises(ConfigError, match=r"infer\.roi_size: axis 2 is 5, not a positive multiple of 2 .* nearest valid sizes: 4 or 6"):
        load_config(write(tmp_path, MINIMAL + anisotropic + "train: {patch_size: [64, 64, 10]}\ninfer: {roi_size: [64, 64, 5]}\n"))
    # segresnet ignores model.strides: one 2x per level below the top of model.channels.
    with pytest.raises(ConfigError, match=r"axis 2 is 6, not a positive multiple of 4 \(segresnet"):
        load_config(write(tmp_path, MINIMAL + "model: {name: segresnet, channels: [8, 16, 32]}\ntrain: {patch_size: [64, 64, 6]}\n"))
    # deeplab resizes its deep features to the input, so any size works.
    assert load_config(write(tmp_path, MINIMAL + "model: {name: deeplab}\ntrain: {patch_size: [33, 35, 7]}\n"))


@pytest.mark.parametrize("name", ["unet", "dynunet", "segresnet"])
def test_the_downsampling_rule_matches_the_built_networks(name):
    import torch

    from medseg.config import ModelConfig
    from medseg.models.registry import build_model

    cfg = ModelConfig(name=name, spatial_dims=2, channels=[4, 8, 16], strides=[[2, 1], [2, 2]], num_res_units=0)
    factors = cfg.downsampling()
    net = build_model(cfg, 1, 2).eval()
    with torch.no_grad():
        assert net(torch.zeros(1, 1, 2 * factors[0], 3 * factors[1])).shape[2:] == (2 * factors[0], 3 * factors[1])
        with pytest.raises(RuntimeError):
            net(torch.zeros(1, 1, 2 * factors[0] + factors[0] // 2, 3 * factors[1]))


MANIFEST = '{"name": "m", "labels": {"0": "background", "1": "lung", "2": "nodule"}, "cases": []}'


def test_lesion_classes_must_be_labels_of_the_manifest(tmp_path):
    (tmp_path / "m.json").write_text(MANIFEST)
    path = write(tmp_path, MINIMAL + "evaluate: {lesion_classes: [2, 3]}\ninfer: {keep_largest_component: [4]}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert str(path) in message and str(tmp_path / "m.json") in message
    assert "evaluate.lesion_classes: classes [3] are not labels of the manifest" in message
    assert "infer.keep_largest_component: classes [4] are not labels" in message
    assert "(labels: 0 background, 1 lung, 2 nodule)" in message
    assert load_config(write(tmp_path, MINIMAL + "evaluate: {lesion_classes: [2]}\n")).evaluate.lesion_classes == [2]


def test_without_the_manifest_the_label_check_waits_for_training(tmp_path):
    # The manifest may not exist yet (demo, a config written before the data); training reports it.
    assert load_config(write(tmp_path, MINIMAL + "evaluate: {lesion_classes: [9]}\n")).evaluate.lesion_classes == [9]


# --- --set on the command line: same parsing, same checks, the flag named as the source --------------


@pytest.fixture
def captured_train(monkeypatch):
    """``medseg train`` with the trainer replaced by a recorder of the config it was given."""
    import medseg.training.trainer as trainer

    seen: list = []

    class Result:
        best_checkpoint, best_dice, best_epoch = "x.pt", 0.0, 0

    monkeypatch.setattr(trainer, "train", lambda config, **_: seen.append(config) or Result())
    return seen


def test_set_overrides_values_as_yaml(tmp_path, captured_train):
    path = write(tmp_path, MINIMAL)
    assert main(["train", str(path), "--set", "train.epochs=3", "--set", "train.amp=false", "--set", "optim.lr=1e-4",
                 "--set", "preprocessing.spacing=[1, 1, 2]", "--set", "model.name=dynunet", "--epochs", "4"]) == 0
    config = captured_train[0]
    assert config.train.epochs == 4  # the shorthand flag wins over --set
    assert config.train.amp is False and config.optim.lr == 1e-4 and config.model.name == "dynunet"
    assert config.preprocessing.spacing == (1.0, 1.0, 2.0)
    assert config.data.manifest == (tmp_path / "m.json").resolve()


def test_set_data_manifest_is_relative_to_the_current_folder(tmp_path, monkeypatch, captured_train):
    path = write(tmp_path, MINIMAL)
    monkeypatch.chdir(tmp_path.parent)
    assert main(["train", str(path), "--set", "data.manifest=other.json", "--output-dir", "out"]) == 0
    assert captured_train[0].data.manifest == (tmp_path.parent / "other.json").resolve()
    assert captured_train[0].train.output_dir == (tmp_path.parent / "out").resolve()


@pytest.mark.parametrize(("item", "expected"), [
    ("train.epochs=true", "--set train.epochs: Input should be a valid integer (got True)"),
    ("train.epochs='3'", "--set train.epochs: Input should be a valid integer (got '3')"),
    ("train.amp='no'", "--set train.amp: Input should be a valid boolean (got 'no')"),
    ("train.epochz=3", "--set train.epochz: unknown key"),
    ("trian.epochs=3", "--set trian: unknown key"),
    ("infer.mirror_axes=[7]", "--set infer.mirror_axes: axes [7] are not spatial axes"),
    ("preprocessing.orientation=RRR", "--set preprocessing.orientation: orientation 'RRR'"),
    ("train.patch_size=[64, 64, 30]", "--set train.patch_size: axis 2 is 30, not a positive multiple of 8"),
    ("evaluate.lesion_classes=[3]", "--set evaluate.lesion_classes: classes [3] are not labels"),
    ("train.epochs", "--set expects SECTION.KEY=VALUE"),
    ("train.epochs=[1", "--set train.epochs: '[1' is not a valid YAML value"),
])
def test_set_is_checked_and_named_as_the_source(tmp_path, capsys, captured_train, item, expected):
    (tmp_path / "m.json").write_text(MANIFEST)
    path = write(tmp_path, MINIMAL + "train: {epochs: 5}\n")
    assert main(["train", str(path), "--set", item]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert not captured_train


def test_file_errors_are_not_blamed_on_set(tmp_path, capsys, captured_train):
    path = write(tmp_path, MINIMAL + "train: {amp: 'no'}\n")
    assert main(["train", str(path), "--set", "train.epochs=3"]) == 2
    err = capsys.readouterr().err
    assert f"{path}: invalid config\n  train.amp:" in err and "--set" not in err


def test_evaluate_takes_set_with_its_config(tmp_path, capsys):
    path = write(tmp_path, MINIMAL)
    args = ["evaluate", "--pred", str(tmp_path), "--labels", str(tmp_path), "--output", str(tmp_path / "out")]
    assert main([*args, "--config", str(path), "--set", "evaluate.connectivity=true"]) == 2
    assert "--set evaluate.connectivity: Input should be 6, 18 or 26" in capsys.readouterr().err
    assert main([*args, "--set", "evaluate.connectivity=6"]) == 2
    assert "--set changes a config: pass --config too" in capsys.readouterr().err


def test_patch_side_below_the_multiple_suggests_the_multiple(tmp_path):
    with pytest.raises(ConfigError, match=r"axis 2 is 0, not a positive multiple of 8 .* nearest valid sizes: 8$"):
        load_config(write(tmp_path, MINIMAL + "train: {patch_size: [64, 64, 0]}\n"))
