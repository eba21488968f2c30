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
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import nibabel as nib
from tqdm import tqdm

from medseg.atomic import claim, temporaries, temporary_target, write_text_atomic
from medseg.data.labels import label_code
from medseg.errors import CheckpointError, MedsegError, OutputError
from medseg.inference.memory import MemoryBudget, ScanSize, nifti_header_size, scan_size
from medseg.inference.predictor import Predictor
from medseg.inference.statistics import (
    STATISTICS_CSV,
    ScanStatistics,
    assess_scan,
    merge_statistics,
    training_modality,
)
from medseg.io.mask_writers import (
    NIFTI_SUFFIX,
    MaskWriter,
    ModelInfo,
    NiftiMaskWriter,
    mask_writers,
    output_kinds,
    seg_available,
    target_suffix,
)
from medseg.io.nifti import NIFTI_SUFFIXES
from medseg.io.scans import Scan, find_scans, load_scan
from medseg.models.bundle import read_bundle_spec

log = logging.getLogger(__name__)

FAILURES = "failures.csv"
FAILURE_COLUMNS = ["file", "mask", "error", "message"]
#: Scans whose QC flags the terminal summary lists one by one; the rest are counted.
MAX_FLAG_LINES = 20


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
    #: QC flags (docs/qc.md) of the scans written in this run that raised any, by mask.
    flagged: dict[Path, list[str]] = field(default_factory=dict)

    def add(self, outcome: ScanOutcome) -> None:
        """Count one scan's outcome."""
        if outcome.qc_flags:
            self.flagged[outcome.target] = list(outcome.qc_flags)
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
            lines.append(f"  FAILED {f.path}: {f.error}: {f.message}")
        if self.failed:
            lines.append(f"  failures listed in {self.output_dir / FAILURES}")
        return "\n".join(lines)


def output_path(output_dir: Path, scan: Scan, output_format: str = "auto") -> Path:
    """The file that marks a scan done: ``<case_id>.nii.gz``, or ``<case_id>.seg.dcm`` when a SEG is the only
    output (names come from files/folders, never DICOM tags)."""
    return output_dir / f"{scan.case_id}{target_suffix(output_format, scan.kind)}"


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
    """Delete the masks' ``.name.tmp-*`` files and ``.name.lock`` files that no live run holds (their claim is free)."""
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
    # A run killed between a mask's rename and its claim's release leaves only the ``.name.lock``: a free
    # claim on it is released at once, which unlinks it.
    for lock in sorted(Path(output_dir).glob(".*.lock")):
        held = claim(lock.parent / lock.name[1:-len(".lock")])
        if held is not None:
            held.release()
            removed.append(lock)
    return removed


def _identity(path: Path) -> tuple[int, int, int] | None:
    """What tells one version of a file from another: a rename or rewrite changes it.

    Not the device number: machines sharing a network file system (Ray workers on other nodes) may
    number its mount differently, while inode, mtime and size come from the file server.
    """
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


@dataclass
class ScanOutcome:
    """What happened to one scan: ``written``, ``skipped`` (mask present), ``claimed`` (another run's) or
    ``failed`` (with the error class and message)."""

    path: Path
    target: Path
    status: Literal["written", "skipped", "claimed", "failed"]
    error: str = ""
    message: str = ""
    qc_flags: list[str] = field(default_factory=list)


