"""Batch prediction over files and folders: progress, per-scan failures, atomic and resumable outputs.

The work on each scan is :func:`medseg.inference.pipeline.predict_one` (the per-scan pipeline every face
shares); this module finds the scans, checks outputs before any work, runs the scans with read-ahead and
background writing, and keeps the folder's ``failures.csv``.

Several runs may share one output folder: each scan is claimed (:func:`medseg.atomic.claim`) before it
is predicted, so concurrent runs split the work, and ``failures.csv`` is merged under its own claim.
"""

from __future__ import annotations

import csv
import io
import logging
import tempfile
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import nibabel as nib
from tqdm import tqdm

from medseg.atomic import claim, temporaries, temporary_target, write_text_atomic
from medseg.errors import CheckpointError, OutputError, ScanError
from medseg.inference.memory import keep_freed_memory
from medseg.inference.pipeline import (
    PredictBatch,
    ScanOutcome,
    ScanReporter,
    header_size,
    identity,
    load_for_prediction,
    output_path,
    predict_one,
    predict_scan,
)
from medseg.inference.predictor import Predictor
from medseg.inference.statistics import STATISTICS_CSV
from medseg.inference.timing import StageTimes
from medseg.io.output_formats import all_suffixes, check_formats
from medseg.io.scans import Scan, find_scans
from medseg.models.bundle import read_bundle_spec

__all__ = ["PredictBatch", "PredictFailure", "PredictSummary", "ScanOutcome", "finish_batch", "predict_one",
           "predict_paths", "prepare_batch"]

log = logging.getLogger(__name__)

FAILURES = "failures.csv"
#: ``mask``: the missing file (the scan's mask, or one output format's file); ``format``: that output format
#: when only it failed (empty when the whole scan failed).
FAILURE_COLUMNS = ["file", "mask", "format", "error", "message"]
#: Scans whose QC flags the terminal summary lists one by one; the rest are counted.
MAX_FLAG_LINES = 20


@dataclass
class PredictFailure:
    """A scan that could not be segmented, or one of its output formats that could not be written: the input,
    the error class and message, the missing file's name and (for an output alone) its format."""

    path: Path
    error: str
    message: str
    mask: str = ""
    format: str = ""


@dataclass
class PredictSummary:
    """What a predict run did."""

    output_dir: Path
    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[PredictFailure] = field(default_factory=list)
    #: Masks another run on the same folder was writing, or wrote after this run started: not redone.
    claimed: list[Path] = field(default_factory=list)
    #: QC flags (docs/qc.md) of the scans written in this run that raised any, by mask.
    flagged: dict[Path, list[str]] = field(default_factory=dict)
    #: Seconds per stage, added over the scans (medseg.inference.timing).
    times: StageTimes = field(default_factory=StageTimes)

    def add(self, outcome: ScanOutcome) -> None:
        """Count one scan's outcome."""
        for stage, seconds in outcome.times.items():
            self.times.add(stage, seconds)
        if outcome.qc_flags:
            self.flagged[outcome.target] = list(outcome.qc_flags)
        for failure in outcome.output_failures:
            self.failed.append(PredictFailure(outcome.path, failure.error, failure.message, failure.path.name,
                                              failure.format))
        if outcome.status == "failed":
            self.failed.append(PredictFailure(outcome.path, outcome.error, outcome.message, outcome.target.name))
        else:
            {"written": self.written, "skipped": self.skipped, "claimed": self.claimed}[outcome.status].append(
                outcome.target)

    def describe(self) -> str:
        """A few lines for the terminal."""
        lines = [f"{len(self.written)} mask(s) written, {len(self.skipped)} already present (skipped), "
                 f"{len(self.failed)} failed -> {self.output_dir}"]
        if self.skipped:
            lines.append("  existing masks were kept; pass --overwrite to redo them")
        if self.claimed:
            lines.append(f"  {len(self.claimed)} scan(s) left to another run on this folder (it was writing them, "
                         "or wrote them after this run started)")
        for target, flags in list(self.flagged.items())[:MAX_FLAG_LINES]:
            lines.append(f"  QC {target.name}: {'; '.join(flags)}")
        if len(self.flagged) > MAX_FLAG_LINES:
            lines.append(f"  ... QC flags on {len(self.flagged) - MAX_FLAG_LINES} more scan(s)")
        if self.flagged:
            lines.append(f"  QC flags are listed in {self.output_dir / STATISTICS_CSV} (docs/qc.md explains each)")
        for f in self.failed:
            what = f" ({f.format} output; the other outputs were written)" if f.format else ""
            lines.append(f"  FAILED {f.path}{what}: {f.error}: {f.message}")
        if self.failed:
            lines.append(f"  failures listed in {self.output_dir / FAILURES}")
        if self.times.total > 0:
            lines.append(f"  seconds per stage, all scans (read and write overlap the network): {self.times.describe()}")
        return "\n".join(lines)


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


