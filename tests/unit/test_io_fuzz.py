"""Mutated DICOM and NIfTI bytes: only medseg's own errors come out, never another type or a hang."""

from __future__ import annotations

import contextlib
import gzip
import random
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from dicom_synth import write_series
from pydicom.uid import ImplicitVRLittleEndian, RLELossless

from medseg.errors import MedsegError
from medseg.io.dicom import read_dicom_series
from medseg.io.scans import load_scan

CASES = 50
# A hang detector, not a speed test: wall time, so generous enough for a machine busy with other work.
SECONDS_PER_CASE = 60
# The speed bound counts this process's CPU time, which other processes on a busy machine do not inflate
# (50 cases take about 2 CPU-seconds).
CPU_SECONDS = 60


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Fail a case that hangs (wall-clock ``seconds``) instead of hanging the test run."""

    def _expired(signum, frame):
        raise TimeoutError(f"case ran over {seconds} s")

    previous = signal.signal(signal.SIGALRM, _expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def mutate(data: bytes, rng: random.Random, header_bytes: int) -> bytes:
    """One random mutation: empty, truncated, or a few bytes flipped (mostly in the header)."""
    kind = rng.choice(["empty", "truncate", "flip_header", "flip_header", "flip_anywhere"])
    if kind == "empty" or not data:
        return b""
    if kind == "truncate":
        return data[: rng.randrange(len(data))]
    buf = bytearray(data)
    limit = min(len(buf), header_bytes) if kind == "flip_header" else len(buf)
    for _ in range(rng.randint(1, 8)):
        buf[rng.randrange(limit)] = rng.randrange(256)
    return bytes(buf)


def outcome(read, target: Path) -> str:
    """'ok' or the medseg error type; any other exception fails the test with the case in the message."""
    try:
        with time_limit(SECONDS_PER_CASE):
            img = read(target)
            assert img.ndim == 3
            return "ok"
    except MedsegError as exc:
        return type(exc).__name__


@pytest.fixture(scope="module")
def dicom_series(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("fuzz_src")
    return [
        root / name
        for name, syntax in [("explicit", None), ("implicit", ImplicitVRLittleEndian), ("rle", RLELossless)]
        if write_series(root / name, 4, **({"transfer_syntax": syntax} if syntax else {}))
    ]


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the damage we did
def test_mutated_dicom_series_give_only_medseg_errors(dicom_series: list[Path], tmp_path: Path) -> None:
    rng = random.Random(20240601)
    start, seen = time.process_time(), []
    for case in range(CASES):
        source = dicom_series[case % len(dicom_series)]
        target = tmp_path / f"case_{case:02d}"
        shutil.copytree(source, target)
        for path in sorted(target.iterdir()):
            if rng.random() < 0.5:
                path.write_bytes(mutate(path.read_bytes(), rng, header_bytes=700))
        try:
            seen.append(outcome(read_dicom_series, target))
            seen.append(outcome(load_scan, target))
        except Exception as exc:  # pragma: no cover - the failure we look for
            pytest.fail(f"case {case} ({target}) raised {type(exc).__name__}: {exc}")
    assert time.process_time() - start < CPU_SECONDS
    assert "ok" in seen and len(set(seen)) > 1  # the mutations exercised both paths


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_mutated_nifti_files_give_only_medseg_errors(tmp_path: Path, suffix: str) -> None:
    rng = random.Random(7 if suffix == ".nii" else 8)
    source = tmp_path / f"source{suffix}"
    data = np.random.default_rng(0).normal(size=(6, 7, 5)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([0.8, 0.8, 2.0, 1.0])), str(source))
    original = source.read_bytes()
    plain = gzip.decompress(original) if suffix == ".nii.gz" else original
    start, seen = time.process_time(), []
    for case in range(CASES):
        target = tmp_path / f"case_{case:02d}{suffix}"
        if suffix == ".nii.gz" and case % 2:  # the NIfTI inside a valid gzip stream: header mutations reach it
            target.write_bytes(gzip.compress(mutate(plain, rng, header_bytes=352)))
        else:  # the compressed bytes themselves (nearly every such file is a broken gzip stream)
            target.write_bytes(mutate(original, rng, header_bytes=352))
        try:
            seen.append(outcome(load_scan, target))
        except Exception as exc:  # pragma: no cover - the failure we look for
            pytest.fail(f"case {case} ({target}) raised {type(exc).__name__}: {exc}")
    assert time.process_time() - start < CPU_SECONDS
    assert "ok" in seen and len(set(seen)) > 1  # the mutations exercised both paths


def test_gzipped_nifti_with_a_wrong_checksum_is_refused_naming_the_file(tmp_path: Path) -> None:
    """Voxels that do not match the gzip trailer's CRC-32 are corrupt: refused, not silently used."""
    source = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.arange(210, dtype=np.int16).reshape(6, 7, 5), np.eye(4)), str(source))
    data = bytearray(source.read_bytes())
    data[-8] ^= 0xFF  # the first byte of the CRC-32 in the trailer; the deflate stream itself is intact
    source.write_bytes(bytes(data))
    with pytest.raises(MedsegError, match=r"scan\.nii\.gz.*CRC"):
        load_scan(source)
