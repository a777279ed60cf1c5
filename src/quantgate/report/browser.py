"""Render a report in a real headless browser (Chromium): a screenshot to look at, the DOM to check."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

# Flags for a sandbox without a display or network: no GPU, no background connections.
_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
          "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]
_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")


def find_browser() -> str | None:
    """Path of a Chromium-family browser on PATH, or None."""
    for name in _NAMES:
        if path := shutil.which(name):
            return path
    return None


def _run(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    browser = find_browser()
    if browser is None:
        raise FileNotFoundError("no Chromium on PATH: install Debian's chromium (apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="quantgate-chromium-") as profile:
        return subprocess.run([browser, *_FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                              timeout=timeout, check=True)


def screenshot(html_file: str | Path, png_file: str | Path, width: int = 1280, height: int = 2400,
               timeout: int = 120) -> Path:
    """Open ``html_file`` offline and save what the browser shows to ``png_file``."""
    import tempfile

    from quantgate.atomic import atomic_write_bytes

    png_file = Path(png_file).resolve()
    png_file.parent.mkdir(parents=True, exist_ok=True)
    # Chromium writes the file itself (and wants a .png name): into a private directory, then
    # published whole through quantgate.atomic once the browser exited cleanly.
    with tempfile.TemporaryDirectory(prefix=".tmp-screenshot-", dir=png_file.parent) as scratch:
        shot = Path(scratch) / "screenshot.png"
        _run([f"--window-size={width},{height}", f"--screenshot={shot}", Path(html_file).resolve().as_uri()], timeout)
        atomic_write_bytes(png_file, shot.read_bytes())
    return png_file


def rendered_dom(html_file: str | Path, timeout: int = 120) -> str:
    """The DOM after the browser loaded and laid out ``html_file``."""
    return _run(["--dump-dom", Path(html_file).resolve().as_uri()], timeout).stdout.decode("utf-8", "replace")
