"""Plan a model in one process and write what autotp decided: plan.json, graph.dot/svg, plan.html --
and, with --png, a picture of the page taken by headless chromium (the README's docs/plan_page.png).

    python examples/plan_dump.py --model gpt2-small --world-size 4 --out plan/ --png docs/plan_page.png

The same as ``autotp plan MODEL --world-size N --out DIR``, plus the screenshot.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile


def screenshot(page: str, png: str, *, width: int, height: int) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("--png needs chromium (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        "--hide-scrollbars", f"--user-data-dir={profile}", f"--window-size={width},{height}",
                        f"--screenshot={os.path.abspath(png)}", f"file://{os.path.abspath(page)}"],
                       check=True, capture_output=True, timeout=120)
    print(f"wrote {png} ({os.path.getsize(png) / 1024:.0f} KiB)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gpt2-small", help="an `autotp plan` MODEL (default gpt2-small)")
    ap.add_argument("--world-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--out", default="autotp-plan")
    ap.add_argument("--png", help="also write a screenshot of plan.html here")
    ap.add_argument("--width", type=int, default=1000)
    ap.add_argument("--height", type=int, default=760)
    args = ap.parse_args()

    from autotp.cli import main as autotp_main

    code = autotp_main(["plan", args.model, "--world-size", str(args.world_size), "--seq-len", str(args.seq_len),
                        "--out", args.out])
    if code == 0 and args.png:
        screenshot(os.path.join(args.out, "plan.html"), args.png, width=args.width, height=args.height)
    raise SystemExit(code)


if __name__ == "__main__":
    main()
