"""Batch prediction over files and folders: progress, per-scan failures, atomic and resumable outputs."""

from __future__ import annotations

import csv
import io
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from medseg.atomic import write_text_atomic
from medseg.errors import MedsegError, OutputError
from medseg.inference.predictor import Predictor
from medseg.io.nifti import save_atomic
from medseg.io.scans import Scan, find_scans

log = logging.getLogger(__name__)


@dataclass
class PredictFailure:
    """A scan that could not be segmented: the input, the error class and message."""

    path: Path
    error: str
    message: str


@dataclass
class PredictSummary:
    """What a predict run did."""

    output_dir: Path
    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[PredictFailure] = field(default_factory=list)

    def describe(self) -> str:
        """A few lines for the terminal."""
        lines = [f"{len(self.written)} mask(s) written, {len(self.skipped)} already present (skipped), "
                 f"{len(self.failed)} failed -> {self.output_dir}"]
        if self.skipped:
            lines.append("  existing masks were kept; pass --overwrite to redo them")
        for f in self.failed:
            lines.append(f"  FAILED {f.path}: {f.error}: {f.message}")
        if self.failed:
            lines.append(f"  failures listed in {self.output_dir / 'failures.csv'}")
        return "\n".join(lines)


def output_path(output_dir: Path, scan: Scan) -> Path:
    """Where a scan's mask goes: ``<case_id>.nii.gz`` (names come from files/folders, never DICOM tags)."""
    return output_dir / f"{scan.case_id}.nii.gz"


def check_outputs(scans: Sequence[Scan], output_dir: Path) -> None:
    """Refuse, before any work, two inputs that map to one output name, or an unwritable output folder."""
    by_name: dict[str, list[Path]] = {}
    for scan in scans:
        by_name.setdefault(scan.case_id, []).append(scan.path)
    clashes = {name: paths for name, paths in by_name.items() if len(paths) > 1}
    if clashes:
        name, paths = next(iter(clashes.items()))
        raise OutputError(f"{len(clashes)} output name(s) would be written twice, e.g. {name}.nii.gz from "
                          + " and ".join(str(p) for p in paths) + "; rename the inputs or predict them separately")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as exc:
        raise OutputError(f"{output_dir}: output folder is not writable ({exc.strerror or exc})") from None


def _write_failures(output_dir: Path, failures: Sequence[PredictFailure]) -> None:
    path = output_dir / "failures.csv"
    if not failures:
        path.unlink(missing_ok=True)
        return
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["file", "error", "message"])
    for f in failures:
        writer.writerow([str(f.path), f.error, f.message])
    write_text_atomic(path, buf.getvalue())


def predict_paths(model: Path | Sequence[Path], inputs: Sequence[Path], output_dir: Path, overwrite: bool = False,
                  device: str | None = "auto", predictor: Predictor | None = None,
                  mirror: bool | None = None) -> PredictSummary:
    """Segment every scan found under ``inputs`` and write ``<case_id>.nii.gz`` masks into ``output_dir``.

    Several ``model`` run folders form an ensemble (probabilities averaged, e.g. the folds of one config);
    ``mirror`` True adds test-time flips over every axis, None keeps each config's ``infer.mirror_axes``.

    One failing scan is recorded (``failures.csv``) and the rest go on. Existing masks are skipped unless
    ``overwrite``; masks are written atomically, so a killed run resumes where it stopped.
    """
    output_dir = Path(output_dir)
    scans = find_scans(inputs)
    check_outputs(scans, output_dir)
    predictor = predictor or Predictor.from_checkpoint(model, device, mirror=mirror)
    summary = PredictSummary(output_dir)
    for scan in tqdm(scans, desc="predict", unit="scan", disable=None):
        target = output_path(output_dir, scan)
        if target.exists() and not overwrite:
            summary.skipped.append(target)
            continue
        try:
            save_atomic(predictor.predict_scan(scan), target)
            summary.written.append(target)
        except MedsegError as exc:
            summary.failed.append(PredictFailure(scan.path, type(exc).__name__, str(exc)))
        except Exception as exc:  # one broken scan must not stop a batch of hundreds
            log.debug("unexpected error on %s", scan.path, exc_info=True)
            summary.failed.append(PredictFailure(scan.path, type(exc).__name__, str(exc)))
    _write_failures(output_dir, summary.failed)
    return summary


