"""The per-scan pipeline every face runs: read (memory estimate, channel grouping) -> predict -> statistics
and QC -> writers (each format alone) -> optional report.

``medseg predict`` (serial, with read-ahead and background writing), its Ray actors, the PACS path and the
service's workers all call :func:`predict_one` on a :class:`PredictBatch`; none re-assembles these steps.
A batch is made by :func:`medseg.inference.runner.prepare_batch`, which checks the inputs and outputs
before any work.

Outputs fail alone: a format whose writer fails (a DICOM-SEG of a series the encoder refuses, say) is
recorded in :attr:`ScanOutcome.output_failures` with its reason and its files removed, while the other
formats are still written. Only a failure of the format that marks the scan done (the NIfTI mask, when
written) fails the scan.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import nibabel as nib

from medseg.atomic import claim, temporaries
from medseg.data.labels import label_code
from medseg.errors import MedsegError, OutputError
from medseg.inference.memory import (
    MemoryBudget,
    ScanSize,
    keep_freed_memory,
    nifti_header_size,
    release_freed_memory,
    scan_size,
)
from medseg.inference.predictor import Predictor
from medseg.inference.statistics import ScanStatistics, assess_scan, merge_statistics
from medseg.inference.timing import StageTimes
from medseg.io.mask_writers import MaskWriter, ModelInfo, NiftiMaskWriter
from medseg.io.output_formats import NIFTI, done_suffix, formats_for, output_format
from medseg.io.scans import Scan, load_scan
from medseg.models.bundle import model_lesion_classes, model_modality

log = logging.getLogger(__name__)

#: The writers of one scan, grouped by output format: [(format name, writers)], the done-marker's last.
WriterGroups = list[tuple[str, list[MaskWriter]]]


class ScanReporter(Protocol):
    """Writes a scan's report beside its outputs (``medseg predict --report``, the service's report.json)."""

    def __call__(self, case_id: str, mask: nib.Nifti1Image, statistics: ScanStatistics | None,
                 output_dir: Path) -> Path: ...


@dataclass
class OutputFailure:
    """One output format of a scan that could not be written: the format, its file, the error and reason."""

    format: str
    path: Path
    error: str
    message: str


@dataclass
class ScanOutcome:
    """What happened to one scan: ``written``, ``skipped`` (mask present), ``claimed`` (another run's) or
    ``failed`` (with the error class and message). A written scan may still have ``output_failures``."""

    path: Path
    target: Path
    status: Literal["written", "skipped", "claimed", "failed"]
    error: str = ""
    message: str = ""
    qc_flags: list[str] = field(default_factory=list)
    output_failures: list[OutputFailure] = field(default_factory=list)
    #: Seconds per stage of this scan (StageTimes.as_record; plain data, so Ray actors can return it).
    times: dict[str, float] = field(default_factory=dict)


def output_path(output_dir: Path, scan: Scan, output_format: str = "auto") -> Path:
    """The file that marks a scan done: ``<case_id>.nii.gz``, or the main file of the last format when the
    NIfTI mask is not written (names come from files/folders, never DICOM tags)."""
    return Path(output_dir) / f"{scan.case_id}{done_suffix(output_format, scan.kind)}"


def identity(path: Path) -> tuple[int, int, int] | None:
    """What tells one version of a file from another: a rename or rewrite changes it.

    Not the device number: machines sharing a network file system (Ray workers on other nodes) may
    number its mount differently, while inode, mtime and size come from the file server.
    """
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def model_info(predictor: Predictor) -> ModelInfo | None:
    """The model as outputs describe it: bundle name and label table, each label with its coded concept;
    None for a stand-in predictor without a bundle (tests)."""
    bundle = getattr(predictor, "bundle", None)
    if bundle is None:
        return None
    spec = bundle.spec
    return ModelInfo(spec.name, tuple(label.model_copy(update={"code": label_code(label)}) for label in spec.labels),
                     weights_sha256=spec.provenance.weights_sha256 or "")


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
    #: ``--output-format``: a registered format, a comma list of them, or auto/both/all (medseg.io.output_formats).
    output_format: str = "auto"
    #: Memory cap for the process in GiB (None: ``$MEDSEG_MAX_MEMORY_GIB``, the cgroup limit, MemAvailable).
    max_memory_gib: float | None = None
    #: Writes ``<case_id>.report.json`` after the outputs (None: no report).
    reporter: ScanReporter | None = None
    _budget: MemoryBudget | None = field(default=None, repr=False)

    def target(self, scan: Scan) -> Path:
        return output_path(self.output_dir, scan, self.output_format)

    def writers(self, scan: Scan, predictor: Predictor) -> WriterGroups:
        """The writers of this batch's output formats for ``scan``, grouped by format; the last group writes
        :meth:`target`. A stand-in predictor without a bundle (no label table) gets the NIfTI mask alone."""
        names = formats_for(self.output_format, scan.kind)
        model = model_info(predictor)
        if model is None:
            if names[-1] != NIFTI:
                raise OutputError(f"{scan.path}: --output-format {self.output_format} needs the model's label table; "
                                  "this predictor has no bundle")
            return [(NIFTI, [NiftiMaskWriter()])]
        return [(name, output_format(name).writers(model)) for name in names]

    def output_suffixes(self, scan: Scan) -> list[str]:
        """Suffixes of every file this batch's formats write for ``scan`` (main files and sidecars)."""
        return [suffix for name in formats_for(self.output_format, scan.kind) for suffix in output_format(name).suffixes]

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


def write_outputs(scan: Scan, image: nib.Nifti1Image, mask: nib.Nifti1Image, target: Path,
                  groups: WriterGroups | None = None) -> list[OutputFailure]:
    """Write one scan's outputs beside ``target``, each atomically, format by format; the last group's last
    writer writes ``target``, which marks the scan done. ``image`` is the scan as read.

    A format that fails (before the last) is logged, its files removed (no stale file of an earlier run
    stays beside the new mask) and returned; the last format's failure raises. Default: the NIfTI mask only.
    """
    groups = list(groups) if groups is not None else [(NIFTI, [NiftiMaskWriter()])]
    failures: list[OutputFailure] = []
    for name, writers in groups[:-1]:
        paths = [w.path(target.parent, scan.case_id) for w in writers]
        try:
            for writer, path in zip(writers, paths, strict=True):
                writer.write(scan, image, mask, path)
        except Exception as exc:
            if not isinstance(exc, MedsegError):
                log.debug("%s output of %s failed", name, scan.case_id, exc_info=exc)
            log.warning("%s: the %s output failed (%s: %s); the other outputs are written", scan.case_id, name,
                        type(exc).__name__, exc)
            for path in paths:
                path.unlink(missing_ok=True)
            failures.append(OutputFailure(name, paths[-1], type(exc).__name__, str(exc)))
    name, writers = groups[-1]
    for writer in writers[:-1]:
        writer.write(scan, image, mask, writer.path(target.parent, scan.case_id))
    writers[-1].write(scan, image, mask, target)  # exactly ``target``, whatever its name
    return failures


def write_scan_preview(predictor: Predictor, scan: Scan, image: nib.Nifti1Image, mask: nib.Nifti1Image,
                       stats: ScanStatistics, batch: PredictBatch) -> None:
    """Write a scan's ``<case_id>.preview.png`` (:mod:`medseg.inference.preview`)."""
    from medseg.inference.preview import preview_path, write_preview  # matplotlib: only when asked

    bundle = predictor.bundle
    write_preview(preview_path(batch.output_dir, scan.case_id), image, mask, bundle.spec.labels, scan.case_id,
                  model_modality(bundle) if "modality_mismatch" not in stats.qc_flags else None,
                  model_lesion_classes(bundle), stats.all_flags)


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


def load_for_prediction(predictor: Predictor, scan: Scan, batch: PredictBatch,
                        times: StageTimes | None = None) -> nib.Nifti1Image:
    """Read a scan, refusing first (:class:`~medseg.errors.ScanTooLargeError`) one whose prediction would not
    fit in memory: NIfTI from the header before any voxel is read, DICOM once read, before predicting.
    ``times`` gets the seconds of the read (stage ``read``)."""
    size = header_size(predictor, scan)
    if size is not None:
        batch.memory().check(scan.path, size)
    with times.stage("read") if times is not None else nullcontext():
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
    outcome = predict_scan(predictor, scan, batch)
    assert isinstance(outcome, ScanOutcome)
    return outcome


def predict_scan(predictor: Predictor, scan: Scan, batch: PredictBatch, loaded: Future[nib.Nifti1Image] | None = None,
                 writer: ThreadPoolExecutor | None = None, times: StageTimes | None = None
                 ) -> ScanOutcome | Future[ScanOutcome]:
    """:func:`predict_one`, optionally with the scan already being read (``loaded``, its read timed into
    ``times``) and the outputs written by ``writer`` in the background: the claim on the mask then passes to
    the writing job, which releases it. ``times`` gets the seconds of every stage (medseg.inference.timing)."""
    keep_freed_memory()  # once per process: every face (CLI, Ray actor, service worker) predicts through here
    times = times if times is not None else StageTimes()
    target = batch.target(scan)
    if batch.done(scan):
        return ScanOutcome(scan.path, target, "skipped")
    held = claim(target)
    if held is None:
        return ScanOutcome(scan.path, target, "claimed")
    with ExitStack() as stack:
        stack.enter_context(held)
        if identity(target) != batch.at_start[scan.case_id]:
            return ScanOutcome(scan.path, target, "claimed")
        release_freed_memory()  # what earlier scans left free: kept within a scan, not piled up across scans
        try:
            groups = batch.writers(scan, predictor)
            for path in [target, *(w.path(target.parent, scan.case_id) for _, ws in groups for w in ws)]:
                for tmp in temporaries(path):  # a killed writer's; we hold the scan's claim, nobody writes them now
                    tmp.unlink(missing_ok=True)
            image = loaded.result() if loaded is not None else load_for_prediction(predictor, scan, batch, times)
            stats: ScanStatistics | None = None
            if not (batch.statistics or batch.preview):
                mask = predictor.predict_image(image, times=times)
            else:
                mask, uncertainty = predictor.predict_image(image, with_uncertainty=True, times=times)
                with times.stage("statistics"):
                    stats = assess_scan(scan.case_id, image, mask, predictor.bundle, uncertainty)
        except Exception as exc:
            return _failed(scan, target, exc)

        def write() -> ScanOutcome:
            try:
                with times.stage("write"):
                    if stats is not None and batch.statistics:
                        # Before the mask: a run killed in between redoes this scan (no mask yet) and replaces
                        # its row, so every mask present has its statistics.
                        merge_statistics(batch.output_dir, [stats])
                    failures = write_outputs(scan, image, mask, target, groups)
                    if stats is not None and batch.preview:
                        write_scan_preview(predictor, scan, image, mask, stats, batch)
                    if batch.reporter is not None:
                        batch.reporter(scan.case_id, mask, stats, batch.output_dir)
                log.debug("%s: %s", scan.case_id, times.describe())
                return ScanOutcome(scan.path, target, "written", qc_flags=stats.all_flags if stats else [],
                                   output_failures=failures, times=times.as_record())
            except Exception as exc:
                return _failed(scan, target, exc)

        if writer is None:
            return write()
        owned = stack.pop_all()

    def write_and_release() -> ScanOutcome:
        with owned:
            return write()

    return writer.submit(write_and_release)

