"""Segmentation jobs in SQLite or PostgreSQL: several server processes share one store, and no job is
silently lost.

A worker *claims* a queued job with a lease (``lease_until``) that it renews while it works. A job whose
lease ran out, or whose owner process on this host is gone (``kill -9``), is taken back at the next claim:
queued again if it has had one attempt, failed (``WorkerLost``) after its second. Every change is one
``BEGIN IMMEDIATE`` transaction, so two processes never claim one job; WAL mode lets readers go on while a
writer commits. SQLite locking needs a local file system: replicas share a store on one host. Replicas on
several machines share a PostgreSQL store (:class:`PostgresJobStore`: row locks, leases only).
"""

from __future__ import annotations

import os
import re
import socket
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from medseg.errors import MedsegError

#: Attempts a job gets: the first, and one retry after a worker died on it.
MAX_ATTEMPTS = 2

#: The tables; ``{real}`` is SQLite's REAL or PostgreSQL's DOUBLE PRECISION (UNIX seconds).
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    token_id TEXT NOT NULL,
    status TEXT NOT NULL,
    input_kind TEXT NOT NULL,
    input_sha256 TEXT NOT NULL,
    created {real} NOT NULL,
    started {real},
    finished {real},
    attempts INTEGER NOT NULL DEFAULT 0,
    lease_owner TEXT,
    lease_until {real},
    error_class TEXT,
    error TEXT,
    mask_sha256 TEXT
);
CREATE INDEX IF NOT EXISTS jobs_status_created ON jobs (status, created);
CREATE INDEX IF NOT EXISTS jobs_token_created ON jobs (token_id, created);
CREATE TABLE IF NOT EXISTS replicas (id TEXT PRIMARY KEY, seen {real} NOT NULL)
"""
#: Columns added after the first release: added to an older store when it is opened.
_LATER_COLUMNS = (("model_name", "TEXT"), ("model_sha256", "TEXT"), ("deleted", "{real}"),
                  ("input_purged", "{real}"), ("results_purged", "{real}"))


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    #: Deleted by its owner (``DELETE /v1/jobs/{id}``): files gone, the row keeps ids, times and hashes.
    DELETED = "deleted"


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
    #: The model that ran (or runs) the job: its bundle name and weights SHA-256, recorded at the claim.
    model_name: str | None = None
    model_sha256: str | None = None
    deleted: float | None = None
    #: When retention removed the upload / the results (UNIX seconds), None while they are kept.
    input_purged: float | None = None
    results_purged: float | None = None

    def public(self) -> dict[str, object]:
        """What a client may see of its own job."""
        record: dict[str, object] = {"job_id": self.id, "status": str(self.status), "created": self.created,
                                     "started": self.started, "finished": self.finished, "attempts": self.attempts,
                                     "input_sha256": self.input_sha256}
        if self.model_name is not None or self.model_sha256 is not None:
            record["model"] = {"name": self.model_name, "weights_sha256": self.model_sha256}
        if self.status == JobStatus.FAILED:
            record["error"] = {"class": self.error_class, "message": self.error}
        if self.mask_sha256 is not None:
            record["mask_sha256"] = self.mask_sha256
        for key in ("deleted", "input_purged", "results_purged"):
            if getattr(self, key) is not None:
                record[key] = getattr(self, key)
        return record


_JOB_ID = re.compile(r"[0-9a-f]{32}")


def is_job_id(text: str) -> bool:
    """Whether ``text`` has the form of our job ids (32 lower-case hex digits): nothing else reaches a path."""
    return isinstance(text, str) and _JOB_ID.fullmatch(text) is not None


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


class _Db:
    """One connection inside one transaction; ``execute`` takes ``?`` placeholders on either engine."""

    def __init__(self, connection, placeholder: str):
        self.connection = connection
        self.placeholder = placeholder

    def execute(self, sql: str, params: tuple = ()):
        if self.placeholder != "?":
            sql = sql.replace("?", self.placeholder)
        return self.connection.execute(sql, params)


class SqlJobStore:
    """The job table's operations in SQL both engines run; subclasses open connections and lock rows.

    Every method is one transaction. Times come from ``clock`` (UNIX seconds): tests pass a clock they
    advance by hand, so leases and retention expire without waiting.
    """

    #: Appended to the claim's SELECT: PostgreSQL locks the row and skips rows another replica holds.
    _LOCK = ""
    _REAL = "REAL"

    def __init__(self, lease_s: float = 30.0, clock: Callable[[], float] = time.time):
        self.lease_s = float(lease_s)
        self.clock = clock

    # --- engine-specific -------------------------------------------------------------------------
    def _transaction(self, write: bool = True) -> AbstractContextManager[_Db]:
        """One transaction (``write`` False: a read, which SQLite runs without taking the write lock)."""
        raise NotImplementedError

    def _has_column(self, db: _Db, name: str) -> bool:
        raise NotImplementedError

    def _stale(self, job: Job, now: float) -> bool:
        """Whether a running job's worker is gone: its lease ran out."""
        return (job.lease_until or 0) < now

    def _create_schema(self, db: _Db) -> None:
        """The tables, and the columns later releases added to an older store."""
        for statement in _SCHEMA.format(real=self._REAL).split(";"):
            if statement.strip():
                db.execute(statement)
        for name, kind in _LATER_COLUMNS:
            if not self._has_column(db, name):
                db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind.format(real=self._REAL)}")

    # --- shared ----------------------------------------------------------------------------------
    @staticmethod
    def _job(row) -> Job | None:
        if row is None:
            return None
        values = dict(row)
        values["status"] = JobStatus(values["status"])
        return Job(**values)

    def submit(self, job_id: str, token_id: str, input_kind: str, input_sha256: str, max_queue: int) -> Job:
        """Queue a job, or raise :class:`QueueFull` when ``max_queue`` jobs are queued or running."""
        with self._transaction() as db:
            self._serialize_submits(db)
            active = db.execute("SELECT COUNT(*) AS n FROM jobs WHERE status IN (?, ?)",
                                tuple(str(s) for s in ACTIVE)).fetchone()
            if dict(active)["n"] >= max_queue:
                raise QueueFull(f"{dict(active)['n']} jobs queued or running (limit {max_queue})")
            db.execute("INSERT INTO jobs (id, token_id, status, input_kind, input_sha256, created) VALUES (?,?,?,?,?,?)",
                       (job_id, token_id, str(JobStatus.QUEUED), input_kind, input_sha256, self.clock()))
        job = self.get(job_id)
        assert job is not None
        return job

    def _serialize_submits(self, db: _Db) -> None:
        """Make the queue-bound check and the insert atomic against other replicas (SQLite: the write lock)."""

    def get(self, job_id: str) -> Job | None:
        with self._transaction(write=False) as db:
            return self._job(db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())

    def _recover(self, db: _Db, now: float) -> list[Job]:
        """Take back running jobs whose worker is gone: requeue after one attempt, fail after the second."""
        recovered = []
        for row in self._running_candidates(db, now):
            job = self._job(row)
            assert job is not None
            if not self._stale(job, now):
                continue
            if job.attempts >= MAX_ATTEMPTS:
                db.execute("UPDATE jobs SET status=?, finished=?, lease_owner=NULL, lease_until=NULL, error_class=?, "
                           "error=? WHERE id=?", (str(JobStatus.FAILED), now, "WorkerLost",
                                                  f"the worker died on this job {job.attempts} times; not retried again",
                                                  job.id))
            else:
                db.execute("UPDATE jobs SET status=?, lease_owner=NULL, lease_until=NULL WHERE id=?",
                           (str(JobStatus.QUEUED), job.id))
            recovered.append(job)
        return recovered

    def _running_candidates(self, db: _Db, now: float) -> list:
        """Running rows that may be stale: those whose lease ran out (locked, where the engine can)."""
        return db.execute(f"SELECT * FROM jobs WHERE status = ? AND (lease_until IS NULL OR lease_until < ?) "
                          f"ORDER BY id{self._LOCK}", (str(JobStatus.RUNNING), now)).fetchall()

    def recover(self) -> list[Job]:
        """Requeue or fail the jobs of dead workers now (a claim does this too); returns those it took back."""
        with self._transaction() as db:
            return self._recover(db, self.clock())

    def claim(self, owner: str, model_name: str | None = None, model_sha256: str | None = None,
              job_id: str | None = None) -> Job | None:
        """The oldest queued job (or ``job_id`` if it is queued), now running under ``owner``'s lease and
        recorded as run by the model ``model_name`` (weights ``model_sha256``); None when there is none."""
        now = self.clock()
        with self._transaction() as db:
            self._recover(db, now)
            if job_id is None:
                row = db.execute(f"SELECT id FROM jobs WHERE status = ? ORDER BY created, id LIMIT 1{self._LOCK}",
                                 (str(JobStatus.QUEUED),)).fetchone()
            else:
                row = db.execute(f"SELECT id FROM jobs WHERE status = ? AND id = ?{self._LOCK}",
                                 (str(JobStatus.QUEUED), job_id)).fetchone()
            if row is None:
                return None
            job_id = dict(row)["id"]
            db.execute("UPDATE jobs SET status=?, attempts=attempts+1, lease_owner=?, lease_until=?, "
                       "started=COALESCE(started, ?), model_name=?, model_sha256=? WHERE id=?",
                       (str(JobStatus.RUNNING), owner, now + self.lease_s, now, model_name, model_sha256, job_id))
        return self.get(job_id)

    def queued_ids(self, limit: int) -> list[str]:
        """The ids of the oldest ``limit`` queued jobs, oldest first."""
        with self._transaction(write=False) as db:
            rows = db.execute("SELECT id FROM jobs WHERE status = ? ORDER BY created, id LIMIT ?",
                              (str(JobStatus.QUEUED), limit)).fetchall()
            return [dict(r)["id"] for r in rows]

    def renew(self, job_id: str, owner: str) -> bool:
        """Extend the lease; False when the job is no longer this owner's (taken back, or deleted)."""
        with self._transaction() as db:
            cur = db.execute("UPDATE jobs SET lease_until=? WHERE id=? AND status=? AND lease_owner=?",
                             (self.clock() + self.lease_s, job_id, str(JobStatus.RUNNING), owner))
            return cur.rowcount == 1

    def release(self, job_id: str, owner: str) -> bool:
        """Give a running job back to the queue without spending an attempt (a graceful shutdown)."""
        with self._transaction() as db:
            cur = db.execute("UPDATE jobs SET status=?, attempts=CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END, "
                             "lease_owner=NULL, lease_until=NULL WHERE id=? AND status=? AND lease_owner=?",
                             (str(JobStatus.QUEUED), job_id, str(JobStatus.RUNNING), owner))
            return cur.rowcount == 1

    def complete(self, job_id: str, owner: str, mask_sha256: str) -> bool:
        """Mark done; False when the lease was lost meanwhile (another attempt owns the job, or it was deleted)."""
        with self._transaction() as db:
            cur = db.execute("UPDATE jobs SET status=?, finished=?, mask_sha256=?, lease_owner=NULL, lease_until=NULL "
                             "WHERE id=? AND status=? AND lease_owner=?",
                             (str(JobStatus.DONE), self.clock(), mask_sha256, job_id, str(JobStatus.RUNNING), owner))
            return cur.rowcount == 1

    def fail(self, job_id: str, owner: str, error_class: str, message: str) -> bool:
        """Mark failed with the error's class and a message for the job's owner (never logged)."""
        with self._transaction() as db:
            cur = db.execute("UPDATE jobs SET status=?, finished=?, error_class=?, error=?, lease_owner=NULL, "
                             "lease_until=NULL WHERE id=? AND status=? AND lease_owner=?",
                             (str(JobStatus.FAILED), self.clock(), error_class, message, job_id,
                              str(JobStatus.RUNNING), owner))
            return cur.rowcount == 1

    def delete(self, job_id: str) -> Job | None:
        """Mark a job deleted (a running one loses its lease, so its worker's result is refused) and forget
        all but its ids, times and hashes; the job as it was, or None when there is no such job."""
        with self._transaction() as db:
            before = self._job(db.execute(f"SELECT * FROM jobs WHERE id = ?{self._LOCK}", (job_id,)).fetchone())
            if before is None or before.status == JobStatus.DELETED:
                return before
            db.execute("UPDATE jobs SET status=?, deleted=?, lease_owner=NULL, lease_until=NULL, error_class=NULL, "
                       "error=NULL, finished=COALESCE(finished, ?) WHERE id=?",
                       (str(JobStatus.DELETED), self.clock(), self.clock(), job_id))
            return before

    def list_for(self, token_id: str, limit: int, after: Job | None = None) -> list[Job]:
        """``token_id``'s jobs, newest first, at most ``limit``; ``after``: the page after that job."""
        with self._transaction(write=False) as db:
            if after is None:
                rows = db.execute("SELECT * FROM jobs WHERE token_id = ? ORDER BY created DESC, id DESC LIMIT ?",
                                  (token_id, limit)).fetchall()
            else:
                rows = db.execute("SELECT * FROM jobs WHERE token_id = ? AND (created < ? OR (created = ? AND id < ?)) "
                                  "ORDER BY created DESC, id DESC LIMIT ?",
                                  (token_id, after.created, after.created, after.id, limit)).fetchall()
            return [j for j in (self._job(r) for r in rows) if j is not None]

    def due_for_purge(self, part: str, finished_before: float) -> list[Job]:
        """Done or failed jobs finished before ``finished_before`` whose ``part`` (``input`` or ``results``)
        retention has not removed yet."""
        column = {"input": "input_purged", "results": "results_purged"}[part]
        with self._transaction(write=False) as db:
            rows = db.execute(f"SELECT * FROM jobs WHERE status IN (?, ?) AND finished <= ? AND {column} IS NULL "
                              "ORDER BY finished", (str(JobStatus.DONE), str(JobStatus.FAILED), finished_before)).fetchall()
            return [j for j in (self._job(r) for r in rows) if j is not None]

    def mark_purged(self, job_id: str, part: str) -> None:
        """Record that retention removed the ``part`` (``input`` or ``results``) of a job."""
        column = {"input": "input_purged", "results": "results_purged"}[part]
        with self._transaction() as db:
            db.execute(f"UPDATE jobs SET {column}=? WHERE id=? AND {column} IS NULL", (self.clock(), job_id))

    def purged_counts(self) -> dict[str, int]:
        """Jobs whose upload / results retention has removed (kept in the store: survives restarts)."""
        with self._transaction(write=False) as db:
            row = dict(db.execute("SELECT COUNT(input_purged) AS input, COUNT(results_purged) AS results FROM jobs").fetchone())
        return {"input": int(row["input"]), "results": int(row["results"])}

    def beat_replica(self, replica_id: str) -> None:
        """Record that the worker pool ``replica_id`` is alive now (its heartbeat)."""
        with self._transaction() as db:
            db.execute("INSERT INTO replicas (id, seen) VALUES (?, ?) ON CONFLICT (id) DO UPDATE SET seen = excluded.seen",
                       (replica_id, self.clock()))

    def drop_replica(self, replica_id: str) -> None:
        """A worker pool stopped."""
        with self._transaction() as db:
            db.execute("DELETE FROM replicas WHERE id = ?", (replica_id,))

    def live_replicas(self) -> int:
        """Worker pools, on any machine, whose heartbeat is younger than one lease."""
        with self._transaction(write=False) as db:
            row = db.execute("SELECT COUNT(*) AS n FROM replicas WHERE seen >= ?", (self.clock() - self.lease_s,)).fetchone()
        return int(dict(row)["n"])

    def counts(self) -> dict[str, int]:
        """Jobs per status (every status present, 0 when none)."""
        with self._transaction(write=False) as db:
            rows = [dict(r) for r in db.execute("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status").fetchall()]
        out = {str(s): 0 for s in JobStatus}
        out.update({r["status"]: int(r["n"]) for r in rows})
        return out

    def all(self) -> list[Job]:
        """Every job, oldest first (tests, the load benchmark)."""
        with self._transaction(write=False) as db:
            rows = db.execute("SELECT * FROM jobs ORDER BY created, id").fetchall()
            return [j for j in (self._job(r) for r in rows) if j is not None]


