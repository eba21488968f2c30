"""Errors shown to users: the CLI prints them without a traceback and exits non-zero.

Every message names the file (or config key) and the problem, so a user can act on it.
"""

from __future__ import annotations

from pathlib import Path


class MedsegError(Exception):
    """Base class for problems caused by the user's input, config or environment."""


class ConfigError(MedsegError):
    """An experiment config is missing, unreadable or invalid."""


class ManifestError(MedsegError):
    """A data manifest is unreadable or names cases that cannot be used."""


class CheckpointError(MedsegError):
    """A model checkpoint or run folder cannot be used for prediction or resuming."""


class ScanError(MedsegError):
    """A scan (file or DICOM series folder) cannot be read or used."""

    def __init__(self, path: str | Path, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class DicomSeriesError(ScanError):
    """A DICOM series is inconsistent (gaps, mixed orientations, tilt, undecodable pixels...)."""


class GeometryError(ScanError):
    """Image geometry is unusable (bad spacing, shear) or does not match its label."""


class OutputError(MedsegError):
    """An output location is unusable (unwritable, or two inputs map to one output)."""


class ExportError(MedsegError):
    """A model cannot be exported, or its export differs from the eager model (nothing is written)."""


class PacsError(MedsegError):
    """A PACS (DICOMweb server) is unreachable, refuses the credentials, times out or refuses a request."""


class ScanTooLargeError(ScanError):
    """Predicting a scan would need more memory than this process may use (refused before loading it)."""
