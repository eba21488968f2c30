"""Workers: load the model bundle once per process and run claimed jobs through ``medseg predict``'s pipeline.

Each job is one call of :func:`medseg.inference.pipeline.predict_one`, the per-scan pipeline ``medseg
predict``, its Ray actors and the PACS path run: the same memory estimate and refusal, channel grouping
(a multi-channel upload is one case), statistics and QC, writers (every format of the output-format
registry the scan can take, each failing alone) and report. Outputs are named ``scan<suffix>`` in the job's
``output/`` folder. A heartbeat thread renews the leases of running jobs; if this process dies, another (or
the restarted) server takes the job back (:mod:`medseg.serving.jobs`).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

from medseg.evaluation.scan_report import ReportOptions, ScanReportWriter, report_path
from medseg.inference.pipeline import predict_one
from medseg.inference.predictor import Predictor
from medseg.inference.runner import predictor_channels, prepare_batch
from medseg.io.output_formats import output_format
from medseg.serving.audit import AuditLog
from medseg.serving.jobs import Job, JobStatus, SqlJobStore, is_job_id, worker_identity
from medseg.serving.metrics import ServiceMetrics

log = logging.getLogger("medseg.serving")

INPUT = "input"
OUTPUT = "output"
#: The case id of every job's outputs: ``output/scan.nii.gz``, ``output/scan.seg.dcm``, ``output/scan.report.json``.
CASE_ID = "scan"


def job_dir(data_dir: Path, job_id: str) -> Path:
    """Where a job's upload and results live. Only a job id of ours (32 hex digits) becomes a path."""
    if not is_job_id(job_id):
        raise ValueError("not a job id (32 lower-case hex digits)")
    return Path(data_dir) / "jobs" / job_id


def input_paths(data_dir: Path, job: Job) -> list[Path]:
    """The stored scan of a job: a NIfTI file, the channel files of a multi-channel upload
    (``scan_0000.nii.gz``, ...), or the folder of an extracted DICOM series."""
    folder = job_dir(data_dir, job.id) / INPUT
    if job.input_kind == "dicom":
        return [folder / CASE_ID]
    return sorted(p for p in folder.iterdir() if p.name.startswith(CASE_ID) and p.name.endswith((".nii", ".nii.gz")))


def result_path(data_dir: Path, job_id: str, fmt: str) -> Path:
    """A job's file of output format ``fmt`` (its main file), or of the report for ``report``."""
    folder = job_dir(data_dir, job_id) / OUTPUT
    if fmt == "report":
        return report_path(folder, CASE_ID)
    return folder / f"{CASE_ID}{output_format(fmt).suffix}"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while piece := f.read(1 << 20):
            digest.update(piece)
    return digest.hexdigest()


class _JobFailed(Exception):
    """A job whose scan the pipeline returned as failed: its error class name and message."""

    def __init__(self, error: str, message: str):
        super().__init__(message)
        self.error = error


