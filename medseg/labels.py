"""Label tables: each class value with its name and display colour.

The colours are what viewers show (ITK-SNAP, 3D Slicer, report figures); one table per model, so a
class looks the same everywhere. Value 0 is the background and is never drawn.

Each class may also carry a coded concept (:class:`LabelCode`: a segmented property category and
type, e.g. SCT "Anatomical Structure" / SCT "Lung"), which DICOM-SEG segments need. It is set per
label in the manifest (``label_codes``) and travels in the model bundle; without one,
:func:`label_code` picks a default from the class name (docs/dicom.md).
"""

from __future__ import annotations

import re

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


class CodedConcept(BaseModel):
    """A DICOM coded concept: coding scheme designator (e.g. ``SCT`` for SNOMED CT), code value, meaning."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    scheme: str = Field(min_length=1, max_length=16, pattern=r"^[A-Za-z0-9_.-]+$")
    value: str = Field(min_length=1, max_length=64)
    meaning: str = Field(min_length=1, max_length=64)


class LabelCode(BaseModel):
    """What a class is, coded: its segmented property category and type (DICOM-SEG terms)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    category: CodedConcept
    type: CodedConcept


def _sct(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(scheme="SCT", value=value, meaning=meaning)


ANATOMICAL_STRUCTURE = _sct("91723000", "Anatomical Structure")
ABNORMAL_STRUCTURE = _sct("49755003", "Morphologically Abnormal Structure")
TISSUE = _sct("85756007", "Tissue")
#: Names (lower case, a word of the class name) with their SNOMED CT type and category; the values are
#: those of pydicom's code dictionary (DICOM PS3.16), checked by a unit test.
KNOWN_CODES: dict[str, LabelCode] = {
    **{name: LabelCode(category=ANATOMICAL_STRUCTURE, type=_sct(value, meaning)) for name, (value, meaning) in {
        "lung": ("39607008", "Lung"), "hippocampus": ("5366008", "Hippocampus"), "liver": ("10200004", "Liver"),
        "kidney": ("64033007", "Kidney"), "spleen": ("78961009", "Spleen"), "heart": ("80891009", "Heart"),
        "brain": ("12738006", "Brain"), "pancreas": ("15776009", "Pancreas"), "prostate": ("41216001", "Prostate"),
        "bone": ("272673000", "Bone"), "aorta": ("15825003", "Aorta"), "bladder": ("89837001", "Bladder"),
        "stomach": ("69695003", "Stomach"), "vertebra": ("51282000", "Vertebra"),
    }.items()},
    **{name: LabelCode(category=ABNORMAL_STRUCTURE, type=_sct(value, meaning)) for name, (value, meaning) in {
        "lesion": ("52988006", "Lesion"), "nodule": ("27925004", "Nodule"), "tumor": ("108369006", "Tumor"),
        "tumour": ("108369006", "Tumor"), "mass": ("4147007", "Mass"),
    }.items()},
}
#: The code of a class none of whose words is known: SCT "Tissue" as category and type (what
#: 3D Slicer and dcmqi use for an unspecified segment).
GENERIC_CODE = LabelCode(category=TISSUE, type=TISSUE)


def default_label_code(name: str) -> LabelCode:
    """The code for a class name: the first word (or its singular) found in :data:`KNOWN_CODES`, else
    :data:`GENERIC_CODE`. ``"left lung"`` -> Lung, ``"lesions"`` -> Lesion, ``"anterior"`` -> Tissue."""
    for word in re.split(r"[^a-z]+", name.lower()):
        for candidate in (word, word[:-1] if word.endswith("s") else word):
            if candidate in KNOWN_CODES:
                return KNOWN_CODES[candidate]
    return GENERIC_CODE


class LabelInfo(BaseModel):
    """One class: its value in the mask, its name, its RGB colour (0-255) and optionally its coded concept."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    value: int = Field(ge=0, le=255)
    name: str = Field(min_length=1)
    color: tuple[int, int, int]
    code: LabelCode | None = None


def label_code(label: LabelInfo) -> LabelCode:
    """The coded concept of a class: its own (manifest ``label_codes``), else the default for its name."""
    return label.code or default_label_code(label.name)


def label_table(names: dict[int, str], codes: dict[int, LabelCode] | None = None) -> list[LabelInfo]:
    """The label table of ``{value: name}`` with default colours and the given codes, sorted by value."""
    codes = codes or {}
    return [LabelInfo(value=int(v), name=str(n), color=default_color(int(v)), code=codes.get(int(v)))
            for v, n in sorted(names.items())]
