"""What an installed medseg needs besides its code: shipped configs whose manifests resolve, and a --help
that shows examples and defaults. (scripts/check_wheel checks the same from a built wheel.)"""

from __future__ import annotations

from importlib import resources

import pytest

from medseg.cli import main
from medseg.config import available_configs, load_config

# demo.yaml's manifest is written by `medseg demo` (phantoms generated into its output folder).
MANIFEST_FILLED_IN_AT_RUN_TIME = {"demo.yaml"}


@pytest.mark.parametrize("name", available_configs())
def test_every_shipped_config_loads_by_name_and_its_manifest_resolves(name):
    config = load_config(name)
    if name not in MANIFEST_FILLED_IN_AT_RUN_TIME:
        assert config.data.manifest.is_file(), f"{name}: manifest {config.data.manifest} not found"


def test_shipped_configs_and_manifests_are_package_data():
    package = resources.files("medseg")
    assert {"ct_lung.yaml", "demo.yaml", "mr_hippocampus.yaml"} <= {p.name for p in (package / "configs").iterdir()}
    assert {"lung_ct.json", "hippocampus.json"} <= {p.name for p in (package / "data_manifests").iterdir()}


def test_help_shows_examples_and_each_verbs_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for example in ("medseg demo", "medseg train ct_lung.yaml",
                    "medseg predict --model runs/ct_lung --input scans/ --output masks/", "medseg evaluate --pred"):
        assert example in text
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps to the terminal's width
    assert "(default: 16)" in text and "(default: medseg_demo)" in text
    assert "(default: None)" not in text and "(default: False)" not in text
