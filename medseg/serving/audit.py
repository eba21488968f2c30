"""The audit trail: one JSON line per event (time, token id, action, job, outcome, hashes), no patient data.

Lines are appended with one ``write`` on an ``O_APPEND`` descriptor under ``flock``, so several server
processes can share one file without interleaving.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: appends are not locked across processes there
    fcntl = None  # type: ignore[assignment]


class AuditLog:
    """Append-only JSON lines at ``path``."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def record(self, action: str, token_id: str | None, job_id: str | None = None, outcome: str = "ok",
               **hashes: str | None) -> None:
        """Append one event; ``hashes`` are e.g. ``input_sha256`` / ``result_sha256`` (hex digests only)."""
        entry = {"time": round(time.time(), 3), "token_id": token_id, "action": action, "job_id": job_id,
                 "outcome": outcome, **{k: v for k, v in hashes.items() if v is not None}}
        line = (json.dumps(entry, sort_keys=True) + "\n").encode()
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                os.write(fd, line)
            finally:
                os.close(fd)

    def entries(self) -> list[dict[str, object]]:
        """Every recorded event (tests, inspection)."""
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]
