"""One benchmark's section of docs/benchmarks.md: the text between its begin/end markers, rewritten in place."""

from __future__ import annotations

from pathlib import Path

from medseg.atomic import write_text_atomic


def replace_section(docs: Path, section: str, begin: str, end: str) -> None:
    """Put ``section`` (which starts with ``begin`` and ends with ``end``) where the markers are in ``docs``,
    or append it when they are not there; the file is written atomically (made if missing)."""
    text = docs.read_text(encoding="utf-8") if docs.exists() else "# Benchmarks\n\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section.rstrip("\n") + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    write_text_atomic(docs, text)