@dataclass
class PredictBatch:
    """A batch checked and ready before any scan is predicted: its scans, output folder and the state of
    each mask when the run started (a mask that changes after that was written by another run)."""

    scans: list[Scan]
    output_dir: Path
    overwrite: bool
    at_start: dict[str, tuple[int, int, int] | None]
    #: Write statistics.csv/json with the QC flags (docs/qc.md); write ``<case_id>.preview.png``.
    statistics: bool = True
    preview: bool = False
    #: ``--output-format``: auto, nifti, dicom-seg or both (:mod:`medseg.io.mask_writers`).
    output_format: str = "auto"
    #: Memory cap for the process in GiB (None: ``$MEDSEG_MAX_MEMORY_GIB``, the cgroup limit, MemAvailable).
    max_memory_gib: float | None = None
    _budget: MemoryBudget | None = field(default=None, repr=False)

    def target(self, scan: Scan) -> Path:
        return output_path(self.output_dir, scan, self.output_format)

    def writers(self, scan: Scan, predictor: Predictor) -> list[MaskWriter]:
        """The writers of this batch's output format for ``scan``; the last one writes :meth:`target`.
        A stand-in predictor without a bundle (no label table) gets the NIfTI mask alone."""
        model = model_info(predictor)
        if model is None:
            if target_suffix(self.output_format, scan.kind) != NIFTI_SUFFIX:
                raise OutputError(f"{scan.path}: a DICOM-SEG needs the model's label table; this predictor has no bundle")
            return [NiftiMaskWriter()]
        return mask_writers(self.output_format, scan.kind, model)

    def done(self, scan: Scan) -> bool:
        """Its mask was present at start and may be kept: the scan is skipped, without a claim or a model."""
        return self.at_start[scan.case_id] is not None and not self.overwrite

    def todo(self, scan: Scan) -> bool:
        """Whether ``scan`` is to be predicted (not :meth:`done`)."""
        return not self.done(scan)

    def memory(self) -> MemoryBudget:
        """The memory one scan may use, measured once (after the model is loaded, at the first scan)."""
        if self._budget is None:
            self._budget = MemoryBudget.measure(self.max_memory_gib)
        return self._budget


def model_info(predictor: Predictor) -> ModelInfo | None:
    """The model as outputs describe it: bundle name and label table, each label with its coded concept;
    None for a stand-in predictor without a bundle (tests, services)."""
    bundle = getattr(predictor, "bundle", None)
    if bundle is None:
        return None
    spec = bundle.spec
    return ModelInfo(spec.name, tuple(label.model_copy(update={"code": label_code(label)}) for label in spec.labels))


def prepare_batch(inputs: Sequence[Path], output_dir: Path, overwrite: bool = False, channels: int = 1,
                  statistics: bool = True, preview: bool = False, output_format: str = "auto",
                  max_memory_gib: float | None = None) -> PredictBatch:
    """Find the scans (``channels``: the model's input channels, grouping nnU-Net channel files), refuse bad
    outputs before any work, clean a killed run's temporaries. ``output_format``: see :mod:`medseg.io.mask_writers`."""
    output_dir = Path(output_dir)
    scans = find_scans(inputs, channels=channels)
    niftis = [scan.path for scan in scans if scan.kind == "nifti" and "dicom-seg" in output_kinds(output_format, "nifti")]
    if niftis:
        raise OutputError(f"--output-format {output_format} writes DICOM-SEG, which needs DICOM series as input; "
                          f"{len(niftis)} input(s) are NIfTI, e.g. {niftis[0]} (use --output-format auto or nifti)")
    if output_format in ("dicom-seg", "both") and not seg_available():
        raise OutputError(f"--output-format {output_format} needs highdicom: pip install 'medseg[dicom]'")
    if output_format == "auto" and not seg_available() and any(scan.kind == "dicom" for scan in scans):
        log.warning("highdicom is not installed: DICOM series get NIfTI masks only (pip install 'medseg[dicom]' "
                    "adds DICOM-SEG)")
    check_outputs(scans, output_dir, inputs)
    removed = remove_orphan_temporaries(output_dir)
    if removed:
        log.info("removed %d temporary file(s) left by a killed run in %s", len(removed), output_dir)
    at_start = {scan.case_id: _identity(output_path(output_dir, scan, output_format)) for scan in scans}
    return PredictBatch(scans, output_dir, overwrite, at_start, statistics, preview, output_format, max_memory_gib)


def write_outputs(scan: Scan, image: nib.Nifti1Image, mask: nib.Nifti1Image, target: Path,
                  writers: Sequence[MaskWriter] | None = None) -> None:
    """Write one scan's outputs beside ``target``, each atomically, in the writers' order: the last writes
    ``target``, which marks the scan done. ``image`` is the scan as read. Default: the NIfTI mask only."""
    writers = list(writers) if writers is not None else [NiftiMaskWriter()]
    for writer in writers[:-1]:
        writer.write(scan, image, mask, writer.path(target.parent, scan.case_id))
    writers[-1].write(scan, image, mask, target)  # exactly ``target``, whatever its name (the service's mask.nii.gz)


