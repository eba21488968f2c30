"""Batch prediction over files and folders: progress, per-scan failures, atomic and resumable outputs.

Several runs may share one output folder: each scan is claimed (:func:`medseg.atomic.claim`) before it
is predicted, so concurrent runs split the work, and ``failures.csv`` is merged under its own claim.
"""

from __future__ import annotations

import csv
import io
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from medseg.atomic import claim, temporaries, temporary_target, write_text_atomic
from medseg.errors import MedsegError, OutputError
from medseg.inference.predictor import Predictor
from medseg.io.nifti import NIFTI_SUFFIXES, save_atomic
from medseg.io.scans import Scan, find_scans

log = logging.getLogger(__name__)

FAILURES = "failures.csv"
FAILURE_COLUMNS = ["file", "mask", "error", "message"]


@dataclass
class PredictFailure:
    """A scan that could not be segmented: the input, the error class and message."""

    path: Path
    error: str
    message: str
    mask: str = ""


@dataclass
class PredictSummary:
    """What a predict run did."""

    output_dir: Path
    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[PredictFailure] = field(default_factory=list)
    #: Masks another run on the same folder was writing, or wrote after this run started: not redone.
    claimed: list[Path] = field(default_factory=list)

    def describe(self) -> str:
        """A few lines for the terminal."""
        lines = [f"{len(self.written)} mask(s) written, {len(self.skipped)} already present (skipped), "
                 f"{len(self.failed)} failed -> {self.output_dir}"]
        if self.skipped:
            lines.append("  existing masks were kept; pass --overwrite to redo them")
        if self.claimed:
            lines.append(f"  {len(self.claimed)} scan(s) left to another run on this folder (it was writing them, "
                         "or wrote them after this run started)")
        for f in self.failed:
            lines.append(f"  FAILED {f.path}: {f.error}: {f.message}")
        if self.failed:
            lines.append(f"  failures listed in {self.output_dir / FAILURES}")
        return "\n".join(lines)


def output_path(output_dir: Path, scan: Scan) -> Path:
    """Where a scan's mask goes: ``<case_id>.nii.gz`` (names come from files/folders, never DICOM tags)."""
    return output_dir / f"{scan.case_id}.nii.gz"


def _input_folders(scans: Sequence[Scan], inputs: Sequence[Path]) -> list[Path]:
    """Folders whose content is input: folders given, DICOM series folders."""
    folders = [Path(p) for p in inputs if Path(p).is_dir()]
    folders += [scan.path for scan in scans if scan.kind == "dicom"]
    return folders


def check_not_into_inputs(scans: Sequence[Scan], output_dir: Path, inputs: Sequence[Path] = ()) -> None:
    """Refuse an output folder that is (or lies inside) an input folder, or that holds an input NIfTI file.

    Paths are compared resolved (symlinks followed), so a link to an input folder is that folder.
    """
    out = Path(output_dir).resolve()
    for folder in _input_folders(scans, inputs):
        real = folder.resolve()
        if out == real or out.is_relative_to(real):
            where = "is" if out == real else "lies inside"
            raise OutputError(f"{output_dir}: the output folder {where} the input folder {folder}; masks would mix "
                              "with (or replace) the scans: choose an output folder outside the inputs")
    for scan in scans:
        if scan.kind == "nifti" and out in (scan.path.resolve().parent, scan.path.absolute().parent.resolve()):
            raise OutputError(f"{output_dir}: the output folder holds the input {scan.path}; masks would mix with "
                              "(or replace) the scans: choose an output folder outside the inputs")


def check_outputs(scans: Sequence[Scan], output_dir: Path, inputs: Sequence[Path] = ()) -> None:
    """Refuse, before any work: two inputs that map to one output name, an output folder that is or lies
    inside an input (``inputs``: the paths the user gave), or an unwritable output folder."""
    by_name: dict[str, list[Path]] = {}
    for scan in scans:
        by_name.setdefault(scan.case_id, []).append(scan.path)
    clashes = {name: paths for name, paths in by_name.items() if len(paths) > 1}
    if clashes:
        name, paths = next(iter(clashes.items()))
        raise OutputError(f"{len(clashes)} output name(s) would be written twice, e.g. {name}.nii.gz from "
                          + " and ".join(str(p) for p in paths) + "; rename the inputs or predict them separately")
    check_not_into_inputs(scans, output_dir, inputs)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as exc:
        raise OutputError(f"{output_dir}: output folder is not writable ({exc.strerror or exc})") from None


def _read_failures(path: Path) -> list[dict[str, str]]:
    try:
        with path.open(newline="", encoding="utf-8") as f:
            return [{c: row.get(c) or "" for c in FAILURE_COLUMNS} for row in csv.DictReader(f)]
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise OutputError(f"{path}: cannot read the earlier failure record ({exc}); move it away to start afresh") from None


