"""Atomic file writes (a temporary file in the target folder, then a rename) and claims on who writes."""

from __future__ import annotations

import glob
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; see claim()
    fcntl = None  # type: ignore[assignment]


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def write_atomic(path: Path, write: Callable[[Path], None], suffix: str = "") -> Path:
    """Call ``write(tmp_path)`` and move the result to ``path`` only once it is complete.

    A run killed mid-write leaves only a hidden ``.name.tmp-*`` file, never a half-written output.
    ``suffix`` keeps the extension that writers such as nibabel use to pick a format.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        # mkstemp makes owner-only files; outputs get the usual permissions (0666 less the umask).
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: Path, text: str) -> Path:
    """Write a text file atomically (UTF-8)."""
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def temporaries(path: Path) -> list[Path]:
    """The ``.name.tmp-*`` files that :func:`write_atomic` leaves beside ``path`` when it is killed."""
    path = Path(path)
    return sorted(path.parent.glob(f".{glob.escape(path.name)}.tmp-*"))


def temporary_target(tmp: Path) -> Path | None:
    """The file a ``.name.tmp-*`` temporary was to become, or None for any other name."""
    if not tmp.name.startswith(".") or ".tmp-" not in tmp.name:
        return None
    # The random part and the suffix after the last ".tmp-" never contain ".tmp-" themselves.
    return tmp.parent / tmp.name[1:].rsplit(".tmp-", 1)[0]


class Claim:
    """An exclusive ``flock`` on the hidden ``.name.lock`` beside a file: its holder alone writes it.

    The kernel drops the lock when its process dies, so a killed run never blocks a later one. The
    lock file is unlinked on release while still locked; a claimer that locked a file unlinked (or
    replaced) in the meantime sees its inode differ from the path's and tries again, so two
    processes never both believe they hold one name.
    """

    def __init__(self, path: Path, fd: int, lock_path: Path):
        self.path = path
        self._fd: int | None = fd
        self._lock_path = lock_path

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent)."""
        if self._fd is None:
            return
        self._lock_path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_path(path: Path) -> Path:
    """The hidden lock file that guards writes of ``path``: ``.name.lock`` in the same folder."""
    path = Path(path)
    return path.parent / f".{path.name}.lock"


def claim(path: Path, wait: bool = False) -> Claim | None:
    """Take the write claim on ``path``; None when another live process holds it (``wait`` False).

    Without ``fcntl`` (Windows) every claim succeeds: concurrent runs there are not guarded.
    """
    path = Path(path)
    target = lock_path(path)
    while True:
        fd = os.open(target, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
        if fcntl is None:
            return Claim(path, fd, target)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(target))
        except FileNotFoundError:
            same = False
        if same:
            return Claim(path, fd, target)
        os.close(fd)  # the holder before us unlinked this lock file on release: lock the current one