def _update_failures(output_dir: Path, summary: PredictSummary, masks_of: dict[str, str],
                     outputs_of: dict[str, list[str]] | None = None) -> None:
    """Merge this run into ``failures.csv``, which lists the folder's files missing because their scan (or
    that output format alone) failed.

    A scan written now drops the rows of its files (``outputs_of``: done-marker name -> every file name the
    scan's formats write), a failure now replaces the row of the same file, other rows stay. ``masks_of``
    maps this run's input paths to mask names, for records older than the "mask" column.
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
            for name in (outputs_of or {}).get(target.name, [target.name]):
                rows.pop(name, None)
        for f in summary.failed:
            rows[f.mask] = {"file": str(f.path), "mask": f.mask, "format": f.format, "error": f.error,
                            "message": f.message}
        if not rows:
            path.unlink(missing_ok=True)
            return
        buf = io.StringIO()
        writer = csv.DictWriter(buf, FAILURE_COLUMNS)
        writer.writeheader()
        writer.writerows(rows.values())
        write_text_atomic(path, buf.getvalue())


def remove_orphan_temporaries(output_dir: Path) -> list[Path]:
    """Delete the outputs' ``.name.tmp-*`` files (of every registered format) and ``.name.lock`` files that no
    live run holds (their claim is free)."""
    removed: list[Path] = []
    suffixes = all_suffixes()
    targets = {temporary_target(p) for p in Path(output_dir).glob(".*.tmp-*")}
    for target in sorted(t for t in targets if t is not None and t.name.endswith(suffixes)):
        held = claim(target)
        if held is None:
            continue  # a live run is writing this mask
        with held:
            for tmp in temporaries(target):
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
    # A run killed between a mask's rename and its claim's release leaves only the ``.name.lock``: a free
    # claim on it is released at once, which unlinks it.
    for lock in sorted(Path(output_dir).glob(".*.lock")):
        held = claim(lock.parent / lock.name[1:-len(".lock")])
        if held is not None:
            held.release()
            removed.append(lock)
    return removed


def prepare_batch(inputs: Sequence[Path], output_dir: Path, overwrite: bool = False, channels: int = 1,
                  statistics: bool = True, preview: bool = False, output_format: str = "auto",
                  max_memory_gib: float | None = None, reporter: ScanReporter | None = None,
                  case_id: str | None = None, scans: Sequence[Scan] | None = None) -> PredictBatch:
    """Find the scans (``channels``: the model's input channels, grouping nnU-Net channel files), refuse bad
    outputs before any work, clean a killed run's temporaries. ``output_format``: see
    :mod:`medseg.io.output_formats`; ``reporter`` writes each scan's report; ``case_id`` names the outputs of
    a single scan (the service's ``scan``) instead of its file or folder name. ``scans`` given (a manifest
    split, :func:`medseg.data.manifest.split_scans`) are used instead of searching ``inputs``; each must hold
    ``channels`` channel files."""
    output_dir = Path(output_dir)
    if scans is None:
        scans = find_scans(inputs, channels=channels)
    else:
        scans = list(scans)
        for scan in scans:
            if max(1, len(scan.channels)) != channels:
                raise ScanError(scan.path, f"case '{scan.case_id}' has {max(1, len(scan.channels))} channel file(s) but "
                                           f"the model takes {channels} input channel(s)")
    if case_id is not None:
        if len(scans) != 1:
            raise OutputError(f"case_id {case_id!r} names one scan, but the inputs hold {len(scans)}")
        scans = [replace(scans[0], case_id=case_id)]
    for warning in check_formats(output_format, {str(scan.path): scan.kind for scan in scans}):
        log.warning("%s", warning)
    check_outputs(scans, output_dir, inputs)
    removed = remove_orphan_temporaries(output_dir)
    if removed:
        log.info("removed %d temporary file(s) left by a killed run in %s", len(removed), output_dir)
    at_start = {scan.case_id: identity(output_path(output_dir, scan, output_format)) for scan in scans}
    return PredictBatch(scans, output_dir, overwrite, at_start, statistics, preview, output_format, max_memory_gib,
                        reporter)


def finish_batch(batch: PredictBatch, outcomes: Sequence[ScanOutcome]) -> PredictSummary:
    """Summarise the outcomes and merge this run's failures into the folder's ``failures.csv``."""
    summary = PredictSummary(batch.output_dir)
    for outcome in outcomes:
        summary.add(outcome)
    outputs_of = {batch.target(s).name: [f"{s.case_id}{suffix}" for suffix in batch.output_suffixes(s)]
                  for s in batch.scans}
    _update_failures(batch.output_dir, summary, {str(s.path): batch.target(s).name for s in batch.scans}, outputs_of)
    return summary


def _next_todo(batch: PredictBatch, index: int) -> Scan | None:
    return next((s for s in batch.scans[index + 1:] if batch.todo(s)), None)


def model_channels(model: Path | Sequence[Path]) -> int:
    """Input channels of a model (the first of an ensemble), from its bundle spec alone."""
    first = model if isinstance(model, str | Path) else next(iter(model))
    return read_bundle_spec(Path(first)).network.in_channels


def predictor_channels(predictor: Predictor) -> int:
    """Input channels of a loaded predictor (a stand-in without a bundle, as tests and services use: 1)."""
    bundle = getattr(predictor, "bundle", None)
    return bundle.network.in_channels if bundle is not None else 1


def predict_paths(model: Path | Sequence[Path], inputs: Sequence[Path], output_dir: Path, overwrite: bool = False,
                  device: str | None = "auto", predictor: Predictor | None = None,
                  mirror: bool | None = None, statistics: bool = True, preview: bool = False,
                  output_format: str = "auto", backend: str = "torch", model_file: Path | None = None,
                  precision: str = "float32", max_memory_gib: float | None = None,
                  reporter: ScanReporter | None = None, scans: Sequence[Scan] | None = None) -> PredictSummary:
    """Segment every scan found under ``inputs`` (or the given ``scans``, e.g. a manifest split) and write
    ``<case_id>.nii.gz`` masks into ``output_dir``.
    Several ``model`` run folders form an ensemble (probabilities averaged, e.g. the folds of one config);
    ``mirror`` True adds test-time flips over every axis, None keeps each config's ``infer.mirror_axes``.
    ``backend`` (torch, torchscript, onnxruntime, openvino) runs the model's checked export instead of its
    weights (``model_file``, else the run's ``exports/``); ``precision`` bfloat16 for torch and openvino.

    One failing scan is recorded (``failures.csv``, merged with earlier runs' records) and the rest go on;
    a scan whose prediction would not fit in memory (``max_memory_gib``, see :mod:`medseg.inference.memory`)
    is refused before it is read. Existing masks are skipped unless ``overwrite``; masks are written
    atomically, so a killed run resumes where it stopped. Each scan is claimed first: scans another run on
    the folder is doing are left to it.
    ``output_format`` chooses the files (:mod:`medseg.io.output_formats`); one format that fails is recorded
    and the others are still written. ``reporter`` writes each scan's ``<case_id>.report.json``.

    ``statistics`` writes per-class statistics and QC flags (``statistics.csv`` / ``.json``, docs/qc.md);
    ``preview`` a ``<case_id>.preview.png`` per scan.

    While the network runs on one scan, the next is read and the previous one's outputs are written, in one
    background thread each (when the memory budget holds all three).
    """
    # Channel files CASE_0000, CASE_0001... are one scan each: the model's input channels come from its spec
    # (weights not read), so bad outputs are refused before the model is loaded. An unreadable model is
    # reported by the loader, after the outputs are checked.
    keep_freed_memory()  # before the reader and writer threads start (medseg.inference.memory)
    try:
        channels = model_channels(model) if predictor is None else predictor_channels(predictor)
    except CheckpointError:
        channels = 1
    batch = prepare_batch(inputs, output_dir, overwrite, channels=channels, statistics=statistics, preview=preview,
                          output_format=output_format, max_memory_gib=max_memory_gib, reporter=reporter,
                          scans=scans)
    predictor = predictor or Predictor.from_checkpoint(model, device, mirror=mirror, backend=backend,
                                                       model_file=model_file, precision=precision)
    results: list[ScanOutcome | Future[ScanOutcome]] = []
    with ThreadPoolExecutor(1, "medseg-read") as reader, ThreadPoolExecutor(1, "medseg-write") as writer:
        ahead: tuple[Scan, Future[nib.Nifti1Image], StageTimes] | None = None
        writing: tuple[Future[ScanOutcome], int] | None = None  # the last write job and the bytes it holds
        for index, scan in enumerate(tqdm(batch.scans, desc="predict", unit="scan", disable=None)):
            loaded, times = (ahead[1], ahead[2]) if ahead is not None and ahead[0] is scan else (None, StageTimes())
            ahead = None
            budget = batch.memory().bytes
            size = header_size(predictor, scan) if batch.todo(scan) else None
            need = size.peak_bytes if size is not None else None
            held = writing[1] if writing is not None else 0
            if writing is not None and budget is not None and (need is None or need + held > budget):
                writing[0].result()  # the previous scan's outputs and this scan do not fit together
                held = 0
            following = _next_todo(batch, index)
            if following is not None:
                upcoming = header_size(predictor, following)
                fits = budget is None or (need is not None and upcoming is not None
                                          and need + held + 2 * upcoming.scan_bytes <= budget)
                if fits:  # read while this one is predicted (a gzip read briefly holds the file twice)
                    next_times = StageTimes()
                    ahead = (following, reader.submit(load_for_prediction, predictor, following, batch, next_times),
                             next_times)
            result = predict_scan(predictor, scan, batch, loaded, writer, times)
            if writing is not None:
                writing[0].result()  # at most one write pending: its memory stays bounded
                writing = None
            if isinstance(result, Future):
                writing = (result, size.scan_bytes + size.voxels if size is not None else 0)
            results.append(result)
    outcomes = [r.result() if isinstance(r, Future) else r for r in results]
    return finish_batch(batch, outcomes)
