"""Bearer tokens and a per-token rate limit.

Tokens come from ``$MEDSEG_API_TOKENS`` (comma-separated) and/or a token file (one per line, ``#``
comments), re-read when the file changes. A token is never logged or stored: logs, the audit trail and the job table name it by its
*token id*, the first 12 hex digits of its SHA-256. Every presented token is compared with every known
one by ``hmac.compare_digest`` on SHA-256 digests (equal lengths, no early exit), so timing reveals
neither a token nor which one nearly matched.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from medseg.errors import MedsegError

log = logging.getLogger("medseg.serving")

TOKENS_ENV = "MEDSEG_API_TOKENS"
MIN_TOKEN_LENGTH = 16


def token_id(token: str) -> str:
    """The name of a token in logs and records: 12 hex digits of its SHA-256 (not reversible)."""
    return hashlib.sha256(token.encode()).hexdigest()[:12]


def _digest_entries(tokens: Iterable[str]) -> list[tuple[bytes, str]]:
    entries = []
    for token in tokens:
        if len(token) < MIN_TOKEN_LENGTH:
            raise MedsegError(f"API token {token_id(token)} is shorter than {MIN_TOKEN_LENGTH} characters; "
                              "use a long random one, e.g. `python -c \"import secrets; print(secrets.token_urlsafe(32))\"`")
        entries.append((hashlib.sha256(token.encode()).digest(), token_id(token)))
    return entries


def _file_tokens(token_file: Path) -> list[str]:
    try:
        text = Path(token_file).read_text(encoding="utf-8")
    except OSError as exc:
        raise MedsegError(f"{token_file}: cannot read the token file ({exc.strerror or exc})") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _signature(path: Path) -> tuple[int, int, int] | None:
    """What changes when the file is edited or replaced (mtime ns, size, inode); None when it is gone."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class TokenSet:
    """The accepted tokens, kept as SHA-256 digests. Built by :meth:`from_sources` with a token file, it
    re-reads the file when it changes (checked at each request: one ``stat``), so adding or revoking a
    token needs no restart."""

    def __init__(self, tokens: Iterable[str]):
        self._digests: list[tuple[bytes, str]] = _digest_entries(tokens)
        self._env_tokens: list[str] = []
        self._file: Path | None = None
        self._seen: tuple[int, int, int] | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        self._reload_if_changed()
        return len(self._digests)

    @classmethod
    def from_sources(cls, env: str | None = None, token_file: Path | None = None) -> TokenSet:
        """Tokens of ``$MEDSEG_API_TOKENS`` (or ``env`` when given) and of ``token_file`` (watched)."""
        raw = os.environ.get(TOKENS_ENV, "") if env is None else env
        tokens = [t.strip() for t in raw.split(",") if t.strip()]
        if token_file is None:
            return cls(dict.fromkeys(tokens))
        seen = _signature(token_file)
        tokenset = cls(dict.fromkeys(tokens + _file_tokens(token_file)))  # at start a bad file is an error
        tokenset._env_tokens, tokenset._file, tokenset._seen = tokens, Path(token_file), seen
        return tokenset

    def _reload_if_changed(self) -> None:
        """Re-read the token file after it changed. A file gone (or unreadable) leaves only the environment's
        tokens: revoking fails closed. A too-short token in the new file is skipped with a warning, the
        others take effect (a typo never keeps a revoked token alive, nor locks everyone out)."""
        if self._file is None:
            return
        current = _signature(self._file)
        if current == self._seen:
            return
        with self._lock:
            if current == self._seen:
                return
            try:
                listed = _file_tokens(self._file) if current is not None else []
            except MedsegError:
                listed = []
            accepted = [t for t in dict.fromkeys(self._env_tokens + listed) if len(t) >= MIN_TOKEN_LENGTH]
            for token in set(listed) - set(accepted):
                log.warning("token file: a token shorter than the minimum is ignored",
                            extra={"event": "token_ignored", "token_id": token_id(token)})
            self._digests = _digest_entries(accepted)
            self._seen = current
            log.info("token file re-read", extra={"event": "tokens_reloaded", "tokens": len(self._digests)})

    def identify(self, authorization: str | None) -> str | None:
        """The token id of a valid ``Authorization: Bearer <token>`` header, else None."""
        self._reload_if_changed()
        if not authorization:
            return None
        scheme, _, presented = authorization.partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            return None
        digest = hashlib.sha256(presented.strip().encode()).digest()
        found = None
        for known, tid in self._digests:  # no early exit: the loop takes as long whichever token matches
            if hmac.compare_digest(digest, known):
                found = tid
        return found


class RateLimiter:
    """A token bucket per token id: ``per_minute`` requests a minute, bursts up to ``burst``.

    Per process: with N replicas a client gets up to N times the rate (docs/serving.md).
    """

    def __init__(self, per_minute: float, burst: int | None = None, clock: Callable[[], float] = time.monotonic):
        #: Seconds now (any origin); tests pass a clock they advance by hand.
        self.clock = clock
        self.rate = per_minute / 60.0
        self.burst = float(burst if burst is not None else max(1, int(per_minute)))
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def allow(self, key: str) -> tuple[bool, float]:
        """Take one request from ``key``'s bucket: (allowed, seconds until the next one would be)."""
        if self.rate <= 0:
            return True, 0.0
        now = self.clock()
        with self._lock:
            level, last = self._buckets.get(key, (self.burst, now))
            level = min(self.burst, level + (now - last) * self.rate)
            if level >= 1.0:
                self._buckets[key] = (level - 1.0, now)
                return True, 0.0
            self._buckets[key] = (level, now)
            return False, (1.0 - level) / self.rate
