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


# --- links: every relative link in README.md and docs/*.md resolves, anchors included -------------------

import re  # noqa: E402

_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _markdown_files():
    return [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]


def _anchors(path) -> set[str]:
    """GitHub's heading anchors of ``path``: lower case, punctuation dropped, spaces to hyphens, repeats -1, -2..."""
    seen: dict[str, int] = {}
    anchors = set()
    for line in _FENCE.sub("", path.read_text()).splitlines():
        if not line.startswith("#"):
            continue
        slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def test_every_relative_link_and_anchor_in_the_docs_resolves():
    broken = []
    for doc in _markdown_files():
        text = _FENCE.sub("", doc.read_text())
        for match in _LINK.finditer(text):
            target = match.group(1) or match.group(2)
            if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked offline
                continue
            file_part, _, anchor = target.partition("#")
            resolved = (doc.parent / file_part).resolve() if file_part else doc
            if not resolved.exists():
                broken.append(f"{doc.relative_to(REPO_ROOT)}: {target} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                broken.append(f"{doc.relative_to(REPO_ROOT)}: {target} (no heading with that anchor)")
    assert not broken, "\n".join(broken)


def test_readme_lists_every_doc_once():
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("## Documentation", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^- \[`docs/([^`]+)`\]", section, re.M)
    assert len(listed) == len(set(listed)), f"listed twice: {sorted({d for d in listed if listed.count(d) > 1})}"
    docs = sorted(p.name for p in (REPO_ROOT / "docs").glob("*.md"))
    assert sorted(listed) == docs, f"missing from README: {sorted(set(docs) - set(listed))}"
