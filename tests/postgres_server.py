"""A real PostgreSQL server started by the tests: ``initdb`` and ``pg_ctl`` of the Debian ``postgresql``
package, a cluster in a temporary folder, listening on a free loopback port, trust authentication for one
role, and stopped (``immediate``) when the session ends.

PostgreSQL refuses to run as root; a root test process (a CI container) runs the server as the
``postgres`` user the Debian package creates (or ``nobody``) through ``runuser``/``setpriv``, with the
folder handed to that user.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.orthanc_server import free_port

ROLE = "medseg"


def _bin_dir() -> Path | None:
    """The newest ``/usr/lib/postgresql/<version>/bin`` holding initdb, else initdb on PATH."""
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name)
                      if p.parent.parent.name.isdigit() else 0)
    if versions:
        return versions[-1].parent
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def _run_as() -> tuple[list[str], pwd.struct_passwd | None] | None:
    """The command prefix that runs the server as a non-root user (and that user); None when impossible."""
    if os.geteuid() != 0:
        return [], None
    for name in ("postgres", "nobody"):
        try:
            user = pwd.getpwnam(name)
        except KeyError:
            continue
        if shutil.which("runuser"):
            return ["runuser", "-u", name, "--"], user
        if shutil.which("setpriv"):
            return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"], user
    return None


def unavailable_reason() -> str | None:
    """Why no PostgreSQL server can be started here (None: it can)."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg 3 is not installed (pip install 'medseg[postgres]')"
    if _bin_dir() is None:
        return "PostgreSQL server binaries not found (Debian package postgresql: /usr/lib/postgresql/*/bin)"
    if _run_as() is None:
        return "running as root and neither runuser nor setpriv with a postgres/nobody user is available"
    return None


@contextmanager
def postgres() -> Iterator[str]:
    """A running server; yields the URL of its ``postgres`` database for the role ``medseg`` (trust auth)."""
    bin_dir = _bin_dir()
    prefix_user = _run_as()
    assert bin_dir is not None and prefix_user is not None, unavailable_reason()
    prefix, user = prefix_user
    root = Path(tempfile.mkdtemp(prefix="medseg-pg-"))
    if user is not None:
        os.chown(root, user.pw_uid, user.pw_gid)
        os.chmod(root, 0o700)
    data, log = root / "data", root / "server.log"
    env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
    try:
        subprocess.run([*prefix, str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", ROLE, "-E", "UTF8",
                        "--no-sync", "--no-instructions"], check=True, capture_output=True, env=env, cwd=root)
        port = free_port()
        options = (f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off "
                   "-c full_page_writes=off -c max_connections=200")
        started = subprocess.run([*prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(log),
                                  "-w", "-t", "60", "start"], capture_output=True, text=True, env=env, cwd=root)
        if started.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {started.stderr}\n{log.read_text() if log.exists() else ''}")
        try:
            yield f"postgresql://{ROLE}@127.0.0.1:{port}/postgres"
        finally:
            subprocess.run([*prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                           capture_output=True, env=env, cwd=root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def fresh_database(server_url: str) -> str:
    """A new, empty database on the server; its URL (one per test, so tests never see each other's jobs)."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name}")
    return server_url.rsplit("/", 1)[0] + f"/{name}"