def write_scan_preview(predictor: Predictor, scan: Scan, image: nib.Nifti1Image, mask: nib.Nifti1Image,
                       stats: ScanStatistics, batch: PredictBatch) -> None:
    """Write a scan's ``<case_id>.preview.png`` (:mod:`medseg.inference.preview`)."""
    from medseg.inference.preview import preview_path, write_preview  # matplotlib: only when asked

    bundle = predictor.bundle
    lesion_classes = bundle.config.evaluate.lesion_classes
    write_preview(preview_path(batch.output_dir, scan.case_id), image, mask, bundle.spec.labels, scan.case_id,
                  training_modality(bundle) if "modality_mismatch" not in stats.qc_flags else None,
                  lesion_classes, stats.all_flags)


def _grid_of(predictor: Predictor) -> tuple[str, tuple[float, ...] | None, int] | None:
    """Orientation, model spacing and class count of the predictor's model (None for a stand-in without a bundle)."""
    bundle = getattr(predictor, "bundle", None)
    if bundle is None:
        return None
    pre = bundle.spec.preprocessing
    return pre.orientation, pre.spacing, bundle.network.num_classes


def header_size(predictor: Predictor, scan: Scan) -> ScanSize | None:
    """What predicting ``scan`` needs, from its header alone (NIfTI); None when unknown before loading (DICOM)."""
    grid = _grid_of(predictor)
    return None if scan.kind != "nifti" or grid is None else nifti_header_size(scan.path, *grid)


def load_for_prediction(predictor: Predictor, scan: Scan, batch: PredictBatch) -> nib.Nifti1Image:
    """Read a scan, refusing first (:class:`~medseg.errors.ScanTooLargeError`) one whose prediction would not
    fit in memory: NIfTI from the header before any voxel is read, DICOM once read, before predicting."""
    size = header_size(predictor, scan)
    if size is not None:
        batch.memory().check(scan.path, size)
    image = load_scan(scan)
    grid = _grid_of(predictor)
    if size is None and grid is not None:
        batch.memory().check(scan.path, scan_size(image.shape, image.get_data_dtype().itemsize, image.affine, *grid))
    return image


def _failed(scan: Scan, target: Path, exc: Exception) -> ScanOutcome:
    if not isinstance(exc, MedsegError):  # one broken scan must not stop a batch of hundreds
        log.debug("unexpected error on %s", scan.path, exc_info=exc)
    return ScanOutcome(scan.path, target, "failed", type(exc).__name__, str(exc))


def predict_one(predictor: Predictor, scan: Scan, batch: PredictBatch) -> ScanOutcome:
    """Predict one scan of ``batch`` and write its outputs, unless its mask exists or another run holds it.

    Never raises for a bad scan: the failure is returned, so one broken scan cannot stop a batch.
    """
    outcome = _predict(predictor, scan, batch)
    assert isinstance(outcome, ScanOutcome)
    return outcome


def _predict(predictor: Predictor, scan: Scan, batch: PredictBatch, loaded: Future[nib.Nifti1Image] | None = None,
             writer: ThreadPoolExecutor | None = None) -> ScanOutcome | Future[ScanOutcome]:
    """:func:`predict_one`, optionally with the scan already being read (``loaded``) and the outputs written by
    ``writer`` in the background: the claim on the mask then passes to the writing job, which releases it."""
    target = batch.target(scan)
    if batch.done(scan):
        return ScanOutcome(scan.path, target, "skipped")
    held = claim(target)
    if held is None:
        return ScanOutcome(scan.path, target, "claimed")
    with ExitStack() as stack:
        stack.enter_context(held)
        if _identity(target) != batch.at_start[scan.case_id]:
            return ScanOutcome(scan.path, target, "claimed")
        try:
            writers = batch.writers(scan, predictor)
            for path in [target, *(w.path(target.parent, scan.case_id) for w in writers)]:
                for tmp in temporaries(path):  # a killed writer's; we hold the scan's claim, nobody writes them now
                    tmp.unlink(missing_ok=True)
            image = loaded.result() if loaded is not None else load_for_prediction(predictor, scan, batch)
            stats: ScanStatistics | None = None
            if not (batch.statistics or batch.preview):
                mask = predictor.predict_image(image)
            else:
                mask, uncertainty = predictor.predict_image(image, with_uncertainty=True)
                stats = assess_scan(scan.case_id, image, mask, predictor.bundle, uncertainty)
        except Exception as exc:
            return _failed(scan, target, exc)

        def write() -> ScanOutcome:
            try:
                if stats is None:
                    write_outputs(scan, image, mask, target, writers)
                    return ScanOutcome(scan.path, target, "written")
                if batch.statistics:
                    # Before the mask: a run killed in between redoes this scan (no mask yet) and replaces its
                    # row, so every mask present has its statistics.
                    merge_statistics(batch.output_dir, [stats])
                write_outputs(scan, image, mask, target, writers)
                if batch.preview:
                    write_scan_preview(predictor, scan, image, mask, stats, batch)
                return ScanOutcome(scan.path, target, "written", qc_flags=stats.all_flags)
            except Exception as exc:
                return _failed(scan, target, exc)

        if writer is None:
            return write()
        owned = stack.pop_all()

    def write_and_release() -> ScanOutcome:
        with owned:
            return write()

    return writer.submit(write_and_release)


