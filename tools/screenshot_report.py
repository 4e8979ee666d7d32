"""Screenshot an `edgeq profile --report` HTML file with headless Chromium, to look at it.

    .venv/bin/python tools/screenshot_report.py out/report.html [--out out/report.png] [--height 4000]

Needs Debian's headless Chromium (``apt-get install --no-install-recommends
chromium-headless-shell``, ~96 MB; or ``chromium``). Prints the PNG's path and size.
"""
from __future__ import annotations

import argparse
import shutil
import struct
import subprocess
import sys
from pathlib import Path

BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("html", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--width", type=int, default=1200)
    ap.add_argument("--height", type=int, default=4000)
    a = ap.parse_args()
    exe = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if exe is None:
        print("error: no headless Chromium (apt-get install --no-install-recommends chromium-headless-shell)",
              file=sys.stderr)
        return 1
    if not a.html.is_file():
        print(f"error: {a.html}: no such file", file=sys.stderr)
        return 1
    out = a.out or a.html.with_suffix(".png")
    args = [exe, "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--window-size={a.width},{a.height}",
            f"--screenshot={out.resolve()}", a.html.resolve().as_uri()]
    if not exe.endswith("headless-shell"):
        args.insert(1, "--headless=new")
    r = subprocess.run(args, capture_output=True, text=True, timeout=120)
    if r.returncode or not out.is_file():
        print(f"error: chromium failed ({r.returncode}): {r.stderr.strip()[-300:]}", file=sys.stderr)
        return 1
    head = out.read_bytes()[:24]
    w, h = struct.unpack(">II", head[16:24])
    print(f"{out}: {w}x{h} PNG, {out.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
