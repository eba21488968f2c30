"""The output-format registry: every per-format fact about the files a predicted mask becomes, in one entry.

An :class:`OutputFormat` says what ``--output-format NAME`` writes (its writers, in order), the suffixes of
its files (the done-marker, the temporaries a killed run leaves), whether it needs a DICOM series as source,
which extra installs it, whether ``auto`` includes it, its download route in ``medseg serve`` and whether
``medseg predict --dicomweb`` stores it back on the PACS. The CLI's choices, the batch runner, orphan
cleanup, the service's routes and the PACS store step all read this registry; adding a format is one
writer module plus one :func:`register_output_format` call (recipe: docs/extending.md).

An ``--output-format`` value is a format name, a comma-separated list of them (``nifti,rtstruct``), or an
alias: ``auto`` (the NIfTI mask, plus every format marked ``in_auto`` that the scan can take and that is
installed: a DICOM-SEG for a DICOM series when highdicom is there), ``both`` (``nifti,dicom-seg``, kept for
scripts written before the registry) and ``all`` (every registered format the scan can take and that is
installed). The NIfTI mask, when written, is written last and marks the scan done.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

from medseg.errors import OutputError
from medseg.io.mask_writers import (
    ITKSNAP_SUFFIX,
    NIFTI_SUFFIX,
    SEG_SUFFIX,
    SLICER_SUFFIX,
    DicomSegWriter,
    ItkSnapLabelWriter,
    MaskWriter,
    ModelInfo,
    NiftiMaskWriter,
    SlicerColorTableWriter,
)

#: The format whose file marks a scan done whenever it is among the outputs.
NIFTI = "nifti"
AUTO, BOTH, ALL = "auto", "both", "all"
ALIASES: dict[str, tuple[str, ...]] = {BOTH: ("nifti", "dicom-seg")}


@dataclass(frozen=True)
class OutputFormat:
    """One output format: its name, writers and the facts every face needs about it."""

    name: str
    #: The writers of this format for a model, in writing order; the last writes the format's main file.
    writers: Callable[[ModelInfo], list[MaskWriter]]
    #: Suffix of the main file (``<case_id><suffix>``), then of any further files it writes (sidecars).
    suffixes: tuple[str, ...]
    help: str
    needs_dicom: bool = False
    #: A module whose presence makes the format available, and the pip extra that installs it.
    requires_module: str | None = None
    extra: str | None = None
    in_auto: bool = False
    #: ``GET /v1/jobs/{id}/<route>`` in ``medseg serve`` (None: no download route), with its media type.
    route: str | None = None
    media_type: str = "application/octet-stream"
    #: A DICOM object ``medseg predict --dicomweb`` stores back on the PACS (STOW-RS).
    store_to_pacs: bool = False

    @property
    def suffix(self) -> str:
        """Suffix of the format's main file."""
        return self.suffixes[0]

    def available(self) -> bool:
        """Whether the package this format needs is installed."""
        return self.requires_module is None or importlib.util.find_spec(self.requires_module) is not None

    def accepts(self, scan_kind: str) -> bool:
        """Whether a scan of ``scan_kind`` (``nifti`` or ``dicom``) can have this output."""
        return scan_kind == "dicom" or not self.needs_dicom


_REGISTRY: dict[str, OutputFormat] = {}


def register_output_format(fmt: OutputFormat, *, replace: bool = False) -> None:
    """Add ``fmt`` to the registry (a name already taken is refused unless ``replace``)."""
    if fmt.name in (AUTO, ALL, *ALIASES) or "," in fmt.name:
        raise ValueError(f"{fmt.name!r} is reserved for --output-format aliases or lists")
    if fmt.name in _REGISTRY and not replace:
        raise ValueError(f"output format {fmt.name!r} is registered already")
    _REGISTRY[fmt.name] = fmt


def unregister_output_format(name: str) -> None:
    """Remove a format (tests that register a throwaway one)."""
    _REGISTRY.pop(name, None)