def finish_batch(batch: PredictBatch, outcomes: Sequence[ScanOutcome]) -> PredictSummary:
    """Summarise the outcomes and merge this run's failures into the folder's ``failures.csv``."""
    summary = PredictSummary(batch.output_dir)
    for outcome in outcomes:
        summary.add(outcome)
    _update_failures(batch.output_dir, summary, {str(s.path): batch.target(s).name for s in batch.scans})
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
                  precision: str = "float32", max_memory_gib: float | None = None) -> PredictSummary:
    """Segment every scan found under ``inputs`` and write ``<case_id>.nii.gz`` masks into ``output_dir``.

    Several ``model`` run folders form an ensemble (probabilities averaged, e.g. the folds of one config);
    ``mirror`` True adds test-time flips over every axis, None keeps each config's ``infer.mirror_axes``.
    ``backend`` (torch, torchscript, onnxruntime, openvino) runs the model's checked export instead of its
    weights (``model_file``, else the run's ``exports/``); ``precision`` bfloat16 for torch and openvino.

    One failing scan is recorded (``failures.csv``, merged with earlier runs' records) and the rest go on;
    a scan whose prediction would not fit in memory (``max_memory_gib``, see :mod:`medseg.inference.memory`)
    is refused before it is read. Existing masks are skipped unless ``overwrite``; masks are written
    atomically, so a killed run resumes where it stopped. Each scan is claimed first: scans another run on
    the folder is doing are left to it.
    ``output_format`` (auto, nifti, dicom-seg, both) chooses the files (:mod:`medseg.io.mask_writers`).

    ``statistics`` writes per-class statistics and QC flags (``statistics.csv`` / ``.json``, docs/qc.md);
    ``preview`` a ``<case_id>.preview.png`` per scan.

    While the network runs on one scan, the next is read and the previous one's outputs are written, in one
    background thread each (when the memory budget holds all three).
    """
    # Channel files CASE_0000, CASE_0001... are one scan each: the model's input channels come from its spec
    # (weights not read), so bad outputs are refused before the model is loaded. An unreadable model is
    # reported by the loader, after the outputs are checked.
    try:
        channels = model_channels(model) if predictor is None else predictor_channels(predictor)
    except CheckpointError:
        channels = 1
    batch = prepare_batch(inputs, output_dir, overwrite, channels=channels, statistics=statistics, preview=preview,
                          output_format=output_format, max_memory_gib=max_memory_gib)
    predictor = predictor or Predictor.from_checkpoint(model, device, mirror=mirror, backend=backend,
                                                       model_file=model_file, precision=precision)
    results: list[ScanOutcome | Future[ScanOutcome]] = []
    with ThreadPoolExecutor(1, "medseg-read") as reader, ThreadPoolExecutor(1, "medseg-write") as writer:
        ahead: tuple[Scan, Future[nib.Nifti1Image]] | None = None
        writing: tuple[Future[ScanOutcome], int] | None = None  # the last write job and the bytes it holds
        for index, scan in enumerate(tqdm(batch.scans, desc="predict", unit="scan", disable=None)):
            loaded = ahead[1] if ahead is not None and ahead[0] is scan else None
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
                    ahead = (following, reader.submit(load_for_prediction, predictor, following, batch))
            result = _predict(predictor, scan, batch, loaded, writer)
            if writing is not None:
                writing[0].result()  # at most one write pending: its memory stays bounded
                writing = None
            if isinstance(result, Future):
                writing = (result, size.scan_bytes + size.voxels if size is not None else 0)
            results.append(result)
    outcomes = [r.result() if isinstance(r, Future) else r for r in results]
    return finish_batch(batch, outcomes)
