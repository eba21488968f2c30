#!/usr/bin/env python
"""Render an evaluation report.html in headless Chromium and check the picture a person would see.

    python scripts/check_report_render.py runs/eval_real_data/lung/report.html [--png out.png]

Checks, beyond "Chromium rendered something": every embedded figure decodes as a PNG of a sensible size,
the page references nothing outside itself (self-contained), and the screenshot is neither blank nor
cut to a sliver. Exit 0 when all hold; 1 with the reasons otherwise; 2 when Chromium is not installed.
Look at the PNG too: this script cannot tell a misleading plot from a good one.
"""

from __future__ import annotations

import argparse
import base64
import io
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from matplotlib.image import imread

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome")
_EMBEDDED = re.compile(r"data:image/png;base64,([A-Za-z0-9+/=]+)")
# Resources the page would load (images, scripts, stylesheets) must be embedded; hyperlinks (<a href>) may go
# to the page itself (#id, which must exist) or to a web address, never to a relative file a copy lacks.
_EXTERNAL = re.compile(r"""(?:\bsrc|<(?!a\b)\w+[^>]*\bhref)\s*=\s*['"](?!data:|#)([^'"]+)['"]""", re.IGNORECASE)
_LINKS = re.compile(r"""<a\b[^>]*\bhref\s*=\s*['"]([^'"]+)['"]""", re.IGNORECASE)
_IDS = re.compile(r"""\bid\s*=\s*['"]([^'"]+)['"]""", re.IGNORECASE)


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome binary, or None."""
    for name in CHROMIUM_CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def render(html_path: Path, png_path: Path, chromium: str, width: int = 1280, height: int = 2000, timeout: float = 120) -> None:
    """Screenshot of the page (``width`` x ``height`` px) by headless Chromium, without network or profile."""
    with tempfile.TemporaryDirectory() as profile:
        cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
               f"--screenshot={png_path}", f"--window-size={width},{height}", html_path.resolve().as_uri()]
        subprocess.run(cmd, check=True, capture_output=True, timeout=timeout)


def check_html(text: str) -> list[str]:
    """Problems of the HTML itself: undecodable or tiny figures, external references."""
    problems = []
    figures = _EMBEDDED.findall(text)
    if not figures:
        problems.append("no embedded figures")
    for i, data in enumerate(figures):
        try:
            image = imread(io.BytesIO(base64.b64decode(data)), format="png")
        except Exception as exc:  # any decoding failure is the finding
            problems.append(f"figure {i} does not decode as PNG ({exc})")
            continue
        if image.shape[0] < 100 or image.shape[1] < 200:
            problems.append(f"figure {i} is only {image.shape[1]}x{image.shape[0]} px")
    external = _EXTERNAL.findall(text)
    if external:
        problems.append(f"references outside the file: {external[:3]}")
    ids = set(_IDS.findall(text))
    for link in _LINKS.findall(text):
        if link.startswith("#"):
            if link[1:] not in ids:
                problems.append(f"link {link} points to no element of the page")
        elif not link.startswith(("https://", "http://")):
            problems.append(f"link {link} is relative: it breaks when the report is copied or medseg is pip-installed")
    return problems


def check_screenshot(png_path: Path) -> list[str]:
    """Problems of the rendered page: missing, blank, or almost all one colour."""
    if not png_path.is_file():
        return [f"Chromium wrote no screenshot at {png_path}"]
    pixels = imread(str(png_path))[..., :3]
    ink = np.mean(np.any(pixels < 0.9, axis=-1))  # share of pixels that are not (near) white
    problems = []
    if ink < 0.03:
        problems.append(f"screenshot is almost blank ({ink:.1%} non-white pixels)")
    if ink > 0.9:
        problems.append(f"screenshot is almost all dark ({ink:.1%} non-white pixels): unstyled or broken page?")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("--png", type=Path, default=None, help="where to keep the screenshot (default: beside the report)")
    parser.add_argument("--height", type=int, default=2000)
    args = parser.parse_args(argv)
    chromium = find_chromium()
    if chromium is None:
        print("chromium not found (Debian: apt-get install -y chromium)", file=sys.stderr)
        return 2
    png = args.png or args.report.with_name("report_screenshot.png")
    problems = check_html(args.report.read_text(encoding="utf-8"))
    render(args.report, png, chromium, height=args.height)
    problems += check_screenshot(png)
    for p in problems:
        print(f"PROBLEM: {p}")
    print(f"screenshot: {png}" + ("" if problems else "  (all checks passed)"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
