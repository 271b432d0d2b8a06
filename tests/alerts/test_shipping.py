"""The installed package carries the rules, the Alertmanager example, runbooks and dashboards."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
import zipfile

import pytest

from adamwatch_sidecar import assets
from adamwatch_sidecar.cli import SUBCOMMAND_MODULES, main

from .assets_under_test import ALERTMANAGER_FILE, GENERATED, ROOT, RULES_FILE, RUNBOOKS

EXPECTED = {
    "adamwatch-rules.yaml": RULES_FILE,
    "alertmanager.yaml": ALERTMANAGER_FILE,
    **{f"runbooks/{p.name}": p for p in RUNBOOKS.glob("*.md")},
    **{f"dashboards/{p.name}": p for p in GENERATED.glob("*.json")},
}


def test_assets_subcommand_is_registered():
    assert "adamwatch_sidecar.assets" in SUBCOMMAND_MODULES


def test_export_writes_every_asset_byte_for_byte(tmp_path, capsys):
    assert main(["assets", "export", str(tmp_path / "out")]) == 0
    written = {str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert written == set(EXPECTED)
    for relative, source in EXPECTED.items():
        assert (tmp_path / "out" / relative).read_bytes() == source.read_bytes()
    assert "adamwatch-rules.yaml" in capsys.readouterr().out


def test_export_keeps_a_locally_edited_file_unless_forced(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["assets", "export", str(out)]) == 0
    (out / "alertmanager.yaml").write_text("# my edits\n")
    assert main(["assets", "export", str(out)]) == 1
    assert "alertmanager.yaml" in capsys.readouterr().err
    assert (out / "alertmanager.yaml").read_text() == "# my edits\n"
    assert main(["assets", "export", "--force", str(out)]) == 0
    assert (out / "alertmanager.yaml").read_bytes() == ALERTMANAGER_FILE.read_bytes()


def test_every_package_folder_is_listed_in_pyproject():
    # packages is an explicit list (mapped asset packages cannot be discovered):
    # a new subpackage must be added there or the wheel silently lacks it.
    packages = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    for top, folder in (("adamwatch", ROOT / "instrumentation" / "adamwatch"),
                        ("adamwatch_sidecar", ROOT / "sidecar" / "adamwatch_sidecar")):
        for init in folder.rglob("__init__.py"):
            relative = init.parent.relative_to(folder)
            name = ".".join((top, *relative.parts))
            assert name in packages, f"{name} is missing from [tool.setuptools] packages"


@pytest.mark.slow
def test_wheel_ships_the_assets_and_export_works_from_it(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "whl"), str(ROOT)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "whl").glob("adamwatch-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for relative in EXPECTED:
        folder = "alerts" if not relative.startswith("dashboards/") else "dashboards"
        inner = relative.split("/", 1)[1] if relative.startswith("dashboards/") else relative
        assert f"adamwatch_sidecar/_assets/{folder}/{inner}" in names, relative
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp_path / "site"), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    # Run from the unpacked wheel (sys.path before the editable install), away from the checkout.
    result = subprocess.run(
        [sys.executable, "-c", "import sys, adamwatch_sidecar.cli as c, adamwatch_sidecar.assets as a;"
         "print(a.__file__, file=sys.stderr); sys.exit(c.main(['assets', 'export', sys.argv[1]]))", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path / "site")},
    )
    assert result.returncode == 0, result.stderr
    assert str(tmp_path / "site") in result.stderr  # really the installed copy
    for relative, source in EXPECTED.items():
        assert (tmp_path / "out" / relative).read_bytes() == source.read_bytes(), relative
