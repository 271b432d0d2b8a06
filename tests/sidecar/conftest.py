"""Fixtures for the sidecar tests (helpers live in sidecar_testlib.py)."""

from __future__ import annotations

import pathlib
import shutil
import tempfile
from typing import Callable, Iterator

import pytest

from .sidecar_testlib import SidecarProcess


@pytest.fixture
def socket_dir(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    """A folder for Unix sockets; tmp_path unless its path is too long for AF_UNIX (108 bytes)."""
    if len(str(tmp_path / "s" / "adamwatch.sock")) < 100:
        yield tmp_path
        return
    short = pathlib.Path(tempfile.mkdtemp(prefix="aw-", dir="/tmp"))
    try:
        yield short
    finally:
        shutil.rmtree(short, ignore_errors=True)


@pytest.fixture
def start_sidecar(socket_dir: pathlib.Path) -> Iterator[Callable[..., SidecarProcess]]:
    """Start real sidecar processes on a Unix socket and a free metrics port; all killed at the end."""
    started: list[SidecarProcess] = []

    def start(*extra: str, retention: float = 300.0, wait: bool = True) -> SidecarProcess:
        path = socket_dir / f"s{len(started)}" / "adamwatch.sock"
        args = ["serve", "--listen", f"unix://{path}", "--metrics-address", "127.0.0.1:0",
                "--retention-seconds", str(retention), *extra]
        proc = SidecarProcess(args, path)
        started.append(proc)
        return proc.wait_ready() if wait else proc

    yield start
    for proc in started:
        proc.kill()
