"""Segment a study that lives in a PACS: retrieve each accepted series over DICOMweb, predict it like any
DICOM folder, store the DICOM-SEG back (STOW-RS).

A rerun stores no duplicates: the SEG's series and instance UIDs are derived from the source series UID
and the model's weights checksum, so the same model on the same series always makes the same UIDs, and a
series already holding them is left alone. Series are done one by one; a failing series is reported and the
others go on. Downloaded instances live in a temporary folder removed afterwards; masks and SEGs are written
to the output folder under names derived from a hash of the series UID (never from DICOM tags).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from medseg.atomic import write_atomic
from medseg.errors import MedsegError, PacsError
from medseg.inference.predictor import Predictor
from medseg.inference.runner import predict_paths
from medseg.io.dicomweb import (
    DicomWebSettings,
    connect,
    download_series,
    local_name,
    series_present,
    store,
    study_series,
)
from medseg.io.mask_writers import derived_uid
from medseg.io.output_formats import formats_for, output_format
from medseg.models.bundle import model_modality

log = logging.getLogger(__name__)

@dataclass
class SeriesOutcome:
    """What happened to one series of the study: ``stored`` (SEG sent), ``present`` (this model's SEG of it is
    already on the server), ``not-accepted`` (modality) or ``failed`` (with the reason)."""

    name: str
    modality: str
    status: Literal["stored", "present", "not-accepted", "failed"]
    message: str = ""
    seg: Path | None = None


def accepted_modalities(predictor: Predictor) -> tuple[str, ...]:
    """The DICOM modalities a model is meant for: the modality it was trained on (the bundle's, read by
    :func:`medseg.models.bundle.model_modality`); a model of another or unknown modality takes MR series, the
    rule for intensity-normalised models before bundles recorded their modality (override with ``--modality``)."""
    modality = model_modality(predictor.bundle)
    return ("CT",) if modality == "CT" else ("MR",)


def seg_uids(source_series_uid: str, weights_sha256: str, fmt: str = "dicom-seg") -> tuple[str, str]:
    """The (series, instance) UIDs of the ``fmt`` object (DICOM-SEG, RTSTRUCT) stored for a source series: new UIDs
    in the ``2.25.<UUID>`` form (name-based UUIDs, version 5), the same for one model, one source series and one
    format, so a rerun finds what it stored."""
    kind = "seg" if fmt == "dicom-seg" else fmt  # the SEG's names predate other formats: kept, so reruns match
    name = f"medseg-{kind}/{source_series_uid}/{weights_sha256}"
    return derived_uid(name + "/series"), derived_uid(name + "/instance")


def _assign_uids(seg_path: Path, series_uid: str, instance_uid: str) -> object:
    """Give the SEG file its derived UIDs (rewritten atomically, so the local copy equals the stored one)."""
    import pydicom

    ds = pydicom.dcmread(seg_path)
    ds.SeriesInstanceUID = series_uid
    ds.SOPInstanceUID = instance_uid
    ds.file_meta.MediaStorageSOPInstanceUID = instance_uid
    write_atomic(seg_path, lambda tmp: ds.save_as(tmp, enforce_file_format=True))
    return ds


def predict_study(predictor: Predictor, settings: DicomWebSettings, study_uid: str, output_dir: Path,
                  modalities: Sequence[str] | None = None, formats: str = "auto") -> list[SeriesOutcome]:
    """Segment every series of ``study_uid`` whose modality the model accepts and store on the server each
    DICOM object of ``formats`` (an ``--output-format``; ``auto``: the DICOM-SEG) that the output-format registry
    marks as storable; the NIfTI masks stay in ``output_dir``.

    Raises :class:`PacsError` when the server cannot be used at all (unreachable, credentials refused,
    unknown study) or the study has no accepted series; a failure of one series is returned, not raised.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    modalities = tuple(m.upper() for m in (modalities or accepted_modalities(predictor)))
    url = settings.url
    client = connect(settings)
    series = study_series(client, url, study_uid)
    outcomes = [SeriesOutcome(local_name(s.uid), s.modality, "not-accepted",
                              f"modality {s.modality or '?'} is not one of {', '.join(modalities)}")
                for s in series if s.modality.upper() not in modalities]
    accepted = [s for s in series if s.modality.upper() in modalities]
    if not accepted:
        found = sorted({s.modality or "?" for s in series})
        raise PacsError(f"{url}: study {study_uid} has no series of modality {', '.join(modalities)} "
                        f"(it has {', '.join(found)}); pass --modality to choose others")
    sha = predictor.bundle.spec.provenance.weights_sha256
    stored_formats = [f for f in (output_format(n) for n in formats_for(formats, "dicom")) if f.store_to_pacs]
    if not stored_formats:
        raise PacsError(f"--output-format {formats} writes nothing that can be stored on a PACS (e.g. dicom-seg, rtstruct)")
    for info in accepted:
        name = local_name(info.uid)
        uids = {f.name: seg_uids(info.uid, sha, f.name) for f in stored_formats}
        try:
            missing = [f for f in stored_formats if not series_present(client, url, study_uid, uids[f.name][0])]
            if not missing:
                outcomes.append(SeriesOutcome(name, info.modality, "present",
                                              "this model's segmentation is already on the server"))
                continue
            with tempfile.TemporaryDirectory(prefix="medseg-dicomweb-") as tmp:
                folder = download_series(client, url, study_uid, info.uid, Path(tmp))
                summary = predict_paths(None, [folder], output_dir, overwrite=True, predictor=predictor,
                                        output_format=",".join(f.name for f in missing) + ",nifti")
            scan_failure = next((f for f in summary.failed if not f.format), None)
            if scan_failure is not None:
                outcomes.append(SeriesOutcome(name, info.modality, "failed", f"{scan_failure.error}: {scan_failure.message}"))
                continue
            written = [(f, output_dir / f"{name}{f.suffix}") for f in missing]
            datasets = [_assign_uids(path, *uids[f.name]) for f, path in written if path.is_file()]
            if datasets:
                store(client, url, datasets)
            lost = [f for f, path in written if not path.is_file()]
            reasons = {f.format: f"{f.error}: {f.message}" for f in summary.failed if f.format}
            if lost:
                outcomes.append(SeriesOutcome(name, info.modality, "failed", "; ".join(
                    f"no {f.name} was written ({reasons.get(f.name, 'see the predict messages above')})" for f in lost)
                    + (f"; stored {', '.join(f.name for f, p in written if p.is_file())}" if datasets else "")))
                continue
            outcomes.append(SeriesOutcome(name, info.modality, "stored", seg=written[0][1]))
        except MedsegError as exc:
            log.debug("series %s failed", name, exc_info=True)
            outcomes.append(SeriesOutcome(name, info.modality, "failed", f"{type(exc).__name__}: {exc}"))
    return outcomes


def describe(outcomes: Sequence[SeriesOutcome]) -> str:
    """A few lines for the terminal."""
    counts = {s: sum(o.status == s for o in outcomes) for s in ("stored", "present", "not-accepted", "failed")}
    lines = [f"{counts['stored']} segmentation(s) stored, {counts['present']} already on the server, "
             f"{counts['not-accepted']} series of other modalities, {counts['failed']} failed"]
    lines += [f"  {o.status.upper()} {o.name} ({o.modality}): {o.message}" for o in outcomes if o.status == "failed"]
    return "\n".join(lines)
