"""Segmentation jobs in SQLite: several server processes share one store, and no job is silently lost.

A worker *claims* a queued job with a lease (``lease_until``) that it renews while it works. A job whose
lease ran out, or whose owner process on this host is gone (``kill -9``), is taken back at the next claim:
queued again if it has had one attempt, failed (``WorkerLost``) after its second. Every change is one
``BEGIN IMMEDIATE`` transaction, so two processes never claim one job; WAL mode lets readers go on while a
writer commits. SQLite locking needs a local file system: replicas share a store on one host.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

#: Attempts a job gets: the first, and one retry after a worker died on it.
MAX_ATTEMPTS = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    token_id TEXT NOT NULL,
    status TEXT NOT NULL,
    input_kind TEXT NOT NULL,
    input_sha256 TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    lease_owner TEXT,
    lease_until REAL,
    error_class TEXT,
    error TEXT,
    mask_sha256 TEXT
);
CREATE INDEX IF NOT EXISTS jobs_status_created ON jobs (status, created);
"""


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


ACTIVE = (JobStatus.QUEUED, JobStatus.RUNNING)


class QueueFull(Exception):
    """The store already holds ``max_queue`` queued or running jobs."""


@dataclass(frozen=True)
class Job:
    """One row of the store. ``input_kind`` is ``nifti`` or ``dicom``; times are UNIX seconds."""

    id: str
    token_id: str
    status: JobStatus
    input_kind: str
    input_sha256: str
    created: float
    started: float | None
    finished: float | None
    attempts: int
    lease_owner: str | None
    lease_until: float | None
    error_class: str | None
    error: str | None
    mask_sha256: str | None

    def public(self) -> dict[str, object]:
        """What a client may see of its own job."""
        record: dict[str, object] = {"job_id": self.id, "status": str(self.status), "created": self.created,
                                     "started": self.started, "finished": self.finished, "attempts": self.attempts}
        if self.status == JobStatus.FAILED:
            record["error"] = {"class": self.error_class, "message": self.error}
        if self.status == JobStatus.DONE:
            record["mask_sha256"] = self.mask_sha256
        return record


def new_job_id() -> str:
    """A random, unguessable job id (no counter a client could walk)."""
    return uuid.uuid4().hex


