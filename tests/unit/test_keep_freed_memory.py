"""``keep_freed_memory``: predict keeps the memory it frees for its next scan instead of faulting it in again."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

PROBE = """
import json, numpy as np
from medseg.inference.memory import keep_freed_memory
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
kept = keep_freed_memory()
block = np.ones(200 * 2**20, dtype=np.uint8)  # far above glibc's 32 MB mmap limit
held = rss()
del block
print(json.dumps({"kept": kept, "released_mb": (held - rss()) / 2**20}))
"""


def _probe(**env: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                         env={**os.environ, **env})
    return json.loads(out.stdout)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="glibc's mallopt (Linux); other C libraries are left alone")
def test_freed_blocks_stay_with_the_process_unless_turned_off():
    kept = _probe()
    assert kept["kept"] is True
    assert kept["released_mb"] < 10  # the 200 MB block stays in the heap for the next scan
    default = _probe(MEDSEG_KEEP_FREED_MEMORY="0")
    assert default["kept"] is False
    assert default["released_mb"] > 190  # glibc's default: the block went back to the system on free
