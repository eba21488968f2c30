"""Seconds per stage of a prediction, so ``medseg predict -v`` shows where the time goes without a profiler.

The stages of one scan, in pipeline order (:data:`STAGES`):

- ``read``: reading the file and decompressing it (gzip NIfTI, DICOM decoding), with the header checks;
- ``resample_in``: reorientation, resampling to the model's spacing and intensity normalisation;
- ``network``: the network's forward calls (mirrored copies and ensemble members included);
- ``sliding_window``: cutting the windows, Gaussian-weighted stitching, flips and softmax around those calls;
- ``resample_out``: probabilities back onto the scan's grid, argmax, keep-largest-component, the mask image;
- ``statistics``: the uncertainty summary, per-class statistics and QC flags;
- ``write``: compressing and writing the outputs (mask, SEG, sidecars, statistics rows, preview).

``read`` of the next scan and ``write`` of the previous one run in background threads while the network
runs, so the stages of a batch add up to more than its wall time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

#: Stage names in pipeline order; other names are allowed (listed after these).
STAGES: tuple[str, ...] = ("read", "resample_in", "network", "sliding_window", "resample_out", "statistics", "write")


class StageTimes:
    """Seconds spent per named stage, added up over calls (thread-safe: reader and writer threads add too)."""

    def __init__(self) -> None:
        self._seconds: dict[str, float] = {}
        self._lock = threading.Lock()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the ``with`` block (wall clock, s) and add it to ``name``, also when the block raises."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        """Add ``seconds`` to stage ``name``."""
        with self._lock:
            self._seconds[name] = self._seconds.get(name, 0.0) + seconds

    def merge(self, other: StageTimes) -> None:
        """Add every stage of ``other`` (a scan's times into a run's totals)."""
        for name, seconds in other.as_record(digits=None).items():
            self.add(name, seconds)

    def __getitem__(self, name: str) -> float:
        with self._lock:
            return self._seconds.get(name, 0.0)

    @property
    def total(self) -> float:
        """Sum over the stages, s (more than wall time where stages overlapped)."""
        with self._lock:
            return sum(self._seconds.values())

    def around_network(self) -> float:
        """Seconds of every stage but ``network``: the work the issue's 25 % goal is about."""
        with self._lock:
            return sum(s for name, s in self._seconds.items() if name != "network")

    def as_record(self, digits: int | None = 3) -> dict[str, float]:
        """``{stage: seconds}`` in pipeline order (rounded to ``digits``), for logs and JSON."""
        with self._lock:
            names = [n for n in STAGES if n in self._seconds] + sorted(set(self._seconds) - set(STAGES))
            return {n: self._seconds[n] if digits is None else round(self._seconds[n], digits) for n in names}

    def describe(self) -> str:
        """One line: ``read 1.20 s, resample_in 0.80 s, network 10.3 s, ...`` (empty when nothing was timed)."""
        parts = [f"{name} {seconds:.2f} s" for name, seconds in self.as_record(digits=None).items()]
        network = self["network"]
        if network > 0:
            parts.append(f"around the network {100 * self.around_network() / network:.0f} % of it")
        return ", ".join(parts)
