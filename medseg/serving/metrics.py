"""Prometheus metrics of one server process, in a registry of its own (several apps in one test process
do not collide). Queue depth is read from the shared job store at scrape time, so every replica reports
the same backlog; counters and histograms are per process (Prometheus sums them over replicas).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

__all__ = ["CONTENT_TYPE_LATEST", "ServiceMetrics"]

# The *_created series double the exposition and no alert or dashboard here reads them.
disable_created_metrics()

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_JOB_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


class _QueueCollector:
    def __init__(self, counts: Callable[[], dict[str, int]]):
        self._counts = counts

    def collect(self):
        family = GaugeMetricFamily("medseg_jobs", "Jobs in the shared store by status (queued and running: the backlog)",
                                   labels=["status"])
        try:
            for status, n in self._counts().items():
                family.add_metric([status], n)
        except Exception:  # a locked or missing store must not break the scrape
            pass
        yield family


class _StorageCollector:
    """Read at scrape time: what the data folder holds, what retention removed, live replicas."""

    def __init__(self, storage: Callable[[], object] | None, purged: Callable[[], dict[str, int]] | None,
                 replicas: Callable[[], int] | None):
        self._storage, self._purged, self._replicas = storage, purged, replicas

    def collect(self):
        try:
            if self._storage is not None:
                held = self._storage()
                size = GaugeMetricFamily("medseg_stored_bytes", "Bytes in the data folder's job folders: uploads "
                                         "(part=input) and results (part=results)", labels=["part"])
                jobs = GaugeMetricFamily("medseg_jobs_stored", "Jobs whose upload (part=input) / results "
                                         "(part=results) are still stored", labels=["part"])
                for part, n in held.bytes.items():
                    size.add_metric([part], n)
                for part, n in held.jobs.items():
                    jobs.add_metric([part], n)
                yield size
                yield jobs
            if self._purged is not None:
                purged = GaugeMetricFamily("medseg_jobs_purged", "Jobs whose upload (part=input) / results "
                                           "(part=results) retention has removed, all time (kept in the store)",
                                           labels=["part"])
                for part, n in self._purged().items():
                    purged.add_metric([part], n)
                yield purged
            if self._replicas is not None:
                yield GaugeMetricFamily("medseg_replicas", "Worker pools (replicas) with a heartbeat younger than "
                                        "one lease, on every machine sharing the job store", value=self._replicas())
        except Exception:  # a locked or missing store must not break the scrape
            return


class ServiceMetrics:
    """The service's metrics; ``render()`` gives the Prometheus text exposition."""

    def __init__(self, queue_counts: Callable[[], dict[str, int]], storage: Callable[[], object] | None = None,
                 purged: Callable[[], dict[str, int]] | None = None, replicas: Callable[[], int] | None = None):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("medseg_http_requests", "HTTP requests by route template, method and status",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("medseg_http_request_duration_seconds", "HTTP request latency by route template",
                                 ["route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.job_duration = Histogram("medseg_job_duration_seconds", "Time a worker spent on a job (load, predict, write)",
                                      buckets=_JOB_BUCKETS, registry=r)
        self.jobs_finished = Counter("medseg_jobs_finished", "Jobs finished by this process, by result", ["result"],
                                     registry=r)
        self.failures = Counter("medseg_job_failures", "Failed jobs by error class", ["error_class"], registry=r)
        self.rejected = Counter("medseg_uploads_rejected", "Uploads refused, by HTTP status", ["status"], registry=r)
        self.model = Info("medseg_model", "The model this process serves", registry=r)
        self.model_loaded = Gauge("medseg_model_loaded", "1 once the model is loaded in this process", registry=r)
        r.register(_QueueCollector(queue_counts))
        r.register(_StorageCollector(storage, purged, replicas))

    def render(self) -> bytes:
        return generate_latest(self.registry)
