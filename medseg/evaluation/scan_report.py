"""One scan's report: per-class volumes, the lesion inventory and medseg predict's statistics and QC flags.

The same function writes ``<case_id>.report.json`` for ``medseg predict --report`` and the report of a
``medseg serve`` job, with one default for the lesion classes: the model config's
``evaluate.lesion_classes``, else every foreground class.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from medseg.atomic import write_text_atomic
from medseg.evaluation.lesions import find_lesions
from medseg.evaluation.metrics import voxel_spacing, voxel_volume_ml
from medseg.inference.statistics import ScanStatistics
from medseg.models.bundle import ModelBundle, model_lesion_classes

REPORT_SUFFIX = ".report.json"


@dataclass(frozen=True)
class ReportOptions:
    """Which classes get a lesion inventory, and how components are formed (from the bundle's config)."""

    label_names: dict[int, str]
    lesion_classes: list[int]
    connectivity: int = 26
    min_lesion_volume_ml: float = 0.0
    #: Provenance quoted in each report: the model's name and weights SHA-256.
    model: dict[str, str | None] | None = None

    @classmethod
    def from_bundle(cls, bundle: ModelBundle, lesion_classes: list[int] | None = None) -> ReportOptions:
        """``lesion_classes``, else the model config's ``evaluate`` lesion classes, else every foreground class."""
        evaluate = bundle.config.evaluate
        names = dict(bundle.label_names)
        classes = list(lesion_classes or model_lesion_classes(bundle)) or [k for k in sorted(names) if k != 0]
        spec = bundle.spec
        return cls(names, classes, evaluate.connectivity, evaluate.min_lesion_volume_ml,
                   {"name": spec.name, "weights_sha256": spec.provenance.weights_sha256})


def segmentation_report(mask: nib.Nifti1Image, options: ReportOptions,
                        statistics: ScanStatistics | None = None) -> dict[str, object]:
    """Per-class volumes (mL) and the lesion inventory (volume mL, diameters mm, centroid RAS mm) of a mask;
    with ``statistics`` also medseg predict's per-class statistics and the QC flags (docs/qc.md)."""
    labels = np.asarray(mask.dataobj)
    affine = np.asarray(mask.affine)
    voxel_ml = voxel_volume_ml(affine)
    counts = np.bincount(labels.ravel(), minlength=max(options.label_names) + 1)
    classes = {options.label_names.get(k, f"class_{k}"): {"class_id": k, "voxels": int(counts[k]),
                                                         "volume_ml": float(counts[k]) * voxel_ml}
               for k in range(1, len(counts))}
    inventory = {}
    for k in options.lesion_classes:
        found = find_lesions(labels == k, affine, options.connectivity, options.min_lesion_volume_ml)
        inventory[options.label_names.get(k, f"class_{k}")] = {
            "class_id": k, "lesions": [x.as_record() for x in found.lesions],
            "dropped": [x.as_record() for x in found.dropped]}
    quality = {} if statistics is None else {
        "qc_flags": statistics.all_flags,
        "statistics": {k: v for k, v in statistics.as_record().items() if k != "case_id"}}
    return {"kind": "medseg-segmentation-report", "schema_version": 2, "model": options.model, **quality,
            "shape": [int(s) for s in labels.shape],
            "spacing_mm": [round(s, 6) for s in voxel_spacing(affine)], "classes": classes,
            "lesion_inventory": {"connectivity": options.connectivity, "min_lesion_volume_ml": options.min_lesion_volume_ml,
                                 "classes": inventory}}


def report_path(output_dir: Path, case_id: str) -> Path:
    """Where a scan's report goes: ``<case_id>.report.json``."""
    return Path(output_dir) / f"{case_id}{REPORT_SUFFIX}"


@dataclass(frozen=True)
class ScanReportWriter:
    """Writes ``<case_id>.report.json`` for each predicted scan (the per-scan pipeline's report step)."""

    options: ReportOptions

    def __call__(self, case_id: str, mask: nib.Nifti1Image, statistics: ScanStatistics | None,
                 output_dir: Path) -> Path:
        path = report_path(output_dir, case_id)
        report = segmentation_report(mask, self.options, statistics)
        write_text_atomic(path, json.dumps(report, indent=1, allow_nan=False) + "\n")
        return path
