"""A real Orthanc PACS with its DICOMweb plugin, started by the tests on loopback with a generated
configuration and generated credentials (Debian packages ``orthanc`` and ``orthanc-dicomweb``)."""

from __future__ import annotations

import json
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

PLUGIN_DIRS = [Path("/usr/share/orthanc/plugins"), Path("/usr/lib/orthanc")]


@dataclass
class OrthancServer:
    """A running server: its DICOMweb URL, REST URL and the generated ``user:password``."""

    dicomweb_url: str
    rest_url: str
    auth: str
    process: subprocess.Popen

    @property
    def user_password(self) -> tuple[str, str]:
        user, _, password = self.auth.partition(":")
        return user, password


def dicomweb_plugin() -> Path | None:
    for folder in PLUGIN_DIRS:
        found = sorted(folder.glob("libOrthancDicomWeb.so*")) if folder.is_dir() else []
        if found:
            return found[0]
    return None


def unavailable_reason() -> str | None:
    """Why Orthanc cannot run here, or None."""
    if shutil.which("Orthanc") is None:
        return "Orthanc not installed (Debian: apt-get install orthanc orthanc-dicomweb)"
    if dicomweb_plugin() is None:
        return "Orthanc's DICOMweb plugin not installed (Debian: apt-get install orthanc-dicomweb)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def orthanc(folder: Path, timeout_s: float = 30.0) -> Iterator[OrthancServer]:
    """Start Orthanc on a free loopback port, wait until it answers, stop it afterwards."""
    import requests

    port = free_port()
    user, password = "medseg-" + secrets.token_hex(4), secrets.token_urlsafe(18)
    config = {
        "Name": "medseg-test", "StorageDirectory": str(folder / "storage"), "IndexDirectory": str(folder / "index"),
        "HttpPort": port, "DicomServerEnabled": False, "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True, "RegisteredUsers": {user: password},
        "Plugins": [str(dicomweb_plugin())], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "HttpTimeout": 60, "StableAge": 1,
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "orthanc.json").write_text(json.dumps(config), encoding="utf-8")
    log = (folder / "orthanc.log").open("w")
    process = subprocess.Popen(["Orthanc", str(folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    rest = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if requests.get(rest + "/system", auth=(user, password), timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Orthanc did not start; see {folder / 'orthanc.log'}")
            time.sleep(0.2)
        yield OrthancServer(rest + "/dicom-web", rest, f"{user}:{password}", process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def upload_folder(server: OrthancServer, folder: Path) -> None:
    """Send every file of a DICOM folder to Orthanc's REST API."""
    import requests

    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        response = requests.post(server.rest_url + "/instances", data=path.read_bytes(),
                                 auth=server.user_password, timeout=30)
        response.raise_for_status()