def worker_identity() -> str:
    """``host:pid:random``: the host and pid let a restarted server see that a job's owner is dead."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _owner_is_dead(owner: str | None) -> bool:
    """True only when the owner ran on this host and its process no longer exists."""
    if not owner:
        return False
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # exists, owned by someone else
        return False
    return False


class JobStore:
    """The SQLite job table at ``path`` (created when missing). Safe to use from threads and processes."""

    def __init__(self, path: Path, lease_s: float = 30.0, clock: Callable[[], float] = time.time):
        self.path = Path(path)
        self.lease_s = float(lease_s)
        #: UNIX seconds now; tests pass a clock they advance by hand, so leases expire without waiting.
        self.clock = clock
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        # One connection per call: sqlite3 connections must not cross threads, and opening one is ~50 us.
        db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA busy_timeout=30000")
        return db

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        db = self._connect()
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        finally:
            db.close()

    @staticmethod
    def _job(row: sqlite3.Row | None) -> Job | None:
        if row is None:
            return None
        values = dict(row)
        values["status"] = JobStatus(values["status"])
        return Job(**values)

    def submit(self, job_id: str, token_id: str, input_kind: str, input_sha256: str, max_queue: int) -> Job:
        """Queue a job, or raise :class:`QueueFull` when ``max_queue`` jobs are queued or running."""
        with self._transaction() as db:
            active = db.execute("SELECT COUNT(*) FROM jobs WHERE status IN (?, ?)", ACTIVE).fetchone()[0]
            if active >= max_queue:
                raise QueueFull(f"{active} jobs queued or running (limit {max_queue})")
            db.execute("INSERT INTO jobs (id, token_id, status, input_kind, input_sha256, created) VALUES (?,?,?,?,?,?)",
                       (job_id, token_id, JobStatus.QUEUED, input_kind, input_sha256, self.clock()))
        job = self.get(job_id)
        assert job is not None
        return job

    def get(self, job_id: str) -> Job | None:
        db = self._connect()
        try:
            return self._job(db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())
        finally:
            db.close()

    def _recover(self, db: sqlite3.Connection, now: float) -> list[Job]:
        """Take back running jobs whose worker is gone: requeue after one attempt, fail after the second."""
        recovered = []
        for row in db.execute("SELECT * FROM jobs WHERE status = ?", (JobStatus.RUNNING,)).fetchall():
            job = self._job(row)
            assert job is not None
            if (job.lease_until or 0) >= now and not _owner_is_dead(job.lease_owner):
                continue
            if job.attempts >= MAX_ATTEMPTS:
                db.execute("UPDATE jobs SET status=?, finished=?, lease_owner=NULL, lease_until=NULL, error_class=?, "
                           "error=? WHERE id=?", (JobStatus.FAILED, now, "WorkerLost",
                                                  f"the worker died on this job {job.attempts} times; not retried again",
                                                  job.id))
            else:
                db.execute("UPDATE jobs SET status=?, lease_owner=NULL, lease_until=NULL WHERE id=?",
                           (JobStatus.QUEUED, job.id))
            recovered.append(job)
        return recovered

    def recover(self) -> list[Job]:
        """Requeue or fail the jobs of dead workers now (a claim does this too); returns those it took back."""
        with self._transaction() as db:
            return self._recover(db, self.clock())

    def claim(self, owner: str) -> Job | None:
        """The oldest queued job, now running under ``owner``'s lease; None when nothing is queued."""
        now = self.clock()
        with self._transaction() as db:
            self._recover(db, now)
            row = db.execute("SELECT id FROM jobs WHERE status = ? ORDER BY created, id LIMIT 1",
                             (JobStatus.QUEUED,)).fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET status=?, attempts=attempts+1, lease_owner=?, lease_until=?, "
                       "started=COALESCE(started, ?) WHERE id=?",
                       (JobStatus.RUNNING, owner, now + self.lease_s, now, row["id"]))
        return self.get(row["id"])

    def renew(self, job_id: str, owner: str) -> bool:
        """Extend the lease; False when the job is no longer this owner's (it was taken back)."""
        with self._transaction() as db:
            cur = db.execute("UPDATE jobs SET lease_until=? WHERE id=? AND status=? AND lease_owner=?",
                             (self.clock() + self.lease_s, job_id, JobStatus.RUNNING, owner))
            return cur.rowcount == 1

    def release(self, job_id: str, owner: str) -> bool:
        """Give a running job back to the queue without spending an attempt (a graceful shutdown)."""
        with self._transaction() as db:
            cur = db.execute("UPDATE jobs SET status=?, attempts=MAX(attempts-1, 0), lease_owner=NULL, lease_until=NULL "
                             "WHERE id=? AND status=? AND lease_owner=?", (JobStatus.QUEUED, job_id, JobStatus.RUNNING, owner))
            return cur.rowcount == 1

    def complete(self, job_id: str, owner: str, mask_sha256: str) -> bool:
        """Mark done; False when the lease was lost meanwhile (another attempt owns the job)."""
        with self._transaction() as db:
            cur = db.execute("UPDATE jobs SET status=?, finished=?, mask_sha256=?, lease_owner=NULL, lease_until=NULL "
                             "WHERE id=? AND status=? AND lease_owner=?",
                             (JobStatus.DONE, self.clock(), mask_sha256, job_id, JobStatus.RUNNING, owner))
            return cur.rowcount == 1

    def fail(self, job_id: str, owner: str, error_class: str, message: str) -> bool:
        """Mark failed with the error's class and a message for the job's owner (never logged)."""
        with self._transaction() as db:
            cur = db.execute("UPDATE jobs SET status=?, finished=?, error_class=?, error=?, lease_owner=NULL, "
                             "lease_until=NULL WHERE id=? AND status=? AND lease_owner=?",
                             (JobStatus.FAILED, self.clock(), error_class, message, job_id, JobStatus.RUNNING, owner))
            return cur.rowcount == 1

    def counts(self) -> dict[str, int]:
        """Jobs per status (every status present, 0 when none)."""
        db = self._connect()
        try:
            rows = db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        finally:
            db.close()
        out = {str(s): 0 for s in JobStatus}
        out.update({r[0]: int(r[1]) for r in rows})
        return out

    def all(self) -> list[Job]:
        """Every job, oldest first (tests, the load benchmark)."""
        db = self._connect()
        try:
            return [j for j in (self._job(r) for r in db.execute("SELECT * FROM jobs ORDER BY created")) if j]
        finally:
            db.close()
