"""Label tables: each class value with its name and display colour.

The colours are what viewers show (ITK-SNAP, 3D Slicer, report figures); one table per model, so a
class looks the same everywhere. Value 0 is the background and is never drawn.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

# Okabe-Ito's colour-blind-safe palette (foreground classes 1..8), then a few distinct fallbacks.
_PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178), (213, 94, 0),
    (204, 121, 167), (153, 153, 153), (128, 0, 0), (0, 128, 128), (128, 128, 0), (64, 0, 128),
)


def default_color(value: int) -> tuple[int, int, int]:
    """RGB (0-255) of class ``value``: black for the background, the palette in order for the others."""
    if value <= 0:
        return (0, 0, 0)
    return _PALETTE[(value - 1) % len(_PALETTE)]


class LabelInfo(BaseModel):
    """One class: its value in the mask, its name and its RGB colour (0-255)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    value: int = Field(ge=0, le=255)
    name: str = Field(min_length=1)
    color: tuple[int, int, int]


def label_table(names: dict[int, str]) -> list[LabelInfo]:
    """The label table of ``{value: name}`` with default colours, sorted by value."""
    return [LabelInfo(value=int(v), name=str(n), color=default_color(int(v))) for v, n in sorted(names.items())]
