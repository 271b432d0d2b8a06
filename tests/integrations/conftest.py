"""A real sidecar process for the framework adapters' tests (the one tests/integration uses)."""

from __future__ import annotations

from ..integration.conftest import SidecarProcess, sidecar, workdir  # noqa: F401  (fixtures)

__all__ = ["SidecarProcess"]
