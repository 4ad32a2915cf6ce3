"""Render a self-contained HTML report in headless Chromium, as a reader's browser would.

The reports (compare's report.html, inspect's inspect.html) have no scripts; a copy gets a
probe script that counts the images that decoded, and the DOM and a screenshot come back.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")

PROBE = (
    "<script>window.addEventListener('load',()=>{const ok=[...document.images].filter("
    "i=>i.complete&&i.naturalWidth>100);document.body.setAttribute('data-loaded-images',"
    "ok.length);});</script>"
)


def render(page: Path, tmp_path: Path, size: str = "1400,2000") -> tuple[str, Path]:
    """(the DOM after load, with data-loaded-images set; a PNG screenshot of the page)."""
    probed = tmp_path / "probe.html"
    probed.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    flags = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=5000",
    ]
    dom = subprocess.run(
        [*flags, "--dump-dom", probed.as_uri()], capture_output=True, text=True, timeout=90
    ).stdout
    shot = tmp_path / "shot.png"
    subprocess.run(
        [*flags, f"--screenshot={shot}", f"--window-size={size}", probed.as_uri()],
        capture_output=True,
        timeout=90,
    )
    return dom, shot


def colours(shot: Path) -> int:
    """How many distinct colours the screenshot has (a blank page has a handful)."""
    from PIL import Image

    found = Image.open(shot).convert("RGB").getcolors(maxcolors=1_000_000)
    return 1_000_001 if found is None else len(found)