class WorkerPool:
    """``threads`` workers in this process sharing one loaded model; started by :meth:`start`."""

    def __init__(self, store: SqlJobStore, data_dir: Path, model: Path, device: str | None, threads: int,
                 metrics: ServiceMetrics, audit: AuditLog, poll_s: float = 0.5,
                 load: Callable[[Path, str | None], Predictor] | None = None, output_format: str = "all",
                 max_memory_gib: float | None = None):
        self.store = store
        #: ``medseg predict``'s ``--output-format`` and ``--max-memory-gib`` for every job.
        self.output_format = output_format
        self.max_memory_gib = max_memory_gib
        self.data_dir = Path(data_dir)
        self.model = Path(model)
        self.device = device
        self.threads = threads
        self.metrics = metrics
        self.audit = audit
        self.poll_s = poll_s
        self._load = load or (lambda path, device: Predictor.from_checkpoint(path, device))
        self.predictor: Predictor | None = None
        self.ready = threading.Event()
        self.load_error: str | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._running: dict[str, str] = {}  # job id -> owner, for the heartbeat
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        #: This pool in the store's replica table (``medseg_replicas``), beaten with the leases.
        self.replica_id = worker_identity()

    def start(self) -> None:
        """Load the model in the background, then start the worker and heartbeat threads."""
        t = threading.Thread(target=self._main, name="medseg-worker-main", daemon=True)
        t.start()
        self._threads.append(t)

    def wake(self) -> None:
        """A job was queued: stop waiting for the next poll."""
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop claiming; jobs still running after ``timeout`` s go back to the queue, their attempt unspent."""
        self._stop.set()
        self._wake.set()
        deadline = time.monotonic() + timeout
        for t in list(self._threads):
            t.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            running = dict(self._running)
        for job_id, owner in running.items():
            if self.store.release(job_id, owner):
                log.info("job released at shutdown", extra={"event": "job_released", "job_id": job_id})
        try:
            self.store.drop_replica(self.replica_id)
        except Exception:  # the store is down: the entry ages out after one lease
            pass

    def _main(self) -> None:
        try:
            self.predictor = self._load(self.model, self.device)
            self.reporter = ScanReportWriter(ReportOptions.from_bundle(self.predictor.bundle))
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.error("model could not be loaded", extra={"event": "model_load_failed", "error_class": type(exc).__name__})
            return
        bundle = self.predictor.bundle
        self.metrics.model.info({"name": bundle.spec.name, "weights_sha256": bundle.spec.provenance.weights_sha256 or "",
                                 "device": str(self.predictor.device), "labels": ",".join(bundle.label_names.values())})
        self.metrics.model_loaded.set(1)
        self.store.beat_replica(self.replica_id)
        self.ready.set()
        log.info("model loaded", extra={"event": "model_loaded", "device": str(self.predictor.device)})
        workers = [threading.Thread(target=self._loop, name=f"medseg-worker-{i}", daemon=True) for i in range(self.threads)]
        beat = threading.Thread(target=self._heartbeat, name="medseg-heartbeat", daemon=True)
        self._threads += [*workers, beat]
        for t in (*workers, beat):
            t.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.store.lease_s / 3):
            try:
                self.store.beat_replica(self.replica_id)
            except Exception:
                log.warning("replica heartbeat failed", extra={"event": "replica_beat_failed"})
            with self._lock:
                running = dict(self._running)
            for job_id, owner in running.items():
                try:
                    self.store.renew(job_id, owner)
                except Exception:  # a busy store now and then: the next beat renews
                    log.warning("lease renewal failed", extra={"event": "lease_renew_failed", "job_id": job_id})

    def run_one(self, owner: str, job_id: str | None = None) -> str | None:
        """Claim the oldest queued job (or ``job_id``, when it is still queued) and run it; its id, or None
        when there was nothing to claim. Used by the worker threads and by Ray Serve replicas."""
        try:
            model = self.reporter.options.model or {}
            job = self.store.claim(owner, model.get("name"), model.get("weights_sha256"), job_id=job_id)
        except Exception:
            log.exception("claiming a job failed", extra={"event": "claim_failed"})
            return None
        if job is None:
            return None
        self.run_job(job, owner)
        return job.id

    def _loop(self) -> None:
        owner = worker_identity()
        while not self._stop.is_set():
            if self.run_one(owner) is None:
                self._wake.wait(self.poll_s)
                self._wake.clear()

    def _cancelled_or_lost(self, job: Job) -> str:
        """The store refused this worker's outcome. When its owner deleted the job meanwhile, remove what
        this worker wrote (the DELETE removed the rest): ``cancelled``; else another attempt owns it."""
        current = self.store.get(job.id)
        if current is not None and current.status == JobStatus.DELETED:
            shutil.rmtree(job_dir(self.data_dir, job.id), ignore_errors=True)
            return "cancelled"
        return "lease_lost"

    def run_job(self, job: Job, owner: str) -> None:
        """Predict one claimed job; record done or failed (error class and message for its owner)."""
        assert self.predictor is not None
        with self._lock:
            self._running[job.id] = owner
        started = time.monotonic()
        folder = job_dir(self.data_dir, job.id)
        log.info("job started", extra={"event": "job_started", "job_id": job.id, "attempt": job.attempts})
        try:
            # medseg predict's own per-scan pipeline: the job writes what a predict run would for this scan.
            batch = prepare_batch(input_paths(self.data_dir, job), folder / OUTPUT, overwrite=True,
                                  channels=predictor_channels(self.predictor), output_format=self.output_format,
                                  max_memory_gib=self.max_memory_gib, reporter=self.reporter, case_id=CASE_ID)
            outcome = predict_one(self.predictor, batch.scans[0], batch)
            for failure in outcome.output_failures:  # the job is done; that format's route answers 404
                log.warning("job output failed", extra={"event": "job_output_failed", "job_id": job.id,
                                                        "format": failure.format, "error_class": failure.error})
            if outcome.status != "written":
                raise _JobFailed(outcome.error or outcome.status, outcome.message)
            digest = file_sha256(outcome.target)
            ok = self.store.complete(job.id, owner, digest)
            result, error_class = ("done", None) if ok else (self._cancelled_or_lost(job), None)
        except Exception as exc:
            error_class = exc.error if isinstance(exc, _JobFailed) else type(exc).__name__
            # The message goes to the job's owner only; our own storage paths are not theirs to see.
            message = str(exc).replace(str(folder / INPUT / CASE_ID), "scan").replace(str(folder), "job")
            result = "failed" if self.store.fail(job.id, owner, error_class, message) else self._cancelled_or_lost(job)
            digest = None
            self.metrics.failures.labels(error_class).inc()
        finally:
            with self._lock:
                self._running.pop(job.id, None)
        duration = time.monotonic() - started
        self.metrics.job_duration.observe(duration)
        self.metrics.jobs_finished.labels(result).inc()
        self.audit.record("job_finished", job.token_id, job.id, result, input_sha256=job.input_sha256,
                          result_sha256=digest)
        log.info("job finished", extra={"event": "job_finished", "job_id": job.id, "result": result,
                                        "error_class": error_class, "duration_s": round(duration, 3)})
