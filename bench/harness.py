"""The one way medseg's benchmarks measure: variants interleaved, repeated, summarised, recorded.

Every benchmark script in bench/ hands its variants (name -> a callable that runs one repeat) to
:func:`run_interleaved`, which runs them A B C A B C ... for ``repeats`` rounds (at least 3), so a machine
that gets busier or quieter during the run bills every variant alike, and no variant is always first
(cold caches). Each figure is then given as its median with the min-max range over the repeats.

:func:`record` wraps the results with what a reader needs to judge them: the machine (logical cores the
process may use, CPU model, platform, torch version and threads), the load average before and after, the
command (paths relative to the repository; others shown as ``<name>``), the git commit (``-dirty`` when the
tree had uncommitted changes), the date. :func:`write_record` writes that JSON under docs/benchmarks/;
docs/benchmarks.md quotes figures only from such files.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "benchmarks"
MIN_REPEATS = 3

#: One repeat of one variant: called with the repeat's index (0-based); returns its measurements (numbers,
#: e.g. ``{"seconds": 12.3, "peak_rss": 4e9}``) or None. Without a "seconds" entry the harness times the call.
Repeat = Callable[[int], Mapping[str, Any] | None]


def machine() -> dict[str, Any]:
    """The machine a benchmark ran on: cores usable by this process, CPU model, platform, library versions."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info: dict[str, Any] = {"cores": cores, "cpu_model": model, "platform": platform.platform(),
                            "python": platform.python_version()}
    torch = sys.modules.get("torch")
    if torch is not None:
        info |= {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    return info


def describe_machine() -> str:
    """:func:`machine` in words, for a docs line: "2 cores (AMD EPYC), Linux-..."."""
    m = machine()
    return f"{m['cores']} cores ({m['cpu_model']}), {m['platform']}"


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages, rounded to 0.01."""
    return [round(x, 2) for x in os.getloadavg()]


def git_commit() -> str:
    """HEAD's commit, with ``-dirty`` when tracked files other than benchmark records (docs/benchmarks.md,
    docs/benchmarks/) have uncommitted changes; "unknown" outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        # Benchmark records written earlier in the same session (docs/benchmarks*) are not code: not "dirty".
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)docs/benchmarks", ":(exclude)docs/benchmarks.md"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def portable(arg: str) -> str:
    """``arg`` with an absolute path made relative to the repository, or shown as ``<name>`` when outside it
    (a record names no folder of the machine that ran it)."""
    if not arg.startswith("/"):
        return arg
    path = Path(arg)
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return f"<{path.name}>"


def command(argv: Sequence[str] | None = None) -> str:
    """The command that ran the benchmark, as a reader would type it from the repository root."""
    argv = list(sys.argv if argv is None else argv)
    return "PYTHONPATH=$PWD python " + " ".join(portable(a) if "=" not in a else
                                                  a.split("=", 1)[0] + "=" + portable(a.split("=", 1)[1]) for a in argv)


def summary(values: Sequence[float]) -> dict[str, Any]:
    """Median, min, max and the values themselves (in run order)."""
    values = [float(v) for v in values]
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def run_interleaved(variants: Mapping[str, Repeat], repeats: int = MIN_REPEATS,
                    progress: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Run every variant ``repeats`` times, interleaved (A B A B ...); per variant and measurement the
    :func:`summary` over the repeats, plus the order they ran in and the load average around it all."""
    if repeats < MIN_REPEATS:
        raise ValueError(f"repeats={repeats}: at least {MIN_REPEATS} (a median of fewer is not one)")
    if not variants:
        raise ValueError("no variants to run")
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    order: list[str] = []
    before = load_average()
    for r in range(repeats):
        for name, run in variants.items():
            start = time.perf_counter()
            measured = dict(run(r) or {})
            measured.setdefault("seconds", time.perf_counter() - start)
            samples[name].append({k: float(v) for k, v in measured.items() if isinstance(v, int | float)})
            order.append(name)
            if progress is not None:
                progress(f"[{r + 1}/{repeats}] {name}: {measured['seconds']:.2f} s")
    after = load_average()
    results = {name: {key: summary([s[key] for s in runs if key in s]) for key in runs[0]}
               for name, runs in samples.items()}
    return {"repeats": repeats, "order": order, "load_average_before": before, "load_average_after": after,
            "variants": results}


def ratio(results: Mapping[str, Any], numerator: str, denominator: str, key: str = "seconds") -> float:
    """Median of ``numerator``'s ``key`` over the median of ``denominator``'s (e.g. a speed-up)."""
    variants = results["variants"]
    return variants[numerator][key]["median"] / variants[denominator][key]["median"]


def record(benchmark: str, measured: Mapping[str, Any], **details: Any) -> dict[str, Any]:
    """The JSON record of one benchmark run: what ran, where, when, from which commit, and its figures."""
    return {"benchmark": benchmark, "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "command": command(),
            "commit": git_commit(), "machine": machine(), **details, **measured}


def write_record(data: Mapping[str, Any], path: Path) -> Path:
    """Write ``data`` as JSON to ``path`` atomically. A relative path goes under docs/benchmarks/; one that
    already starts with ``docs/benchmarks/`` is taken from the repository root (the older commands' form)."""
    from medseg.atomic import write_text_atomic

    path = Path(path)
    if not path.is_absolute():
        path = REPO / path if path.parts[:2] == ("docs", "benchmarks") else RESULTS / path
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")
    return path


def cell(stats: Mapping[str, Any], digits: int = 2, unit: str = "") -> str:
    """A table cell: the median with the min-max range, e.g. ``29.7 (28.1–31.0)``."""
    return f"{stats['median']:.{digits}f}{unit} ({stats['min']:.{digits}f}–{stats['max']:.{digits}f})"


def conditions(data: Mapping[str, Any]) -> str:
    """One line for docs/benchmarks.md saying how a record was measured."""
    m = data["machine"]
    commit = data["commit"][:12] + ("-dirty" if data["commit"].endswith("-dirty") else "")
    return (f"Measured {data['date']} at commit `{commit}` with `{data['command']}`: {m['cores']} cores "
            f"({m['cpu_model']}), {data['repeats']} interleaved repeats, median (min–max); load average "
            f"{data['load_average_before']} before, {data['load_average_after']} after.")
