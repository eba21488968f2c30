"""The ASGI app (FastAPI): submit a scan, poll its job, fetch the mask and the report; health and metrics.

An upload is checked completely before it becomes a job (size while streaming, content sniffed, zip
extracted safely, the scan read through medseg's scan checks), so a bad request is answered at once with
its status and leaves nothing behind; a job only fails for reasons found while predicting. Jobs belong to
the token that submitted them: another token gets 404 for them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.middleware.cors import CORSMiddleware

from medseg.errors import MedsegError
from medseg.io.output_formats import OutputFormat, routed_formats
from medseg.io.scans import load_volume
from medseg.models.bundle import read_bundle_spec
from medseg.serving.audit import AuditLog
from medseg.serving.auth import RateLimiter, TokenSet
from medseg.serving.jobs import (
    ACTIVE,
    Job,
    JobStatus,
    QueueFull,
    SqlJobStore,
    is_job_id,
    new_job_id,
    open_job_store,
)
from medseg.serving.lifecycle import Retention, remove_job_files, storage
from medseg.serving.metrics import CONTENT_TYPE_LATEST, ServiceMetrics
from medseg.serving.uploads import FIELD, UploadError, ZipLimits, extract_zip, receive_scan, sniff
from medseg.serving.worker import INPUT, WorkerPool, job_dir, result_path

log = logging.getLogger("medseg.serving")

MiB = 1024 * 1024
LOCAL_TOKEN_ID = "insecure-local"


@dataclass
class ServeSettings:
    """Everything the service is configured with (the CLI fills it from ``medseg serve`` options)."""

    model: Path
    data_dir: Path
    tokens: TokenSet = field(default_factory=lambda: TokenSet([]))
    insecure_local: bool = False
    max_queue: int = 64
    max_upload_bytes: int = 512 * MiB
    #: Cap on a scan once decompressed (zip contents, and the voxel array read to check it), bytes.
    max_scan_bytes: int = 4096 * MiB
    workers: int = 1
    device: str | None = "auto"
    rate_per_minute: float = 120.0
    request_timeout_s: float = 300.0
    #: Seconds past ``request_timeout_s`` after which any request not yet answered gets 504.
    response_grace_s: float = 30.0
    cors_origins: list[str] = field(default_factory=list)
    lease_s: float = 30.0
    poll_s: float = 0.5
    #: Uploads read through the scan checks at once (each holds one scan in memory).
    max_concurrent_checks: int = 2
    #: ``medseg predict``'s ``--output-format`` for every job (all: every format the upload can take).
    output_format: str = "all"
    #: ``medseg predict``'s ``--max-memory-gib`` (None: ``$MEDSEG_MAX_MEMORY_GIB``, the cgroup limit, MemAvailable).
    max_memory_gib: float | None = None
    #: Seconds now, for the job store's leases (UNIX time) and the rate limiter; None: the real clocks.
    #: Tests pass one they advance by hand, so nothing waits on the wall clock.
    clock: Callable[[], float] | None = None
    #: ``--job-store``: None for SQLite in ``data_dir``, or a ``postgresql://`` URL shared by machines.
    job_store: str | None = None
    #: ``--retention-hours`` / ``--result-retention-hours``: remove a finished job's upload / results this
    #: many hours after it finished (None: keep until DELETE).
    retention_hours: float | None = None
    result_retention_hours: float | None = None
    #: ``--ray``: the jobs run on Ray Serve replicas (medseg.serving.ray_serve.RayScaling), not in this process.
    ray: Any = None
    #: Seconds between two retention rounds (each replica runs them; a round is idempotent).
    purge_interval_s: float = 60.0


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class _ObserveMiddleware:
    """Pure ASGI: request metrics and one JSON log line per request, and a deadline on the handler."""

    def __init__(self, app: Callable, metrics: ServiceMetrics, timeout_s: float):
        self.app = app
        self.metrics = metrics
        self.timeout_s = timeout_s

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500, "sent": False}

        async def observed_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                status["sent"] = True
            await send(message)

        try:
            async with asyncio.timeout(self.timeout_s):
                await self.app(scope, receive, observed_send)
        except TimeoutError:
            if not status["sent"]:
                await _error(504, f"request not answered within {self.timeout_s:g} s")(scope, receive, observed_send)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            duration = time.perf_counter() - started
            self.metrics.requests.labels(route, scope["method"], str(status["code"])).inc()
            self.metrics.latency.labels(route).observe(duration)
            state = scope.get("state") or {}
            log.info("request", extra={"event": "request", "method": scope["method"], "route": route,
                                       "status": status["code"], "duration_ms": round(duration * 1000, 2),
                                       "token_id": state.get("token_id"), "job_id": state.get("job_id")})


def _clean_incoming(data_dir: Path, store: SqlJobStore, older_than_s: float) -> None:
    """Remove what a killed server left half-received: staged uploads, and job folders whose row was never
    written. Only entries older than ``older_than_s``: a live replica may be receiving younger ones."""
    now = time.time()
    incoming = data_dir / "incoming"
    stale = list(incoming.iterdir()) if incoming.is_dir() else []
    jobs = data_dir / "jobs"
    stale += [d for d in (jobs.iterdir() if jobs.is_dir() else []) if not is_job_id(d.name) or store.get(d.name) is None]
    for entry in stale:
        try:
            if now - entry.stat().st_mtime > older_than_s:
                shutil.rmtree(entry, ignore_errors=True)
        except FileNotFoundError:
            pass


def job_id_of(path: Path) -> str:
    """The job id of a file in a job's folder (``jobs/<id>/output/<file>``): downloads are named by it."""
    return path.parent.parent.name


