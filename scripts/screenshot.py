"""Screenshot a page (a file or an http://127.0.0.1 URL) with headless Chromium, as people see it.

    .venv/bin/python scripts/screenshot.py runs/gallery.html /tmp/gallery.png --height 2400

Chromium is Debian's (`apt-get install chromium`; scripts/install_chromium.sh), or $CHROMIUM.
Exits 2 with one line when there is no browser.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def chromium() -> str | None:
    for name in (os.environ.get("CHROMIUM", ""), "chromium", "chromium-browser",
                 "google-chrome"):
        if name and (found := shutil.which(name)):
            return found
    return None


def screenshot(page: str, out: str | Path, *, width: int = 1400, height: int = 1800,
               timeout: float = 120) -> Path:
    browser = chromium()
    if browser is None:
        raise FileNotFoundError("no Chromium found (apt-get install chromium, or set CHROMIUM)")
    url = page if "://" in page else Path(page).resolve().as_uri()
    out = Path(out).resolve()
    with tempfile.TemporaryDirectory() as profile:
        # --no-sandbox: CI and these machines run as root; the page is our own file.
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                        "--hide-scrollbars", f"--user-data-dir={profile}",
                        f"--window-size={width},{height}", "--virtual-time-budget=5000",
                        f"--screenshot={out}", url],
                       check=True, capture_output=True, timeout=timeout)
    if not out.is_file():
        raise RuntimeError(f"Chromium wrote no screenshot of {url}")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("page")
    p.add_argument("out")
    p.add_argument("--width", type=int, default=1400)
    p.add_argument("--height", type=int, default=1800)
    args = p.parse_args()
    try:
        print(screenshot(args.page, args.out, width=args.width, height=args.height))
    except (FileNotFoundError, RuntimeError, subprocess.CalledProcessError) as exc:
        print(f"screenshot: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
