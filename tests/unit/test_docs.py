"""The docs stay true to the code: every config key is documented in docs/config.md."""

from pydantic import BaseModel

from medseg.config import ExperimentConfig
from tests.conftest import REPO_ROOT


def _keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys += _keys(annotation, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def test_every_config_key_is_documented():
    text = (REPO_ROOT / "docs" / "config.md").read_text()
    def documented(key: str) -> bool:
        parts = key.split(".")
        # a table names a key by its last one or two parts (`epochs`, `intensity.kind`)
        return any(f"`{'.'.join(parts[-n:])}`" in text for n in (1, 2))

    missing = [k for k in _keys(ExperimentConfig) if not documented(k)]
    assert not missing, f"undocumented config keys: {missing}"
