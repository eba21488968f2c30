"""A PACS over DICOMweb (QIDO-RS, WADO-RS, STOW-RS) through ``dicomweb-client``: list a study's series,
download one, store a result.

Credentials never come from the command line (they would show in ``ps`` and shell history): they are read
from the environment variable ``MEDSEG_DICOMWEB_AUTH`` or from a file, as ``user:password`` (HTTP basic) or
``Bearer TOKEN``. TLS options (a CA bundle, a client certificate) pass through to ``requests``. Every
failure becomes a :class:`~medseg.errors.PacsError` naming the server and what failed, never the
credentials.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medseg.errors import PacsError

if TYPE_CHECKING:
    import pydicom
    from dicomweb_client.api import DICOMwebClient

AUTH_ENV = "MEDSEG_DICOMWEB_AUTH"

_SERIES_UID, _MODALITY, _NUM_INSTANCES = "0020000E", "00080060", "00201209"


@dataclass(frozen=True)
class DicomWebSettings:
    """How to reach a DICOMweb server: its base URL (e.g. ``https://pacs/dicom-web``), where the credentials
    are (``auth_file``, else the ``MEDSEG_DICOMWEB_AUTH`` variable, else none), TLS options and a timeout."""

    url: str
    auth_file: Path | None = None
    ca_file: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    timeout_s: float = 60.0


@dataclass(frozen=True)
class SeriesInfo:
    """One series of a study as the server lists it."""

    uid: str
    modality: str
    instances: int | None


def _credentials(settings: DicomWebSettings) -> str | None:
    if settings.auth_file is not None:
        try:
            text = Path(settings.auth_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise PacsError(f"{settings.auth_file}: cannot read the DICOMweb credentials file "
                            f"({exc.strerror or exc})") from None
        if not text:
            raise PacsError(f"{settings.auth_file}: the DICOMweb credentials file is empty")
        return text
    return os.environ.get(AUTH_ENV) or None


def connect(settings: DicomWebSettings) -> DICOMwebClient:
    """A client for ``settings.url`` with its credentials and TLS options (nothing is sent yet)."""
    try:
        import requests
        from dicomweb_client.api import DICOMwebClient
    except ImportError:
        raise PacsError("DICOMweb needs the optional packages: pip install 'medseg[dicom]'") from None
    session = requests.Session()
    secret = _credentials(settings)
    if secret and secret.lower().startswith("bearer "):
        session.headers["Authorization"] = "Bearer " + secret[7:].strip()
    elif secret:
        user, sep, password = secret.partition(":")
        if not sep:
            source = settings.auth_file or f"${AUTH_ENV}"
            raise PacsError(f"{source}: DICOMweb credentials must be 'user:password' or 'Bearer TOKEN'")
        session.auth = (user, password)
    if settings.ca_file is not None:
        session.verify = str(settings.ca_file)
    if settings.client_cert is not None:
        session.cert = (str(settings.client_cert), str(settings.client_key)) if settings.client_key \
            else str(settings.client_cert)
    session.request = _with_timeout(session.request, settings.timeout_s)  # type: ignore[method-assign]
    return DICOMwebClient(settings.url.rstrip("/"), session=session)


def _with_timeout(request: Any, timeout_s: float) -> Any:
    def send(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("timeout", timeout_s)
        return request(*args, **kwargs)
    return send


@contextmanager
def server_errors(url: str, what: str) -> Iterator[None]:
    """Turn connection, HTTP and timeout errors into a PacsError that names the server and the step."""
    import requests
    try:
        yield
    except requests.exceptions.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        hint = {401: " (wrong or missing credentials)", 403: " (not allowed for these credentials)",
                404: " (not found)"}.get(status, "") if isinstance(status, int) else ""
        raise PacsError(f"{url}: {what} failed: HTTP {status}{hint}") from None
    except requests.exceptions.Timeout:
        raise PacsError(f"{url}: {what} timed out") from None
    except requests.exceptions.ConnectionError:
        raise PacsError(f"{url}: {what} failed: cannot connect (is the server running and the URL right?)") from None
    except requests.exceptions.RequestException as exc:
        raise PacsError(f"{url}: {what} failed: {type(exc).__name__}") from None


def _value(item: dict[str, Any], tag: str) -> Any:
    values = item.get(tag, {}).get("Value") or [None]
    return values[0]


def study_series(client: DICOMwebClient, url: str, study_uid: str) -> list[SeriesInfo]:
    """The series of a study (QIDO-RS); an unknown study is an error naming it."""
    with server_errors(url, f"listing the series of study {study_uid}"):
        found = client.search_for_series(study_instance_uid=study_uid,
                                         fields=["Modality", "NumberOfSeriesRelatedInstances"])
    if not found:
        raise PacsError(f"{url}: study {study_uid} not found (no series)")
    series = [SeriesInfo(str(_value(item, _SERIES_UID)), str(_value(item, _MODALITY) or ""),
                         _value(item, _NUM_INSTANCES)) for item in found]
    return sorted(series, key=lambda s: s.uid)


def series_present(client: DICOMwebClient, url: str, study_uid: str, series_uid: str) -> bool:
    """Whether the study already holds a series with this UID (QIDO-RS)."""
    with server_errors(url, f"searching study {study_uid} for series {series_uid}"):
        return bool(client.search_for_series(study_instance_uid=study_uid,
                                             search_filters={"SeriesInstanceUID": series_uid}))


def local_name(series_uid: str) -> str:
    """A file-system name for a series that is not a DICOM identifier: ``series-`` + 12 hex of its UID's hash."""
    return "series-" + hashlib.sha256(series_uid.encode()).hexdigest()[:12]


def download_series(client: DICOMwebClient, url: str, study_uid: str, series_uid: str, folder: Path) -> Path:
    """Retrieve a series (WADO-RS) into ``folder/<local_name>/`` as one file per instance.

    The folder appears complete or not at all: instances are written into a temporary sibling, renamed last.
    """
    target = Path(folder) / local_name(series_uid)
    if target.is_dir():
        shutil.rmtree(target)
    with server_errors(url, f"retrieving series {series_uid}"):
        instances = client.retrieve_series(study_uid, series_uid)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=folder))
    try:
        for i, ds in enumerate(instances):
            ds.save_as(tmp / f"{i:05d}.dcm", enforce_file_format=True)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def store(client: DICOMwebClient, url: str, datasets: Sequence[pydicom.Dataset]) -> None:
    """Store instances (STOW-RS); the server's refusal of any instance is an error."""
    with server_errors(url, "storing the segmentation"):
        response = client.store_instances(list(datasets))
    failed = response.get("00081198", {}).get("Value") if hasattr(response, "get") else None
    if failed:
        raise PacsError(f"{url}: the server refused {len(failed)} instance(s) of the segmentation")
