"""Uploads: the multipart body read as a stream under a size cap and a deadline, content sniffed, zips
of DICOM series extracted safely.

Nothing a client sends decides a path: the scan is written under a name of ours, its kind comes from its
first bytes (never from the file name or the declared content type), and zip members are written as
numbered files in one folder after their names were checked (absolute, ``..``, symlink and encrypted
members refuse the whole archive). Decompressed sizes are counted while extracting, so a zip bomb that
lies in its directory is stopped too.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import re
import stat
import struct
import zipfile
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from python_multipart.multipart import MultipartParser, parse_options_header

FIELD = "scan"
#: Most ``scan`` fields one upload may hold (one per input channel of a multi-channel model).
MAX_SCAN_PARTS = 16
#: A zip member that is one channel file of a case in nnU-Net naming: ``CASE_0001.nii.gz``.
CHANNEL_MEMBER = re.compile(r"(?:^|/)(?P<case>[^/]+)_(?P<channel>\d{4})\.nii(?P<gz>\.gz)?$")
#: Room for the multipart framing and small extra fields on top of the scan's own size cap.
_FRAMING_BYTES = 64 * 1024
_CHUNK = 1024 * 1024


class UploadError(Exception):
    """An upload refused with an HTTP ``status`` and a message for the client (no file contents in it)."""

    def __init__(self, status: int, message: str):
        self.status = status
        self.message = message
        super().__init__(message)


@dataclass(frozen=True)
class ZipLimits:
    """Caps on a DICOM zip: total decompressed bytes, member count, and compression ratio of one member."""

    max_bytes: int
    max_members: int = 20000
    max_ratio: float = 200.0


async def receive_scan(chunks: AsyncIterator[bytes], content_type: str | None, content_length: str | None,
                       folder: Path, max_bytes: int, timeout_s: float,
                       max_parts: int = MAX_SCAN_PARTS) -> tuple[int, str, list[Path]]:
    """Write the ``scan`` fields of a multipart body to ``folder`` (``part-0``, ``part-1``... in the order sent:
    the channels of a multi-channel case); their total size (bytes), the SHA-256 of all their bytes in order,
    and the files.

    Refused: a body that is not ``multipart/form-data`` (415), a declared or actual size over ``max_bytes``
    (413, stopped as soon as it is exceeded), a body not complete within ``timeout_s`` (408), a missing or
    empty ``scan`` field, or more than ``max_parts`` of them (400).
    """
    mime, options = parse_options_header(content_type or "")
    boundary = options.get(b"boundary")
    if mime != b"multipart/form-data" or not boundary:
        raise UploadError(415, f"send the scan as multipart/form-data with a field '{FIELD}'")
    if content_length is not None:
        try:
            declared = int(content_length)
        except ValueError:
            raise UploadError(400, "invalid Content-Length") from None
        if declared > max_bytes + _FRAMING_BYTES:
            raise UploadError(413, f"upload of {declared} bytes exceeds the limit of {max_bytes} bytes")

    state = {"name": None, "header_field": b"", "header_value": b"", "headers": {}, "scan_parts": 0, "size": 0,
             "part_size": 0}
    digest = hashlib.sha256()
    parts: list[Path] = []
    files: list = []

    def on_part_begin() -> None:
        state["headers"] = {}
        state["name"] = None

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["header_field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["header_value"] += data[start:end]

    def on_header_end() -> None:
        state["headers"][state["header_field"].lower()] = state["header_value"]
        state["header_field"] = state["header_value"] = b""

    def on_headers_finished() -> None:
        _, disposition = parse_options_header(state["headers"].get(b"content-disposition", b""))
        name = disposition.get(b"name", b"").decode("latin-1")
        state["name"] = name
        if name == FIELD:
            state["scan_parts"] += 1
            if state["scan_parts"] > max_parts:
                raise UploadError(400, f"send at most {max_parts} '{FIELD}' fields (one per input channel)")
            if files and state["part_size"] == 0:
                raise UploadError(400, f"field '{FIELD}' number {len(files)} is empty")
            if files:
                files[-1].close()
            parts.append(folder / f"part-{len(parts)}")
            files.append(parts[-1].open("xb"))
            state["part_size"] = 0

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if state["name"] != FIELD:
            return
        piece = data[start:end]
        state["size"] += len(piece)
        state["part_size"] += len(piece)
        if state["size"] > max_bytes:
            raise UploadError(413, f"scan exceeds the upload limit of {max_bytes} bytes")
        digest.update(piece)
        files[-1].write(piece)

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_headers_finished": on_headers_finished, "on_part_data": on_part_data,
    })
    total = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in chunks:
                total += len(chunk)
                if total > max_bytes + _FRAMING_BYTES:
                    raise UploadError(413, f"upload exceeds the limit of {max_bytes} bytes")
                parser.write(chunk)
        parser.finalize()
    except TimeoutError:
        raise UploadError(408, f"upload not complete within {timeout_s:g} s") from None
    except UploadError:
        raise
    except Exception as exc:  # python-multipart's parse errors: a malformed or truncated body
        raise UploadError(400, f"malformed multipart body ({type(exc).__name__})") from None
    finally:
        for f in files:
            f.close()
    if state["scan_parts"] == 0:
        raise UploadError(400, f"multipart field '{FIELD}' missing")
    if state["part_size"] == 0:
        raise UploadError(400, f"field '{FIELD}' is empty" if len(parts) == 1 else
                               f"field '{FIELD}' number {len(parts)} is empty")
    return state["size"], digest.hexdigest(), parts


def _nifti_header_kind(head: bytes) -> str | None:
    """``nifti`` when ``head`` starts a single-file NIfTI-1 or NIfTI-2 header, else None."""
    if len(head) >= 348:
        for order in "<>":
            if struct.unpack(f"{order}i", head[:4])[0] == 348 and head[344:348] == b"n+1\x00":
                return "nifti"
    if len(head) >= 12:
        for order in "<>":
            if struct.unpack(f"{order}i", head[:4])[0] == 540 and head[4:12] == b"n+2\x00\r\n\x1a\n":
                return "nifti"
    return None


def sniff(path: Path) -> str:
    """What the bytes are: ``nifti`` (``.nii``), ``nifti-gz`` (``.nii.gz``) or ``zip``.

    Raises :class:`UploadError` 415 for anything else (including a gzip that does not hold a NIfTI header,
    and a two-file ``.hdr/.img`` NIfTI), 400 for a gzip too damaged to read the header from.
    """
    with path.open("rb") as f:
        head = f.read(548)
    if head[:2] == b"\x1f\x8b":
        try:
            with gzip.open(path, "rb") as g:
                inner = g.read(548)
        except (OSError, EOFError, zlib.error):
            raise UploadError(400, "gzip stream is damaged or truncated") from None
        if _nifti_header_kind(inner):
            return "nifti-gz"
        raise UploadError(415, "gzip content is not a NIfTI image")
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if head[:4] in (b"PK\x05\x06", b"PK\x07\x08"):
        raise UploadError(400, "the zip archive is empty")
    if _nifti_header_kind(head):
        return "nifti"
    raise UploadError(415, "not a NIfTI image (.nii / .nii.gz) or a zip of one DICOM series")


def _check_member(info: zipfile.ZipInfo, limits: ZipLimits) -> None:
    name = info.filename
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
        raise UploadError(400, "the zip holds a member whose path leaves the archive (absolute or '..'); refused")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise UploadError(400, "the zip holds a symbolic link; refused")
    if info.flag_bits & 0x1:
        raise UploadError(400, "the zip holds an encrypted member; refused")
    if info.file_size > 1024 * 1024 and info.file_size > limits.max_ratio * max(info.compress_size, 1):
        raise UploadError(413, f"a zip member expands more than {limits.max_ratio:g}-fold (zip bomb?); refused")


def _channel_names(infos: list[zipfile.ZipInfo]) -> list[str] | None:
    """``scan_0000.nii.gz``... for a zip whose every file is named ``CASE_XXXX.nii[.gz]`` (nnU-Net channel files
    of one case: the channel number is all we take from the name), else None (a DICOM series)."""
    files = [i for i in infos if not i.is_dir()]
    found = [CHANNEL_MEMBER.search(i.filename) for i in files]
    if not files or any(m is None for m in found):
        return None
    names = [f"scan_{m['channel']}.nii{m['gz'] or ''}" for m in found if m is not None]
    cases = {m['case'] for m in found if m is not None}
    if len(cases) > 1:
        raise UploadError(400, "the zip holds channel files of several cases; send one case per upload")
    if len(set(names)) != len(names) or sorted(int(n[5:9]) for n in names) != list(range(len(names))):
        raise UploadError(400, "the zip's channel files must be numbered _0000, _0001, ... once each")
    return names


def extract_zip(archive: Path, dest: Path, limits: ZipLimits) -> str:
    """Extract the regular files of ``archive`` into ``dest``: the channel files of one multi-channel case
    (every member named ``CASE_XXXX.nii.gz``) as ``dest/scan_XXXX.nii.gz`` (returns ``channels``), else a DICOM
    series as ``dest/scan/00000.dcm``, ``00001.dcm``... (returns ``dicom``).

    Member names are checked, never used as paths (a channel file's number is taken from its name). Refused:
    unreadable archives, damaged members (CRC), unsafe names, symlinks and encrypted members (400); more
    members, more decompressed bytes or a higher compression ratio than ``limits`` (413), counted on the
    actual bytes, not the declared sizes.
    """
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError, ValueError):
        raise UploadError(400, "not a readable zip archive") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > limits.max_members:
            raise UploadError(413, f"the zip holds {len(infos)} members (limit {limits.max_members})")
        for info in infos:
            _check_member(info, limits)
        if sum(i.file_size for i in infos) > limits.max_bytes:
            raise UploadError(413, f"the zip expands to more than {limits.max_bytes} bytes")
        channel_names = _channel_names(infos)
        folder = dest if channel_names is not None else dest / "scan"
        folder.mkdir(parents=True, exist_ok=channel_names is not None)
        total, count = 0, 0
        for info in infos:
            if info.is_dir():
                continue
            target = folder / (channel_names[count] if channel_names is not None else f"{count:05d}.dcm")
            count += 1
            written = 0
            try:
                with zf.open(info) as src, target.open("xb") as dst:
                    while piece := src.read(_CHUNK):
                        written += len(piece)
                        total += len(piece)
                        if written > info.file_size or total > limits.max_bytes:
                            raise UploadError(413, f"the zip expands to more than {limits.max_bytes} bytes")
                        dst.write(piece)
            except UploadError:
                raise
            except (zipfile.BadZipFile, OSError, EOFError, zlib.error, NotImplementedError, RuntimeError) as exc:
                raise UploadError(400, f"a zip member cannot be extracted ({type(exc).__name__})") from None
        if count == 0:
            raise UploadError(400, "the zip holds no files")
        return "channels" if channel_names is not None else "dicom"
