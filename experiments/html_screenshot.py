"""Screenshot of the HTML report in headless Chromium, to check that the page reads well offline.

    python experiments/html_screenshot.py [--batch 8] [--window 1400,2000]

Tracks two AdamW steps of the demo GPT (memprof.zoo.DEMO_GPT, ~6.8M parameters) on CPU, writes report.html
with ``memprof.plots.html_report`` into a temporary folder, and renders it with ``/usr/bin/chromium``
(Debian: ``apt-get install -y chromium``) with networking features off, so anything the page tried to fetch
would be missing from the picture. Writes results/report-screenshot.png and results/report-screenshot.json
(environment, Chromium version, the exact command, the profile's peak and the page size).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch  # noqa: I001
from _common import RESULTS, write_result

import memprof
from memprof import plots
from memprof.zoo import DEMO_GPT, GPT, gpt_batch

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def find_chromium() -> str:
    for name in ("/usr/bin/chromium", "chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    sys.exit("chromium not found: install it with `apt-get install -y chromium` (Debian)")


def track_demo(batch: int) -> memprof.Profile:
    torch.manual_seed(0)
    model = GPT(DEMO_GPT)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    x, y = gpt_batch(DEMO_GPT, batch)
    with memprof.track(model, opt) as tr:
        for _ in range(2):  # the first step creates AdamW's state; the second is a steady step
            model(x, y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return tr.profile


def screenshot(chromium: str, page: Path, out: Path, window: str, user_dir: str) -> list[str]:
    cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={user_dir}", f"--screenshot={out}",
           f"--window-size={window}", page.resolve().as_uri()]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    return cmd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--window", default="1400,2000", help="width,height in CSS pixels")
    args = ap.parse_args()

    chromium = find_chromium()
    version = subprocess.run([chromium, "--version"], capture_output=True, text=True).stdout.strip()
    prof = track_demo(args.batch)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "report-screenshot.png"
    with tempfile.TemporaryDirectory() as tmp:
        page = plots.html_report(prof, Path(tmp) / "report.html")
        page_bytes = page.stat().st_size
        cmd = screenshot(chromium, page, out, args.window, str(Path(tmp) / "chromium-profile"))
    cmd = [c.replace(tmp, "<tmp>").replace(str(RESULTS.parent) + "/", "") for c in cmd]
    result = {
        "model": f"memprof.zoo.DEMO_GPT {DEMO_GPT}, batch {args.batch}, 2 AdamW steps, CPU",
        "peak_bytes": prof.peak_bytes,
        "peak": {"step": prof.peak.step, "phase": prof.peak.phase, "module": prof.peak.module},
        "report_html_bytes": page_bytes,
        "screenshot": out.name,
        "screenshot_bytes": out.stat().st_size,
        "window": args.window,
        "chromium": version,
        "command": cmd,
    }
    path = write_result("report-screenshot", result)
    print(f"wrote {out} and {path}")


if __name__ == "__main__":
    main()
