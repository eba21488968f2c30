"""``medseg serve --ray``: the job runners as a Ray Serve deployment whose replicas Ray's autoscaler adds
as the backlog grows and removes when idle.

The HTTP API stays the FastAPI app on uvicorn in this process (same routes, tokens, limits, audit,
metrics); it runs no worker threads. A dispatcher thread sends one Serve request per queued job to the
deployment, so the deployment's ongoing requests *are* the backlog, which is what Ray Serve's autoscaler
scales on (``target_ongoing_requests`` 1: one replica per job, up to ``--max-replicas``). A replica loads
the model once (:class:`~medseg.serving.worker.WorkerPool` without worker threads) and runs the job it is
sent through the store's claim, so leases, retries and the audit are the single-process service's.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medseg.errors import MedsegError
from medseg.serving.jobs import SqlJobStore, open_job_store, worker_identity

log = logging.getLogger("medseg.serving")

APP_PREFIX = "medseg"


def app_name(data_dir: Path, job_store: str | None) -> str:
    """The Serve application of one service: named for its data folder and store, so two services joining
    one Ray cluster never replace each other's replicas (all replicas of one service share it)."""
    key = f"{Path(data_dir).resolve()}|{job_store or ''}"
    return f"{APP_PREFIX}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


@dataclass(frozen=True)
class RayScaling:
    """Where and how the replicas run, and the autoscaling settings (docs/serving.md, "Elastic replicas")."""

    address: str = "auto"
    min_replicas: int = 1
    max_replicas: int = 2
    cpus_per_replica: int = 1
    #: Seconds the backlog must call for more replicas before one is added.
    upscale_delay_s: float = 5.0
    #: Seconds of lower demand before a replica is removed: with the 10 s look-back an idle extra replica
    #: goes within about 70 s of the last job, under the 2 minutes promised.
    downscale_delay_s: float = 60.0
    look_back_period_s: float = 10.0
    metrics_interval_s: float = 2.0

    def autoscaling_config(self) -> dict[str, Any]:
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise MedsegError(f"--min-replicas {self.min_replicas} / --max-replicas {self.max_replicas}: need "
                              "0 <= min <= max and max >= 1")
        return {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                "initial_replicas": max(1, self.min_replicas), "target_ongoing_requests": 1,
                "upscale_delay_s": self.upscale_delay_s, "downscale_delay_s": self.downscale_delay_s,
                "look_back_period_s": self.look_back_period_s, "metrics_interval_s": self.metrics_interval_s}


class JobRunner:
    """One replica: the model loaded once; each request runs one job (by id) through the store's claim."""

    def __init__(self, model: str, data_dir: str, job_store: str | None, lease_s: float, device: str,
                 output_format: str = "all", max_memory_gib: float | None = None):
        from medseg.serving.audit import AuditLog
        from medseg.serving.metrics import ServiceMetrics
        from medseg.serving.worker import WorkerPool

        store = open_job_store(job_store, Path(data_dir), lease_s)
        self.pool = WorkerPool(store, Path(data_dir), Path(model), device, 0, ServiceMetrics(store.counts),
                               AuditLog(Path(data_dir) / "audit.log"), output_format=output_format,
                               max_memory_gib=max_memory_gib)
        self.pool.start()
        while not self.pool.ready.is_set() and self.pool.load_error is None:
            self.pool.ready.wait(0.1)
        if self.pool.load_error is not None:
            raise MedsegError(f"the model could not be loaded: {self.pool.load_error}")

    async def __call__(self, job_id: str) -> str | None:
        # In a thread: the replica's event loop keeps answering Serve's health checks meanwhile.
        return await asyncio.to_thread(self.pool.run_one, worker_identity(), job_id)

    def __del__(self) -> None:  # Serve calls it when it removes the replica: leave the replica table
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.stop()