def _update_failures(output_dir: Path, summary: PredictSummary, masks_of: dict[str, str]) -> None:
    """Merge this run into ``failures.csv``, which lists the folder's masks missing because their scan failed.

    A mask written now drops its row, a failure now replaces the row of the same mask, other rows stay.
    ``masks_of`` maps this run's input paths to mask names, for records older than the "mask" column.
    """
    path = output_dir / FAILURES
    with claim(path, wait=True):
        for tmp in temporaries(path):  # left by a run killed while writing it; we hold the claim
            tmp.unlink(missing_ok=True)
        rows: dict[str, dict[str, str]] = {}
        for row in _read_failures(path):
            row["mask"] = row["mask"] or masks_of.get(row["file"], "")
            rows[row["mask"] or f"file:{row['file']}"] = row
        for target in summary.written:
            rows.pop(target.name, None)
        for f in summary.failed:
            rows[f.mask] = {"file": str(f.path), "mask": f.mask, "error": f.error, "message": f.message}
        if not rows:
            path.unlink(missing_ok=True)
            return
        buf = io.StringIO()
        writer = csv.DictWriter(buf, FAILURE_COLUMNS)
        writer.writeheader()
        writer.writerows(rows.values())
        write_text_atomic(path, buf.getvalue())


def remove_orphan_temporaries(output_dir: Path) -> list[Path]:
    """Delete the masks' ``.name.tmp-*`` files that no live run is writing (their claim is free)."""
    removed: list[Path] = []
    targets = {temporary_target(p) for p in Path(output_dir).glob(".*.tmp-*")}
    for target in sorted(t for t in targets if t is not None and t.name.lower().endswith(NIFTI_SUFFIXES)):
        held = claim(target)
        if held is None:
            continue  # a live run is writing this mask
        with held:
            for tmp in temporaries(target):
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
    return removed


def _identity(path: Path) -> tuple[int, int, int, int] | None:
    """What tells one version of a file from another: a rename or rewrite changes it."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size


def predict_paths(model: Path | Sequence[Path], inputs: Sequence[Path], output_dir: Path, overwrite: bool = False,
                  device: str | None = "auto", predictor: Predictor | None = None,
                  mirror: bool | None = None, backend: str = "torch", model_file: Path | None = None,
                  precision: str = "float32") -> PredictSummary:
    """Segment every scan found under ``inputs`` and write ``<case_id>.nii.gz`` masks into ``output_dir``.

    Several ``model`` run folders form an ensemble (probabilities averaged, e.g. the folds of one config);
    ``mirror`` True adds test-time flips over every axis, None keeps each config's ``infer.mirror_axes``.
    ``backend`` (torch, torchscript, onnxruntime, openvino) runs the model's checked export instead of its
    weights (``model_file``, else the run's ``exports/``); ``precision`` bfloat16 for torch and openvino.

    One failing scan is recorded (``failures.csv``, merged with earlier runs' records) and the rest go on.
    Existing masks are skipped unless ``overwrite``; masks are written atomically, so a killed run resumes
    where it stopped. Each scan is claimed first: scans another run on the folder is doing are left to it.
    """
    output_dir = Path(output_dir)
    scans = find_scans(inputs)
    check_outputs(scans, output_dir, inputs)
    predictor = predictor or Predictor.from_checkpoint(model, device, mirror=mirror, backend=backend,
                                                       model_file=model_file, precision=precision)
    summary = PredictSummary(output_dir)
    removed = remove_orphan_temporaries(output_dir)
    if removed:
        log.info("removed %d temporary file(s) left by a killed run in %s", len(removed), output_dir)
    # A mask that changes after this point was written by another run on the same folder.
    at_start = {scan.case_id: _identity(output_path(output_dir, scan)) for scan in scans}
    for scan in tqdm(scans, desc="predict", unit="scan", disable=None):
        target = output_path(output_dir, scan)
        if at_start[scan.case_id] is not None and not overwrite:
            summary.skipped.append(target)
            continue
        held = claim(target)
        if held is None:
            summary.claimed.append(target)
            continue
        with held:
            if _identity(target) != at_start[scan.case_id]:
                summary.claimed.append(target)
                continue
            for tmp in temporaries(target):  # a killed writer's; we hold the claim, so nobody writes them now
                tmp.unlink(missing_ok=True)
            try:
                save_atomic(predictor.predict_scan(scan), target)
                summary.written.append(target)
            except MedsegError as exc:
                summary.failed.append(PredictFailure(scan.path, type(exc).__name__, str(exc), target.name))
            except Exception as exc:  # one broken scan must not stop a batch of hundreds
                log.debug("unexpected error on %s", scan.path, exc_info=True)
                summary.failed.append(PredictFailure(scan.path, type(exc).__name__, str(exc), target.name))
    _update_failures(output_dir, summary, {str(scan.path): output_path(output_dir, scan).name for scan in scans})
    return summary