class JobStore(SqlJobStore):
    """The SQLite job table at ``path`` (created when missing): the embedded default. Safe to use from
    threads and processes on one host (SQLite locking needs a local file system)."""

    def __init__(self, path: Path, lease_s: float = 30.0, clock: Callable[[], float] = time.time):
        super().__init__(lease_s, clock)
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = self._connect()
        try:
            db.execute("PRAGMA journal_mode=WAL")
        finally:
            db.close()
        with self._transaction() as tx:
            self._create_schema(tx)

    def _connect(self) -> sqlite3.Connection:
        # One connection per call: sqlite3 connections must not cross threads, and opening one is ~50 us.
        db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA busy_timeout=30000")
        return db

    @contextmanager
    def _transaction(self, write: bool = True) -> Iterator[_Db]:
        db = self._connect()
        try:
            if not write:  # autocommit: a read sees the last commit and blocks no writer (WAL)
                yield _Db(db, "?")
                return
            db.execute("BEGIN IMMEDIATE")
            try:
                yield _Db(db, "?")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        finally:
            db.close()

    def _has_column(self, db: _Db, name: str) -> bool:
        return any(r["name"] == name for r in db.execute("PRAGMA table_info(jobs)").fetchall())

    def _running_candidates(self, db: _Db, now: float) -> list:
        # Every running row: a live lease may still belong to a process on this host that is gone.
        return db.execute("SELECT * FROM jobs WHERE status = ? ORDER BY id", (str(JobStatus.RUNNING),)).fetchall()

    def _stale(self, job: Job, now: float) -> bool:
        """Lease run out, or (one host) the owner process is gone: taken back at once after a ``kill -9``."""
        return super()._stale(job, now) or _owner_is_dead(job.lease_owner)


