"""What the page loads ships in the wheel, is exactly the vendored uPlot, and reaches nothing outside the pod."""

from __future__ import annotations

import fnmatch
import hashlib
import pathlib
import re
import tomllib
from importlib import resources

from adamwatch_sidecar.status_page.page import STATIC_PACKAGE, iter_static_files

from tests.conftest import ROOT

STATIC = ROOT / "sidecar" / "adamwatch_sidecar" / "status_page" / "static"
UPLOT_VERSION = "1.6.32"


def test_every_static_file_is_package_data_and_importlib_finds_it():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = sorted(str(p.relative_to(STATIC.parent)) for p in STATIC.rglob("*") if p.is_file())
    assert "static/index.html" in on_disk and "static/vendor/uplot/LICENSE" in on_disk
    unshipped = []
    for relative in on_disk:
        folder, _, name = relative.rpartition("/")
        package = STATIC_PACKAGE + "." + folder.replace("/", ".")
        patterns = setuptools["package-data"].get(package, [])
        if package not in setuptools["packages"] or not any(fnmatch.fnmatch(name, p) for p in patterns):
            unshipped.append(relative)
    assert unshipped == [], "add these to [tool.setuptools] packages and package-data, or the wheel lacks them"
    served = dict(iter_static_files())
    assert sorted("static/" + p for p in served) == on_disk
    assert resources.files(STATIC_PACKAGE).joinpath("static/app.js").read_bytes() == served["app.js"]


def test_the_vendored_uplot_is_the_npm_release_named_in_vendor_md():
    folder = STATIC / "vendor" / "uplot"
    notes = (folder / "VENDOR.md").read_text()
    assert f"npm pack uplot@{UPLOT_VERSION}" in notes
    assert (folder / "uPlot.iife.min.js").read_text().startswith(f"/*! https://github.com/leeoniya/uPlot (v{UPLOT_VERSION}) */")
    for name in ("uPlot.iife.min.js", "uPlot.min.css", "LICENSE"):
        digest = hashlib.sha256((folder / name).read_bytes()).hexdigest()
        assert f"| `{name}` | `{digest}` |" in notes, name
    assert "MIT License" in (folder / "LICENSE").read_text()


def test_nothing_the_page_loads_points_outside_this_sidecar():
    for path in STATIC.rglob("*"):
        if path.suffix not in (".html", ".js", ".css", ".svg"):
            continue
        text = path.read_text()
        if path.suffix == ".svg":
            text = text.replace('xmlns="http://www.w3.org/2000/svg"', "")
        urls = re.findall(r"(?:https?:)?//[A-Za-z0-9.-]+\.[A-Za-z]{2,}", text)
        # uPlot names its home page in its licence comment; nothing else may name a host.
        allowed = ["//github.com"] if path.name == "uPlot.iife.min.js" else []
        assert [u for u in urls if not any(u.endswith(a) for a in allowed)] == [], path
    page = (STATIC / "index.html").read_text()
    assert re.findall(r'(?:src|href)="([^"]+)"', page) and all(
        ref.startswith("/static/") for ref in re.findall(r'(?:src|href)="([^"]+)"', page))


def test_the_script_writes_text_never_markup():
    # Job names, details and evidence come from trainers and alerts: they must never become HTML.
    script = (STATIC / "app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in script, sink
    assert "fetch(path" in script and "http" not in script.replace("HTTP ", "")


def test_the_page_is_read_only():
    script = (STATIC / "app.js").read_text()
    assert "method:" not in script and "POST" not in script  # every request is a plain GET
    assert "<form" not in (STATIC / "index.html").read_text()


def test_static_files_are_small():
    total = sum(p.stat().st_size for p in STATIC.rglob("*") if p.is_file())
    assert total < 200_000, total  # the page stays cheap to serve over a port-forward
    assert pathlib.Path(STATIC / "vendor" / "uplot" / "uPlot.iife.min.js").stat().st_size < 60_000
