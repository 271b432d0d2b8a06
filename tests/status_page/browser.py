"""Headless Chromium for the status page: Debian's chromium driven through Debian's chromedriver.

    with chromium() as driver:
        driver.get(url)
        ...
        assert console_errors(driver) == []

Selenium is told where both binaries are and never asked to find or download
anything; the browser starts with a fresh profile and without any of its
background traffic (updates, sync, safe browsing), so the only requests it makes
are the page's own.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Any, Iterator

__all__ = ["CHROMIUM", "CHROMEDRIVER", "chromium", "console_errors", "missing_browser", "PAGE_STATE"]

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-default-apps",
         "--disable-extensions", "--hide-scrollbars", "--force-device-scale-factor=1")

# What the page holds, read from the page's own state (window.adamwatchStatus).
PAGE_STATE = """
const S = window.adamwatchStatus;
const charts = {};
for (const [name, u] of Object.entries(S.charts)) charts[name] = {points: u.data[0].length,
    series: u.data.slice(1).map((col) => col.filter((v) => v !== null).length), last: u.data.map((c) => c[c.length - 1])};
return {key: S.key, points: S.series.pts.seq.length, lastSeq: S.series.lastSeq, deep: S.series.deep.seq.length,
        downsampled: S.series.ds ? S.series.ds.time.length : 0, events: S.events.length, markers: S.markers,
        charts: charts, trainers: S.trainers.length, errors: S.errors, now: Date.now() / 1000};
"""


def missing_browser() -> str | None:
    """Why the browser test cannot run here (None when it can): what scripts/setup.sh installs."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} is not installed (bash scripts/setup.sh installs Debian's chromium and chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (the test extra; bash scripts/setup.sh)"
    return None


@contextlib.contextmanager
def chromium(width: int = 1440, height: int = 1000) -> Iterator[Any]:
    """A headless Chromium session with a fresh profile, quit and removed on exit.

    Args:
        width, height: the window (the screenshot's size).

    Returns:
        a ``selenium.webdriver.Chrome`` whose browser console is readable with :func:`console_errors`.
    """
    # Selenium Manager must neither look for drivers nor report usage: both binaries are given.
    os.environ.setdefault("SE_OFFLINE", "true")
    os.environ.setdefault("SE_AVOID_STATS", "true")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="aw-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.set_page_load_timeout(30)
        driver.set_script_timeout(10)
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def console_errors(driver: Any) -> list[dict]:
    """Browser console entries that are errors (failed loads, exceptions, CSP violations)."""
    return [e for e in driver.get_log("browser")
            if e.get("level") == "SEVERE" or "Content Security Policy" in e.get("message", "")]
