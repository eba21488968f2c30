"""Workers: load the model bundle once per process and run claimed jobs through ``medseg predict``'s pipeline.

Each job runs what ``medseg predict`` runs for one scan (``find_scans``, ``load_scan``,
:meth:`Predictor.predict_image`, the runner's ``write_outputs``) on the stored upload, and a report built from
medseg.evaluation's volume and lesion functions. A heartbeat thread renews the leases of running jobs;
if this process dies, another (or the restarted) server takes the job back (:mod:`medseg.serving.jobs`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from medseg.atomic import write_text_atomic
from medseg.evaluation.lesions import find_lesions
from medseg.evaluation.metrics import voxel_spacing, voxel_volume_ml
from medseg.inference.predictor import Predictor
from medseg.inference.runner import model_info, write_outputs
from medseg.inference.statistics import ScanStatistics, assess_scan
from medseg.io.mask_writers import DicomSegWriter, MaskWriter, NiftiMaskWriter, seg_available
from medseg.io.scans import Scan, find_scans, load_scan
from medseg.serving.audit import AuditLog
from medseg.serving.jobs import Job, JobStatus, SqlJobStore, is_job_id, worker_identity
from medseg.serving.metrics import ServiceMetrics

log = logging.getLogger("medseg.serving")

MASK = "mask.nii.gz"
REPORT = "report.json"
#: The DICOM Segmentation of a DICOM upload (when highdicom is installed: ``medseg[dicom]``).
SEG = "segmentation.dcm"
INPUT = "input"


def job_dir(data_dir: Path, job_id: str) -> Path:
    """Where a job's upload, mask and report live. Only a job id of ours (32 hex digits) becomes a path."""
    if not is_job_id(job_id):
        raise ValueError("not a job id (32 lower-case hex digits)")
    return Path(data_dir) / "jobs" / job_id


def input_path(data_dir: Path, job: Job) -> Path:
    """The stored scan of a job: a NIfTI file or the folder of an extracted DICOM series."""
    folder = job_dir(data_dir, job.id) / INPUT
    return folder / {"nifti": "scan.nii", "nifti-gz": "scan.nii.gz", "dicom": "dicom"}[job.input_kind]


class _JobSegWriter(DicomSegWriter):
    """The SEG under the job folder's fixed name (``segmentation.dcm``), whatever the scan's case id."""

    def path(self, output_dir: Path, case_id: str) -> Path:
        return Path(output_dir) / SEG


def job_writers(scan: Scan, predictor: Predictor) -> list[MaskWriter]:
    """A job's outputs: the NIfTI mask, and before it a DICOM-SEG for a DICOM upload (highdicom installed),
    as ``medseg predict --output-format auto`` writes them."""
    info = model_info(predictor)
    if scan.kind == "dicom" and info is not None and seg_available():
        return [_JobSegWriter(info), NiftiMaskWriter()]
    return [NiftiMaskWriter()]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while piece := f.read(1 << 20):
            digest.update(piece)
    return digest.hexdigest()


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
    def from_predictor(cls, predictor: Predictor) -> ReportOptions:
        """The model config's ``evaluate`` lesion settings; every foreground class when it names none."""
        evaluate = predictor.bundle.config.evaluate
        names = dict(predictor.label_names)
        classes = list(evaluate.lesion_classes) or [k for k in sorted(names) if k != 0]
        spec = predictor.bundle.spec
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


class WorkerPool:
    """``threads`` workers in this process sharing one loaded model; started by :meth:`start`."""

    def __init__(self, store: SqlJobStore, data_dir: Path, model: Path, device: str | None, threads: int,
                 metrics: ServiceMetrics, audit: AuditLog, poll_s: float = 0.5,
                 load: Callable[[Path, str | None], Predictor] | None = None):
        self.store = store
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
            self.report_options = ReportOptions.from_predictor(self.predictor)
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
            model = self.report_options.model or {}
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
        source = input_path(self.data_dir, job)
        log.info("job started", extra={"event": "job_started", "job_id": job.id, "attempt": job.attempts})
        try:
            # The scan record, the reader and the writer are medseg predict's own (find_scans, load_scan,
            # write_outputs), so the service writes what a predict run would for this scan.
            scan = find_scans([source])[0]
            image = load_scan(scan)
            mask, uncertainty = self.predictor.predict_image(image, with_uncertainty=True)
            statistics = assess_scan("scan", image, mask, self.predictor.bundle, uncertainty)
            write_outputs(scan, image, mask, folder / MASK, job_writers(scan, self.predictor))
            report = segmentation_report(mask, self.report_options, statistics)
            write_text_atomic(folder / REPORT, json.dumps(report, indent=1, allow_nan=False) + "\n")
            digest = file_sha256(folder / MASK)
            ok = self.store.complete(job.id, owner, digest)
            result, error_class = ("done", None) if ok else (self._cancelled_or_lost(job), None)
        except Exception as exc:
            error_class = type(exc).__name__
            # The message goes to the job's owner only; our own storage paths are not theirs to see.
            message = str(exc).replace(str(source), "scan").replace(str(folder), "job")
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