class PostgresJobStore(SqlJobStore):
    """The job table in PostgreSQL (``postgresql://user@host:port/db``, psycopg 3: ``medseg[postgres]``).

    For replicas on several machines: a claim locks the oldest queued row with ``FOR UPDATE SKIP LOCKED``
    (two replicas never take one job and never wait on each other), and a replica that died anywhere is
    noticed by its lease running out, never by a process check (its pid means nothing on another host).
    """

    _LOCK = " FOR UPDATE SKIP LOCKED"
    _REAL = "DOUBLE PRECISION"

    def __init__(self, url: str, lease_s: float = 30.0, clock: Callable[[], float] = time.time):
        super().__init__(lease_s, clock)
        try:
            import psycopg
            from psycopg.rows import dict_row
        except ImportError:
            raise MedsegError("--job-store postgresql://... needs psycopg 3: pip install 'medseg[postgres]'") from None
        self._psycopg, self._dict_row = psycopg, dict_row
        self.url = url
        try:
            with self._transaction() as db:
                # One schema creation at a time when several replicas start together.
                db.execute("SELECT pg_advisory_xact_lock(?)", (_SCHEMA_LOCK,))
                self._create_schema(db)
        except psycopg.OperationalError as exc:
            # The message names host and port, never the password (psycopg leaves it out).
            raise MedsegError(f"--job-store: cannot reach PostgreSQL ({str(exc).strip().splitlines()[0]})") from None

    @contextmanager
    def _transaction(self, write: bool = True) -> Iterator[_Db]:
        # One connection per call, as for SQLite: a few ms on a LAN, and no connection is shared by threads.
        with self._psycopg.connect(self.url, row_factory=self._dict_row, connect_timeout=30) as connection:
            yield _Db(connection, "%s")  # the with-block commits, or rolls back on an exception

    def _has_column(self, db: _Db, name: str) -> bool:
        return db.execute("SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema() "
                          "AND table_name = 'jobs' AND column_name = ?", (name,)).fetchone() is not None

    def _serialize_submits(self, db: _Db) -> None:
        db.execute("SELECT pg_advisory_xact_lock(?)", (_SUBMIT_LOCK,))


#: Advisory lock keys (any fixed numbers): schema creation, and the queue bound of submits.
_SCHEMA_LOCK = 0x6D656473
_SUBMIT_LOCK = 0x6D656474


def open_job_store(location: str | None, data_dir: Path, lease_s: float = 30.0,
                   clock: Callable[[], float] = time.time) -> SqlJobStore:
    """The store ``--job-store`` names: a ``postgresql://`` URL, else SQLite (``<data_dir>/jobs.sqlite``)."""
    if location and location.startswith(("postgresql://", "postgres://")):
        return PostgresJobStore(location, lease_s, clock)
    if location:
        raise MedsegError(f"--job-store {location!r}: give a postgresql://user@host:port/database URL, "
                          "or leave it out for SQLite in --data-dir")
    return JobStore(Path(data_dir) / "jobs.sqlite", lease_s, clock)