def output_format(name: str) -> OutputFormat:
    """The registry entry of ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise OutputError(f"unknown output format {name!r}; expected one of {', '.join(output_format_choices())}") from None


def registered_formats() -> list[OutputFormat]:
    """Every registered format, in registration order."""
    return list(_REGISTRY.values())


def output_format_choices() -> list[str]:
    """What ``--output-format`` accepts: the aliases and every registered format (lists join them with commas)."""
    return [AUTO, BOTH, ALL, *_REGISTRY]


def _ordered(names: set[str]) -> tuple[str, ...]:
    """Registration order, with the NIfTI mask (the done-marker) last."""
    ordered = [n for n in _REGISTRY if n in names and n != NIFTI]
    return (*ordered, NIFTI) if NIFTI in names else tuple(ordered)


def requested_formats(spec: str) -> tuple[str, ...]:
    """The format names an ``--output-format`` value names explicitly (aliases expanded; ``auto``/``all`` kept)."""
    names: list[str] = []
    for part in (p.strip() for p in str(spec).split(",")):
        if not part:
            continue
        if part in (AUTO, ALL):
            names.append(part)
        elif part in ALIASES:
            names += ALIASES[part]
        else:
            names.append(output_format(part).name)
    if not names:
        raise OutputError("--output-format is empty; expected one of " + ", ".join(output_format_choices()))
    return tuple(names)


def formats_for(spec: str, scan_kind: str) -> tuple[str, ...]:
    """The formats written for a scan of ``scan_kind`` under ``--output-format spec``, the done-marker last.

    ``auto`` and ``all`` take what the scan can have and what is installed; a format named explicitly is
    always returned (:func:`check_formats` refuses it beforehand when the scan or the install cannot have it).
    """
    chosen: set[str] = set()
    for name in requested_formats(spec):
        if name in (AUTO, ALL):
            chosen.add(NIFTI)
            chosen |= {f.name for f in _REGISTRY.values()
                       if (name == ALL or f.in_auto) and f.accepts(scan_kind) and f.available()}
        else:
            chosen.add(name)
    return _ordered(chosen)


def check_formats(spec: str, scan_kinds: dict[str, str]) -> list[str]:
    """Refuse, before any work, formats named explicitly that an input cannot have (``scan_kinds``: path ->
    kind) or whose package is missing; the warnings to log for ``auto``/``all`` formats left out."""
    warnings: list[str] = []
    explicit = [n for n in requested_formats(spec) if n not in (AUTO, ALL)]
    for name in explicit:
        fmt = output_format(name)
        if not fmt.available():
            raise OutputError(f"--output-format {name} needs {fmt.requires_module}: pip install 'medseg[{fmt.extra}]'")
        refused = [path for path, kind in scan_kinds.items() if not fmt.accepts(kind)]
        if refused:
            raise OutputError(f"--output-format {name} needs DICOM series as input; {len(refused)} input(s) are NIfTI, "
                              f"e.g. {refused[0]} (use --output-format auto or nifti)")
    if any(n in (AUTO, ALL) for n in requested_formats(spec)) and "dicom" in scan_kinds.values():
        for fmt in _REGISTRY.values():
            if fmt.needs_dicom and not fmt.available() and (fmt.in_auto or ALL in spec):
                warnings.append(f"{fmt.requires_module} is not installed: DICOM series get no {fmt.name} output "
                                f"(pip install 'medseg[{fmt.extra}]' adds it)")
    return warnings


def done_suffix(spec: str, scan_kind: str) -> str:
    """Suffix of the file that marks a scan done (written last): the NIfTI mask, else the last format's file."""
    return output_format(formats_for(spec, scan_kind)[-1]).suffix


def all_suffixes() -> tuple[str, ...]:
    """Every suffix any registered format writes (orphan temporaries of killed runs are found by these)."""
    return tuple(dict.fromkeys(s for f in _REGISTRY.values() for s in f.suffixes))


def routed_formats() -> list[OutputFormat]:
    """The formats with a download route in ``medseg serve``."""
    return [f for f in _REGISTRY.values() if f.route]


def _nifti_writers(model: ModelInfo) -> list[MaskWriter]:
    return [ItkSnapLabelWriter(model), SlicerColorTableWriter(model), NiftiMaskWriter()]


def _rtstruct_writers(model: ModelInfo) -> list[MaskWriter]:
    from medseg.io.rtstruct import RtStructWriter  # pydicom + scikit-image contours: loaded when used

    return [RtStructWriter(model)]


# The built-in formats. A new one: a writer module, then one call like these (docs/extending.md).
register_output_format(OutputFormat(
    "nifti", _nifti_writers, (NIFTI_SUFFIX, ITKSNAP_SUFFIX, SLICER_SUFFIX),
    "uint8 label NIfTI on the scan's grid, with ITK-SNAP and 3D Slicer label tables beside it",
    route="mask", media_type="application/gzip"))
register_output_format(OutputFormat(
    "dicom-seg", lambda model: [DicomSegWriter(model)], (SEG_SUFFIX,),
    "DICOM Segmentation (binary) referencing the source series (DICOM inputs)",
    needs_dicom=True, requires_module="highdicom", extra="dicom", in_auto=True, route="seg",
    media_type="application/dicom", store_to_pacs=True))
register_output_format(OutputFormat(
    "rtstruct", _rtstruct_writers, (".rtstruct.dcm",),
    "DICOM RT Structure Set: one ROI per class, planar contours in patient coordinates (DICOM inputs)",
    needs_dicom=True, route="rtstruct", media_type="application/dicom", store_to_pacs=True))
