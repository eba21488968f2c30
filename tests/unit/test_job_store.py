"""The job store suite, run against SQLite and a real PostgreSQL server (tests/postgres_server.py): claims
exactly once, leases that expire on an injected clock, retry then WorkerLost, deletion, listing, retention
marks, replica heartbeats."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable

import pytest

from medseg.errors import MedsegError
from medseg.serving.jobs import (
    MAX_ATTEMPTS,
    JobStatus,
    JobStore,
    PostgresJobStore,
    QueueFull,
    SqlJobStore,
    new_job_id,
    open_job_store,
)
from tests.conftest import FakeClock


@pytest.fixture(params=["sqlite", "postgresql"])
def open_store(request, tmp_path) -> Callable[..., SqlJobStore]:
    """Opens the store of one backend (each call: another connection user, as another replica would be)."""
    if request.param == "sqlite":
        return lambda lease_s=30.0, clock=None: JobStore(tmp_path / "jobs.sqlite", lease_s, clock or FakeClock())
    from tests.postgres_server import fresh_database

    url = fresh_database(request.getfixturevalue("postgres_url"))
    return lambda lease_s=30.0, clock=None: PostgresJobStore(url, lease_s, clock or FakeClock())


def _submit(store: SqlJobStore, token: str = "tid", n: int = 1) -> list[str]:
    ids = [new_job_id() for _ in range(n)]
    for job_id in ids:
        store.submit(job_id, token, "nifti", "0" * 64, max_queue=1000)
    return ids


def _submit_in_order(store: SqlJobStore, clock: FakeClock, n: int) -> list[str]:
    """``n`` jobs one second apart: claimed in this order."""
    ids = []
    for _ in range(n):
        clock.advance(1)
        ids += _submit(store)
    return ids


def test_a_dead_workers_job_is_retried_once_then_failed(open_store):
    clock = FakeClock()
    store = open_store(lease_s=30, clock=clock)
    [job_id] = _submit(store)
    first = store.claim("elsewhere:1:a", "tiny3d", "a" * 64)
    assert first is not None and first.attempts == 1 and first.status == JobStatus.RUNNING
    assert (first.model_name, first.model_sha256) == ("tiny3d", "a" * 64)
    clock.advance(29.9)
    assert store.claim("elsewhere:2:b") is None  # the lease is live: nobody else takes it
    clock.advance(0.2)  # the first worker stopped renewing (it died) and its lease ran out
    second = store.claim("elsewhere:2:b", "tiny3d", "b" * 64)
    assert second is not None and second.id == job_id and second.attempts == 2
    assert second.model_sha256 == "b" * 64  # the record names the model that runs it now
    assert not store.complete(job_id, "elsewhere:1:a", "f" * 64)  # the dead worker's late result is refused
    assert not store.renew(job_id, "elsewhere:1:a")
    clock.advance(30.1)
    assert store.claim("elsewhere:3:c") is None
    failed = store.get(job_id)
    assert failed.status == JobStatus.FAILED and failed.error_class == "WorkerLost" and failed.attempts == MAX_ATTEMPTS
    [again] = _submit(store)
    assert store.claim("here:1:a").attempts == 1
    assert store.release(again, "here:1:a")  # a graceful shutdown gives it back, attempt unspent
    assert store.get(again).status == JobStatus.QUEUED and store.claim("here:2:b").attempts == 1


def test_a_renewed_lease_keeps_the_job(open_store):
    clock = FakeClock()
    store = open_store(lease_s=30, clock=clock)
    [job_id] = _submit(store)
    store.claim("elsewhere:1:a")
    for _ in range(5):
        clock.advance(20)
        assert store.renew(job_id, "elsewhere:1:a")
        assert store.claim("elsewhere:2:b") is None
    assert store.complete(job_id, "elsewhere:1:a", "f" * 64)
    assert store.get(job_id).status == JobStatus.DONE and store.get(job_id).mask_sha256 == "f" * 64


def test_the_queue_bound_counts_queued_and_running_jobs(open_store):
    store = open_store()
    ids = [new_job_id() for _ in range(3)]
    for job_id in ids[:2]:
        store.submit(job_id, "tid", "nifti", "0" * 64, max_queue=2)
    with pytest.raises(QueueFull):
        store.submit(ids[2], "tid", "nifti", "0" * 64, max_queue=2)
    store.claim("w:1:a")  # running still counts
    with pytest.raises(QueueFull):
        store.submit(ids[2], "tid", "nifti", "0" * 64, max_queue=2)
    assert store.get(ids[2]) is None
    assert store.counts() == {"queued": 1, "running": 1, "done": 0, "failed": 0, "deleted": 0}


def test_workers_sharing_one_store_claim_each_job_exactly_once(open_store):
    ids = _submit(open_store(), n=30)
    claimed: list[str] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        store = open_store()  # its own connections, as another server process would have
        try:
            while (job := store.claim(f"elsewhere:{n}:x")) is not None:
                assert store.complete(job.id, f"elsewhere:{n}:x", "f" * 64)
                with lock:
                    claimed.append(job.id)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(claimed) == sorted(ids)
    assert open_store().counts()["done"] == 30


def test_deleting_a_job_keeps_only_ids_times_and_hashes(open_store):
    clock = FakeClock()
    store = open_store(clock=clock)
    failed, running, queued = _submit_in_order(store, clock, 3)
    assert store.claim("w:1:a", "tiny3d", "c" * 64).id == failed
    assert store.fail(failed, "w:1:a", "ScanError", "CANARY message about the scan")
    assert store.claim("w:2:b", "tiny3d", "c" * 64).id == running
    clock.advance(5)
    before = store.delete(failed)
    assert before is not None and before.status == JobStatus.FAILED
    after = store.get(failed)
    assert after.status == JobStatus.DELETED and after.deleted == clock.now
    assert after.error is None and after.error_class is None and after.input_sha256 == "0" * 64
    assert after.model_sha256 == "c" * 64 and "CANARY" not in str(after.public())
    # A running job loses its lease: its worker's result is refused, its renewal fails.
    assert store.delete(running).status == JobStatus.RUNNING
    assert not store.complete(running, "w:2:b", "f" * 64) and not store.renew(running, "w:2:b")
    assert store.get(running).status == JobStatus.DELETED
    # A queued job is never claimed once deleted.
    assert store.delete(queued).status == JobStatus.QUEUED
    assert store.claim("w:3:c") is None
    # Deleting twice changes nothing; an unknown id is None.
    assert store.delete(running).status == JobStatus.DELETED and store.delete(new_job_id()) is None
    assert store.counts()["deleted"] == 3


def test_a_token_lists_its_own_jobs_newest_first_in_pages(open_store):
    clock = FakeClock()
    store = open_store(clock=clock)
    mine = []
    for i in range(7):
        mine += _submit(store, "me")
        _submit(store, "other")
        if i != 3:  # two jobs in the same second: the id breaks the tie, nothing is skipped or repeated
            clock.advance(1)
    pages, after = [], None
    while page := store.list_for("me", limit=3, after=after):
        pages.append([j.id for j in page])
        after = page[-1]
    assert [len(p) for p in pages] == [3, 3, 1]
    listed = [i for p in pages for i in p]
    assert sorted(listed) == sorted(mine)
    created = [store.get(i).created for i in listed]
    assert created == sorted(created, reverse=True)
    assert all(store.get(i).token_id == "me" for i in listed)


def test_retention_marks_finished_jobs_once(open_store):
    clock = FakeClock()
    store = open_store(clock=clock)
    done, failed, queued = _submit_in_order(store, clock, 3)
    for job_id, finish in ((done, "complete"), (failed, "fail")):
        job = store.claim(f"w:{job_id[:4]}:a")
        assert job.id == job_id
        store.complete(job_id, job.lease_owner, "f" * 64) if finish == "complete" else store.fail(
            job_id, job.lease_owner, "ScanError", "x")
    finished_at = clock.now
    assert {j.id for j in store.due_for_purge("input", finished_at - 1)} == set()
    assert {j.id for j in store.due_for_purge("input", finished_at)} == {done, failed}  # never the queued one
    store.mark_purged(done, "input")
    assert {j.id for j in store.due_for_purge("input", finished_at)} == {failed}
    assert {j.id for j in store.due_for_purge("results", finished_at)} == {done, failed}
    assert store.purged_counts() == {"input": 1, "results": 0}
    assert store.get(done).input_purged == clock.now and store.get(queued).input_purged is None


def test_replicas_are_counted_while_their_heartbeat_is_younger_than_a_lease(open_store):
    clock = FakeClock()
    store = open_store(lease_s=30, clock=clock)
    store.beat_replica("host-a:1")
    store.beat_replica("host-b:2")
    store.beat_replica("host-a:1")
    assert store.live_replicas() == 2
    clock.advance(20)
    store.beat_replica("host-b:2")
    clock.advance(15)  # host-a's last beat is 35 s old
    assert store.live_replicas() == 1
    store.drop_replica("host-b:2")
    assert store.live_replicas() == 0


def test_an_older_sqlite_store_gains_the_new_columns(tmp_path):
    path = tmp_path / "jobs.sqlite"
    db = sqlite3.connect(path)
    db.executescript("CREATE TABLE jobs (id TEXT PRIMARY KEY, token_id TEXT NOT NULL, status TEXT NOT NULL, "
                     "input_kind TEXT NOT NULL, input_sha256 TEXT NOT NULL, created REAL NOT NULL, started REAL, "
                     "finished REAL, attempts INTEGER NOT NULL DEFAULT 0, lease_owner TEXT, lease_until REAL, "
                     "error_class TEXT, error TEXT, mask_sha256 TEXT);"
                     "INSERT INTO jobs (id, token_id, status, input_kind, input_sha256, created) "
                     "VALUES ('0123456789abcdef0123456789abcdef', 't', 'queued', 'nifti', 'aa', 1.0);")
    db.close()
    store = JobStore(path)
    job = store.claim("w:1:a", "tiny3d", "a" * 64)
    assert job.id == "0123456789abcdef0123456789abcdef" and job.model_name == "tiny3d"


def test_postgres_leases_ignore_local_pids(postgres_url):
    """A PostgreSQL store serves several machines: a lease is only ever ended by time, never by a pid check
    (a dead pid on this host could be a live one's number on another)."""
    import os
    import socket
    import subprocess
    import sys

    from tests.postgres_server import fresh_database

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    clock = FakeClock()
    store = PostgresJobStore(fresh_database(postgres_url), lease_s=30, clock=clock)
    [job_id] = _submit(store)
    assert store.claim(f"{socket.gethostname()}:{dead.pid}:x").id == job_id
    assert store.claim(f"{socket.gethostname()}:{os.getpid()}:y") is None
    clock.advance(31)
    assert store.claim("other-host:1:z").id == job_id


def test_open_job_store_picks_the_engine(tmp_path, postgres_url):
    from tests.postgres_server import fresh_database

    assert isinstance(open_job_store(None, tmp_path), JobStore)
    assert (tmp_path / "jobs.sqlite").is_file()
    assert isinstance(open_job_store(fresh_database(postgres_url), tmp_path), PostgresJobStore)
    with pytest.raises(MedsegError, match="postgresql://"):
        open_job_store("mysql://x", tmp_path)
    with pytest.raises(MedsegError, match="cannot reach PostgreSQL"):
        PostgresJobStore(f"postgresql://nobody@127.0.0.1:{_closed_port()}/x")


def _closed_port() -> int:
    from tests.postgres_server import free_port

    return free_port()


def test_fresh_database_urls_are_separate(postgres_url):
    from tests.postgres_server import fresh_database

    a, b = PostgresJobStore(fresh_database(postgres_url)), PostgresJobStore(fresh_database(postgres_url))
    _submit(a)
    assert len(a.all()) == 1 and b.all() == []