def _model_channels(model: Path) -> int | None:
    """The served model's input channels, from its bundle spec alone (None when unreadable: the worker
    pool reports the model's error through /readyz)."""
    try:
        return read_bundle_spec(Path(model)).network.in_channels
    except MedsegError:
        return None


def _store_upload(parts: list[Path], inputs: Path, zip_limits: ZipLimits) -> tuple[str, list[Path]]:
    """Lay an upload's parts out as the job's input (the case is named ``scan``): one NIfTI as ``scan.nii[.gz]``,
    several as channel files ``scan_0000.nii.gz``..., a zip of a DICOM series as the folder ``scan/``, a zip of
    channel files as ``scan_XXXX.nii.gz``. The input kind (``nifti``, ``nifti-gz``, ``dicom``) and the files."""
    kinds = [sniff(part) for part in parts]
    inputs.mkdir()
    if "zip" in kinds:
        if len(parts) > 1:
            raise UploadError(400, "a zip must be the only 'scan' field of an upload")
        layout = extract_zip(parts[0], inputs, zip_limits)
        parts[0].unlink()
        if layout == "dicom":
            return "dicom", [inputs / "scan"]
        files = sorted(inputs.iterdir())
        kinds = [sniff(f) for f in files]
        if "zip" in kinds:
            raise UploadError(415, "a channel file in the zip is not a NIfTI image")
        return ("nifti-gz" if "nifti-gz" in kinds else "nifti"), files
    files = []
    for i, (part, kind) in enumerate(zip(parts, kinds, strict=True)):
        stem = "scan" if len(parts) == 1 else f"scan_{i:04d}"
        files.append(inputs / f"{stem}{'.nii.gz' if kind == 'nifti-gz' else '.nii'}")
        part.rename(files[-1])
    return ("nifti-gz" if "nifti-gz" in kinds else "nifti"), files


