"""How long patient data stays: a job's files removed on its owner's request (``DELETE``) or by retention,
and what the data folder holds now (for ``/metrics``).

A job folder (``jobs/<id>/``) holds the upload under ``input/``; everything else in it is results (mask,
SEG, report, whatever a writer adds). Retention removes the upload ``--retention-hours`` after the job
finished and the results ``--result-retention-hours`` after; what it removed is marked in the job store,
so a restarted service (or another replica) neither forgets nor repeats it.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from medseg.serving.jobs import SqlJobStore
from medseg.serving.worker import INPUT, job_dir

log = logging.getLogger("medseg.serving")

PARTS = ("input", "results")


def remove_job_files(data_dir: Path, job_id: str) -> None:
    """Remove a job's folder: the upload and every result."""
    shutil.rmtree(job_dir(data_dir, job_id), ignore_errors=True)


def remove_part(data_dir: Path, job_id: str, part: str) -> None:
    """Remove a job's upload (``input``) or its results (``results``: all but ``input/``); the folder goes
    too once nothing is left in it."""
    folder = job_dir(data_dir, job_id)
    if not folder.is_dir():
        return
    for entry in list(folder.iterdir()):
        if (entry.name == INPUT) == (part == "input"):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
    try:
        folder.rmdir()  # only when empty
    except OSError:
        pass


@dataclass(frozen=True)
class Storage:
    """What the data folder holds for jobs: bytes and number of jobs with an upload / with results."""

    bytes: dict[str, int]
    jobs: dict[str, int]


def _tree_bytes(path: Path) -> int:
    if not path.is_dir() or path.is_symlink():
        return path.lstat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:  # removed meanwhile
                pass
    return total


def storage(data_dir: Path) -> Storage:
    """Bytes of uploads and of results under ``<data_dir>/jobs``, and how many jobs hold each."""
    sizes = dict.fromkeys(PARTS, 0)
    jobs = dict.fromkeys(PARTS, 0)
    root = Path(data_dir) / "jobs"
    for folder in root.iterdir() if root.is_dir() else []:
        held = set()
        try:
            for entry in folder.iterdir():
                part = "input" if entry.name == INPUT else "results"
                sizes[part] += _tree_bytes(entry)
                held.add(part)
        except (FileNotFoundError, NotADirectoryError):
            continue
        for part in held:
            jobs[part] += 1
    return Storage(sizes, jobs)


class Retention:
    """Removes uploads ``input_hours`` and results ``results_hours`` after their job finished (None: kept)."""

    def __init__(self, store: SqlJobStore, data_dir: Path, input_hours: float | None, results_hours: float | None):
        self.store = store
        self.data_dir = Path(data_dir)
        self.hours = {"input": input_hours, "results": results_hours}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return any(h is not None for h in self.hours.values())

    def purge_once(self) -> dict[str, int]:
        """Remove what is due now; the number of jobs purged per part."""
        purged = dict.fromkeys(PARTS, 0)
        now = self.store.clock()
        for part, hours in self.hours.items():
            if hours is None:
                continue
            for job in self.store.due_for_purge(part, now - hours * 3600.0):
                remove_part(self.data_dir, job.id, part)
                self.store.mark_purged(job.id, part)
                purged[part] += 1
        if any(purged.values()):
            log.info("retention purged", extra={"event": "retention_purged", **{f"{k}_jobs": v for k, v in purged.items()}})
        return purged

    def start(self, interval_s: float) -> None:
        """Purge now and then every ``interval_s`` seconds in a background thread."""
        def loop() -> None:
            while True:
                try:
                    self.purge_once()
                except Exception:  # a busy store now and then: the next round purges
                    log.exception("retention purge failed", extra={"event": "retention_failed"})
                if self._stop.wait(interval_s):
                    return

        self._thread = threading.Thread(target=loop, name="medseg-retention", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