class RayDispatcher:
    """In the API process: one Serve request per queued job (at most ``max_inflight`` at once), and the
    store's recovery of dead replicas' jobs (leases run out) so they are queued and sent again."""

    def __init__(self, store: SqlJobStore, handle: Any, max_inflight: int, poll_s: float = 0.5):
        self.store = store
        self.handle = handle
        self.poll_s = poll_s
        self._max = max_inflight
        #: Seconds a job whose request failed waits before it is sent again.
        self._retry_s = max(5.0, poll_s)
        self._inflight: dict[str, Future] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._executor = ThreadPoolExecutor(max_workers=max_inflight, thread_name_prefix="medseg-dispatch")
        self._thread = threading.Thread(target=self._loop, name="medseg-dispatcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(5.0)
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _send(self, job_id: str) -> None:
        failed = False
        try:
            self.handle.remote(job_id).result()
        except Exception as exc:  # a replica died mid-job: its lease runs out, the job is queued and sent again
            failed = True
            log.warning("replica request failed", extra={"event": "replica_request_failed", "job_id": job_id,
                                                         "error_class": type(exc).__name__})
            # Not at once: while Serve replaces a dead replica, requests can fail as fast as they are sent.
            self._stop.wait(self._retry_s)
        finally:
            with self._lock:
                self._inflight.pop(job_id, None)
            if not failed:
                self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.store.recover()
                for job_id in self.store.queued_ids(self._max):
                    with self._lock:
                        if job_id in self._inflight or len(self._inflight) >= self._max:
                            continue
                        self._inflight[job_id] = self._executor.submit(self._send, job_id)
            except Exception:
                log.exception("dispatching jobs failed", extra={"event": "dispatch_failed"})
            self._wake.wait(self.poll_s)
            self._wake.clear()


def deploy(scaling: RayScaling, model: Path, data_dir: Path, job_store: str | None, lease_s: float,
           device: str | None, output_format: str = "all", max_memory_gib: float | None = None) -> tuple[Any, bool]:
    """Connect to Ray (``auto``: this machine's cluster or a new local one), deploy the job runners;
    the deployment handle and whether this call started a local cluster."""
    from medseg.inference.ray_runner import connect, plan_actors

    started = connect(scaling.address)
    # A deployment handle's background thread (Serve's metrics push) that outlives the cluster would call
    # ray.init() on its own and start a new local cluster in this process: this process only ever joins the
    # cluster named by --ray (RAY_ENABLE_AUTO_CONNECT=0 does the same, read once when Ray is imported).
    from ray._private import auto_init_hook

    auto_init_hook.enable_auto_connect = False
    try:
        from ray import serve
    except ImportError:
        raise MedsegError("--ray needs Ray Serve: pip install 'medseg[ray]'") from None
    import ray

    plan = plan_actors(ray.cluster_resources(), device, scaling.max_replicas, scaling.cpus_per_replica,
                       scaling.max_replicas)
    serve.start(proxy_location="Disabled")  # HTTP is our FastAPI app; Serve only runs the replicas
    runner = serve.deployment(
        JobRunner, name="medseg_jobs", max_ongoing_requests=1, autoscaling_config=scaling.autoscaling_config(),
        ray_actor_options={"num_cpus": plan.num_cpus, "num_gpus": plan.num_gpus},
        graceful_shutdown_timeout_s=5)
    name = app_name(data_dir, job_store)
    handle = serve.run(runner.bind(str(model), str(data_dir), job_store, lease_s, plan.device, output_format,
                                   max_memory_gib), name=name,
                       route_prefix=None, blocking=False)
    log.info("ray serve deployment running", extra={"event": "ray_deployed", "app": name, "device": plan.device,
                                                   "min_replicas": scaling.min_replicas,
                                                   "max_replicas": scaling.max_replicas})
    return handle, started


def shutdown(name: str, started: bool) -> None:
    """Remove the application ``name``; stop the local cluster this process started."""
    import ray
    from ray import serve

    try:
        serve.delete(name)
    except Exception:  # noqa: BLE001 - shutting down anyway
        pass
    if started:
        serve.shutdown()
        ray.shutdown()
