"""Label tables, re-exported from :mod:`medseg.labels`, where they live so that ``io`` (the mask writers)
can use them without importing from ``data`` (the layers: docs/architecture.md)."""

from medseg.labels import (
    ABNORMAL_STRUCTURE,
    ANATOMICAL_STRUCTURE,
    GENERIC_CODE,
    KNOWN_CODES,
    TISSUE,
    CodedConcept,
    LabelCode,
    LabelInfo,
    default_color,
    default_label_code,
    label_code,
    label_table,
)

__all__ = [
    "ABNORMAL_STRUCTURE", "ANATOMICAL_STRUCTURE", "GENERIC_CODE", "KNOWN_CODES", "TISSUE", "CodedConcept", "LabelCode",
    "LabelInfo", "default_color", "default_label_code", "label_code", "label_table",
]
