"""Fixtures for the status page tests: the sidecar tests' short socket folder."""

from __future__ import annotations

from tests.sidecar.conftest import socket_dir  # noqa: F401  (a fixture, used by name)