def create_app(settings: ServeSettings, start_workers: bool = True) -> FastAPI:
    """The service's app. ``start_workers`` False serves the API only (another process runs the jobs)."""
    data_dir = Path(settings.data_dir)
    # It will hold patient scans: a new data folder is the service user's alone.
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    store = open_job_store(settings.job_store, data_dir, lease_s=settings.lease_s, clock=settings.clock or time.time)
    audit = AuditLog(data_dir / "audit.log")
    metrics = ServiceMetrics(store.counts, storage=lambda: storage(data_dir), purged=store.purged_counts,
                             replicas=store.live_replicas)
    retention = Retention(store, data_dir, settings.retention_hours, settings.result_retention_hours)
    limiter = RateLimiter(settings.rate_per_minute, clock=settings.clock or time.monotonic)
    use_ray = settings.ray is not None and start_workers
    pool = WorkerPool(store, data_dir, settings.model, settings.device, settings.workers, metrics, audit,
                      poll_s=settings.poll_s, output_format=settings.output_format,
                      max_memory_gib=settings.max_memory_gib) if settings.workers > 0 and start_workers and not use_ray else None
    channels = _model_channels(settings.model)
    ray_state: dict[str, Any] = {}
    checks = anyio.Semaphore(settings.max_concurrent_checks)
    zip_limits = ZipLimits(max_bytes=settings.max_scan_bytes)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        _clean_incoming(data_dir, store, older_than_s=2 * settings.request_timeout_s)
        taken_back = store.recover()
        if taken_back:
            log.warning("jobs of dead workers taken back", extra={"event": "jobs_recovered", "count": len(taken_back)})
        if pool is not None:
            pool.start()
        if use_ray:
            from medseg.serving import ray_serve

            handle, started = await run_in_threadpool(ray_serve.deploy, settings.ray, settings.model, data_dir,
                                                      settings.job_store, settings.lease_s, settings.device,
                                                      settings.output_format, settings.max_memory_gib)
            dispatcher = ray_serve.RayDispatcher(store, handle, max_inflight=settings.max_queue, poll_s=settings.poll_s)
            dispatcher.start()
            ray_state.update(dispatcher=dispatcher, started=started)
        if retention.enabled:
            retention.start(settings.purge_interval_s)
        yield
        retention.stop()
        if pool is not None:
            pool.stop()
        if ray_state:
            ray_state["dispatcher"].stop()
            await run_in_threadpool(ray_serve.shutdown, ray_serve.app_name(data_dir, settings.job_store),
                                    ray_state["started"])

    app = FastAPI(title="medseg", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.settings, app.state.store, app.state.pool, app.state.audit, app.state.metrics = (
        settings, store, pool, audit, metrics)
    app.state.retention = retention
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type"])

    def authenticate(request: Request) -> str | JSONResponse:
        """The caller's token id, or the 401/429 response to send."""
        if len(settings.tokens) == 0 and settings.insecure_local:
            tid = LOCAL_TOKEN_ID
        else:
            tid = settings.tokens.identify(request.headers.get("authorization"))
            if tid is None:
                return _error(401, "missing or invalid bearer token", {"WWW-Authenticate": 'Bearer realm="medseg"'})
        request.state.token_id = tid
        allowed, wait_s = limiter.allow(tid)
        if not allowed:
            return _error(429, "rate limit exceeded", {"Retry-After": str(max(1, round(wait_s)))})
        return tid

    def own_job(request: Request, job_id: str, tid: str):
        # Anything but one of our ids is "no such job" before it reaches the store or the file system.
        if not is_job_id(job_id):
            return None
        request.state.job_id = job_id
        job = store.get(job_id)
        return job if job is not None and job.token_id == tid else None

    @app.post("/v1/segmentations", status_code=202)
    async def submit(request: Request) -> Response:
        tid = authenticate(request)
        if isinstance(tid, Response):
            return tid
        counts = await run_in_threadpool(store.counts)
        if sum(counts[s] for s in ACTIVE) >= settings.max_queue:
            metrics.rejected.labels("429").inc()
            return _error(429, f"queue full ({settings.max_queue} jobs); retry later", {"Retry-After": "30"})
        job_id = new_job_id()
        staging = data_dir / "incoming" / job_id
        staging.mkdir(parents=True)
        try:
            size, sha, parts = await receive_scan(request.stream(), request.headers.get("content-type"),
                                                  request.headers.get("content-length"), staging,
                                                  settings.max_upload_bytes, settings.request_timeout_s)
            kind, files = await run_in_threadpool(_store_upload, parts, staging / INPUT, zip_limits)
            if channels is not None and len(files) != channels:
                raise UploadError(400, f"the model takes {channels} input channel(s); this upload holds {len(files)} "
                                       f"scan(s): send one '{FIELD}' field per channel, in channel order (or a zip of "
                                       "CASE_0000.nii.gz, CASE_0001.nii.gz, ...)")
            async with checks:
                try:
                    await run_in_threadpool(lambda: load_volume(files if len(files) > 1 else files[0],
                                                                max_bytes=settings.max_scan_bytes))
                except MedsegError as exc:
                    message = str(exc)
                    for path in files:
                        message = message.replace(str(path), path.name)
                    raise UploadError(400, f"not a usable scan: {message}") from None
            target = job_dir(data_dir, job_id)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(staging, target)
            try:
                await run_in_threadpool(store.submit, job_id, tid, kind, sha, settings.max_queue)
            except QueueFull:
                shutil.rmtree(target, ignore_errors=True)
                raise UploadError(429, f"queue full ({settings.max_queue} jobs); retry later") from None
        except UploadError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            metrics.rejected.labels(str(exc.status)).inc()
            audit.record("submit", tid, None, f"rejected_{exc.status}")
            headers = {"Retry-After": "30"} if exc.status == 429 else None
            return _error(exc.status, exc.message, headers)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        request.state.job_id = job_id
        audit.record("submit", tid, job_id, "queued", input_sha256=sha)
        log.info("job queued", extra={"event": "job_queued", "job_id": job_id, "token_id": tid, "bytes": size,
                                      "input_kind": kind})
        if pool is not None:
            pool.wake()
        if ray_state:
            ray_state["dispatcher"].wake()
        return JSONResponse({"job_id": job_id, "status": "queued", "links": {
            "self": f"/v1/jobs/{job_id}", **{f.route: f"/v1/jobs/{job_id}/{f.route}" for f in routed_formats()
                                             if f.accepts(kind)}, "report": f"/v1/jobs/{job_id}/report"}},
            status_code=202, headers={"Location": f"/v1/jobs/{job_id}"})

    async def authorised_job(request: Request, job_id: str) -> tuple[Job, str] | Response:
        """The caller's job and token id, or the response refusing the request (401/429, or 404)."""
        tid = authenticate(request)
        if isinstance(tid, Response):
            return tid
        job = await run_in_threadpool(own_job, request, job_id, tid)
        return _error(404, "no such job") if job is None else (job, tid)

    @app.get("/v1/jobs/{job_id}")
    async def job_status(request: Request, job_id: str) -> Response:
        found = await authorised_job(request, job_id)
        return found if isinstance(found, Response) else JSONResponse(found[0].public())

    async def _result(request: Request, job_id: str, name: str, respond: Callable[[Path], Response]) -> Response:
        found = await authorised_job(request, job_id)
        if isinstance(found, Response):
            return found
        job, tid = found
        if job.status == JobStatus.DELETED or (job.status == JobStatus.DONE and job.results_purged is not None):
            gone = "deleted by its owner" if job.status == JobStatus.DELETED else "removed by the retention period"
            return JSONResponse({"error": f"the job's results were {gone}", **job.public()}, status_code=410)
        if job.status != JobStatus.DONE:
            return JSONResponse({"error": f"job is {job.status}, not done", **job.public()}, status_code=409)
        response = await run_in_threadpool(respond, result_path(data_dir, job_id, name))
        outcome = "ok" if response.status_code == 200 else f"rejected_{response.status_code}"
        audit.record(f"fetch_{name}", tid, job_id, outcome, result_sha256=job.mask_sha256)
        return response

    def add_result_route(fmt: OutputFormat) -> None:
        """``GET /v1/jobs/{id}/<route>``: the job's file of one output format (the output-format registry)."""

        def respond(path: Path) -> Response:
            if not path.is_file():
                why = ("its upload was not a DICOM series" if fmt.needs_dicom else "it was not written")
                extra = f" (or the server lacks {fmt.requires_module}: pip install 'medseg[{fmt.extra}]')" \
                    if fmt.requires_module else ""
                return _error(404, f"this job has no {fmt.name} output: {why}{extra}, or writing it failed "
                                   "(see the service log)")
            return FileResponse(path, media_type=fmt.media_type, filename=f"{job_id_of(path)}{fmt.suffix}")

        async def job_result(request: Request, job_id: str) -> Response:
            return await _result(request, job_id, fmt.name, respond)

        app.add_api_route(f"/v1/jobs/{{job_id}}/{fmt.route}", job_result, methods=["GET"], name=f"job_{fmt.route}")

    for fmt in routed_formats():
        add_result_route(fmt)

    @app.get("/v1/jobs/{job_id}/report")
    async def job_report(request: Request, job_id: str) -> Response:
        def respond(path: Path) -> Response:
            return JSONResponse(json.loads(path.read_text(encoding="utf-8")))

        return await _result(request, job_id, "report", respond)

    @app.delete("/v1/jobs/{job_id}")
    async def delete_job(request: Request, job_id: str) -> Response:
        """Cancel the job if it is queued or running, remove its upload and every result; the record keeps
        only ids, times and hashes. Deleting a deleted job again is a no-op (204)."""
        found = await authorised_job(request, job_id)
        if isinstance(found, Response):
            return found
        job, tid = found
        before = await run_in_threadpool(store.delete, job_id)
        await run_in_threadpool(remove_job_files, data_dir, job_id)
        outcome = "already_deleted" if before is None or before.status == JobStatus.DELETED else f"deleted_{before.status}"
        audit.record("delete", tid, job_id, outcome, input_sha256=job.input_sha256, result_sha256=job.mask_sha256)
        log.info("job deleted", extra={"event": "job_deleted", "job_id": job_id, "token_id": tid, "outcome": outcome})
        return Response(status_code=204)

    @app.get("/v1/jobs")
    async def list_jobs(request: Request, limit: int = 50, after: str | None = None) -> Response:
        """The caller's jobs, newest first; ``after`` (a job id from the previous page) pages on."""
        tid = authenticate(request)
        if isinstance(tid, Response):
            return tid
        if not 1 <= limit <= 500:
            return _error(400, "limit must be 1 to 500")
        previous = None
        if after is not None:
            previous = await run_in_threadpool(store.get, after) if is_job_id(after) else None
            if previous is None or previous.token_id != tid:
                return _error(400, "after: not one of your job ids")
        jobs = await run_in_threadpool(store.list_for, tid, limit, previous)
        more = len(jobs) == limit
        return JSONResponse({"jobs": [j.public() for j in jobs],
                             "next": f"/v1/jobs?limit={limit}&after={jobs[-1].id}" if more else None})

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> Response:
        try:
            await run_in_threadpool(store.counts)
        except Exception as exc:
            return _error(503, f"job store unavailable ({type(exc).__name__})")
        if pool is not None and not pool.ready.is_set():
            reason = "model failed to load" if pool.load_error else "model loading"
            return _error(503, reason)
        if use_ray and not ray_state:
            return _error(503, "ray serve deployment starting")
        return JSONResponse({"status": "ready", "workers": settings.workers if pool is not None else 0,
                             "replicas": await run_in_threadpool(store.live_replicas)})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(await run_in_threadpool(metrics.render), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(_ObserveMiddleware, metrics=metrics, timeout_s=settings.request_timeout_s + settings.response_grace_s)
    return app
