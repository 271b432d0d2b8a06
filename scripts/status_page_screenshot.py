"""Regenerate the README's screenshot of the status page: the demo's run, its incident and its repair.

    .venv/bin/python scripts/status_page_screenshot.py [--out sidecar/status-page.png] [--steps 700]

Starts a real ``adamwatch-sidecar`` (as the demo does), opens the status page in
headless Chromium (``tests/status_page/browser.py``: Debian's chromium, nothing
downloaded), trains the demo's TinyGPT with its learning-rate blow-up in this
process, and takes the screenshot while the run is still going, once the
incident has been repaired and most steps are in. Fails (exit 1) when the
browser console shows an error.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

import demo  # noqa: E402  (examples/demo.py: the sidecar helpers and the watched run)

from tests.status_page.browser import chromium, console_errors  # noqa: E402

WIDTH = 1440


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "sidecar" / "status-page.png"))
    parser.add_argument("--steps", type=int, default=700, help="optimizer steps of the demo run")
    args = parser.parse_args(argv)

    workdir = tempfile.mkdtemp(prefix="aw-shot-")
    sock = os.path.join(workdir, "adamwatch.sock")
    config = os.path.join(workdir, "sidecar.yaml")
    with open(config, "w") as f:
        json.dump({"remediation": {"audit": {"path": os.path.join(workdir, "audit.jsonl")}}, "log_level": "warning"}, f)
    port = demo.free_port(0)
    sidecar = subprocess.Popen(demo.sidecar_command() + ["serve", "--listen", f"unix://{sock}", "--metrics-address",
                                                         f"127.0.0.1:{port}", "--config", config])
    stop = threading.Event()
    run = argparse.Namespace(steps=args.steps, seconds=300.0, seed=0, job="demo-tinygpt", no_incident=False)
    trainer = threading.Thread(target=demo.watched_run, args=(run, f"unix://{sock}", os.path.join(workdir, "ckpt"), stop),
                               daemon=True)
    try:
        demo.wait_ready(f"http://127.0.0.1:{port}/readyz", sidecar)
        with chromium(WIDTH, 1000) as driver:
            driver.get(f"http://127.0.0.1:{port}/")
            trainer.start()
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and trainer.is_alive():
                shown = driver.execute_script("const S = window.adamwatchStatus;"
                                              "return [S.series.pts.seq.length, S.events.filter((e) => e.kind === 'outcome').length];")
                if shown[0] >= 0.85 * args.steps and shown[1] >= 2:
                    break
                time.sleep(0.5)
            else:
                print("status page screenshot: the run ended before the page showed the repaired incident", file=sys.stderr)
                return 1
            time.sleep(1.2)  # one more poll of every panel
            # The window's size includes what the browser itself draws: grow it until the whole page is in view.
            for _ in range(3):
                inner, page = driver.execute_script("return [window.innerHeight, document.documentElement.scrollHeight]")
                if inner >= page:
                    break
                driver.set_window_size(WIDTH, driver.get_window_size()["height"] + page - inner)
                time.sleep(0.8)  # the charts follow the new size
            height = page
            errors = console_errors(driver)
            if errors:
                print(f"status page screenshot: console errors: {errors}", file=sys.stderr)
                return 1
            driver.save_screenshot(args.out)
        print(f"status page screenshot: wrote {args.out} ({WIDTH}x{height})")
        return 0
    finally:
        stop.set()
        if trainer.is_alive():
            trainer.join(30)
        sidecar.send_signal(signal.SIGTERM)
        try:
            sidecar.wait(10)
        except subprocess.TimeoutExpired:
            sidecar.kill()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
