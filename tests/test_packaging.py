"""The sidecar never imports torch; the trainer never imports prometheus_client."""

from __future__ import annotations

import subprocess
import sys
import tomllib

from .conftest import ROOT

WALK = """
import importlib, pkgutil, sys
package = importlib.import_module({package!r})
for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
    importlib.import_module(info.name)
{extra}
print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "prometheus_client")))
"""


def imported_after(package: str, extra: str = "") -> str:
    result = subprocess.run(
        [sys.executable, "-c", WALK.format(package=package, extra=extra)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_every_sidecar_module_imports_without_torch():
    out = imported_after("adamwatch_sidecar")
    assert "'torch" not in out
    assert "prometheus_client" in out  # the walk really imported the collector


def test_the_wire_contract_imports_without_torch():
    out = subprocess.run(
        [sys.executable, "-c", "import adamwatch.wire, sys; print('torch' in sys.modules)"],
        capture_output=True, text=True, timeout=60,
    ).stdout
    assert out.strip() == "False"


def test_trainer_modules_never_import_prometheus_client():
    out = imported_after("adamwatch", extra="import adamwatch; adamwatch.watch; adamwatch.Checkpointer")
    assert "prometheus_client" not in out
    assert "'torch'" in out


def test_installing_the_sidecar_extra_pulls_no_torch():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(dep.startswith("torch") for dep in project["dependencies"])
    assert not any(dep.startswith("torch") for dep in project["optional-dependencies"]["sidecar"])
    torch_deps = [d for d in project["optional-dependencies"]["trainer"] if d.startswith("torch")]
    assert torch_deps and all(">=" in d and "==" not in d for d in torch_deps)  # a range, never a pin
    assert project["scripts"]["adamwatch-sidecar"] == "adamwatch_sidecar.cli:main"
