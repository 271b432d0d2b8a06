"""sidecar/Dockerfile: the console script as entrypoint, a non-root user, and no torch."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

from .chart_render import REPO_ROOT

DOCKERFILE = REPO_ROOT / "sidecar" / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (KEYWORD, arguments), continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, arguments = line.partition(" ")
            found.append((keyword.upper(), arguments.strip()))
    return found


def final_stage() -> list[tuple[str, str]]:
    steps = instructions()
    last_from = max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    return steps[last_from:]


def test_image_entrypoint_should_be_the_console_script_of_pyproject():
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    entrypoint = [json.loads(arguments) for keyword, arguments in final_stage() if keyword == "ENTRYPOINT"]

    assert entrypoint == [["adamwatch-sidecar"]]
    assert "adamwatch-sidecar" in scripts


def test_image_should_run_as_the_non_root_uid_the_chart_expects():
    users = [arguments for keyword, arguments in final_stage() if keyword == "USER"]

    assert users == ["65532:65532"]


def test_image_should_install_the_sidecar_extra_only():
    runs = " ".join(arguments for keyword, arguments in instructions() if keyword == "RUN")

    assert 'pip install ".[sidecar]"' in runs
    assert "torch" not in runs.replace('import torch"', "")


def test_image_should_copy_every_folder_pyproject_builds_from():
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    copied = " ".join(arguments for keyword, arguments in instructions() if keyword == "COPY")

    for folder in {path.split("/")[0] for path in pyproject["tool"]["setuptools"]["package-dir"].values()}:
        assert f"{folder}/" in copied, folder
    assert "pyproject.toml" in copied and pyproject["project"]["readme"] in copied


def test_default_command_should_serve_on_the_chart_socket_and_metrics_port():
    command = [json.loads(arguments) for keyword, arguments in final_stage() if keyword == "CMD"][0]

    assert command[0] == "serve"
    assert command[command.index("--listen") + 1] == "unix:///var/run/adamwatch/adamwatch.sock"
    assert command[command.index("--metrics-address") + 1] == "0.0.0.0:9400"


@pytest.mark.slow
def test_installing_the_sidecar_extra_should_not_pull_torch(tmp_path):
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
         "--report", str(report), f"{REPO_ROOT}[sidecar]"],
        capture_output=True, text=True, timeout=240, check=False,
    )
    if result.returncode != 0 and not report.exists():
        pytest.skip(f"pip could not resolve offline: {result.stderr[-500:]}")

    installed = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
    assert "adamwatch" in installed and "prometheus-client" in {n.replace("_", "-") for n in installed}
    assert not {name for name in installed if name.startswith(("torch", "nvidia-", "triton"))}
