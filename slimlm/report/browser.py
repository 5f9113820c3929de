"""Headless Chromium: install it when missing, screenshot a page, read back its DOM.

Used by the report test to check that the page renders offline. Chromium runs with
networking mapped away (`--host-resolver-rules`, no proxy), so a page that tried to
fetch anything would show a broken image rather than quietly load it.

    python -m slimlm.report.browser --install     # apt-get install chromium when absent (root)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
          "--host-resolver-rules=MAP * ~NOTFOUND", "--no-proxy-server", "--hide-scrollbars"]


def find_chromium() -> str | None:
    for n in NAMES:
        path = shutil.which(n)
        if path:
            return path
    return None


def ensure_chromium() -> tuple[str | None, str]:
    """(path, "") when Chromium is there or could be installed, else (None, why not)."""
    path = find_chromium()
    if path:
        return path, ""
    if not shutil.which("apt-get"):
        return None, "Chromium is not installed and apt-get is not available to install it"
    if os.geteuid() != 0:
        return None, "Chromium is not installed and installing it with apt-get needs root"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if r.returncode:
            return None, f"`{' '.join(cmd)}` failed: {r.stderr.strip()[-300:]}"
    path = find_chromium()
    return (path, "") if path else (None, "apt-get installed chromium but no chromium binary is on PATH")


def _run(chromium: str, args: list[str], timeout: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="slimlm-chromium-") as profile:
        cmd = [chromium, *_FLAGS, f"--user-data-dir={profile}", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def dump_dom(chromium: str, page: str | Path, timeout: float = 120) -> str:
    """The page's DOM after load (scripts run), as serialized HTML."""
    r = _run(chromium, ["--virtual-time-budget=5000", "--dump-dom", Path(page).resolve().as_uri()], timeout)
    if r.returncode:
        raise RuntimeError(f"chromium --dump-dom failed ({r.returncode}): {r.stderr[-500:]}")
    return r.stdout


def screenshot(chromium: str, page: str | Path, png: str | Path, width: int = 1280, height: int = 1600,
               timeout: float = 120) -> Path:
    """A PNG screenshot of `page` at `width`×`height`."""
    png = Path(png).resolve()
    r = _run(chromium, [f"--window-size={width},{height}", f"--screenshot={png}", "--virtual-time-budget=5000",
                        Path(page).resolve().as_uri()], timeout)
    if r.returncode or not png.is_file():
        raise RuntimeError(f"chromium --screenshot failed ({r.returncode}): {r.stderr[-500:]}")
    return png


if __name__ == "__main__":
    if "--install" in sys.argv[1:]:
        found, why = ensure_chromium()
        print(found or f"not installed: {why}")
        sys.exit(0 if found else 1)
    print(find_chromium() or "chromium not found")
