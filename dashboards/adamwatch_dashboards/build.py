"""Builds every adamwatch dashboard and renders it as JSON with sorted keys (diffs well)."""

from __future__ import annotations

import json
from typing import Callable

from grafana_foundation_sdk.builders import dashboard as dashboard_builders
from grafana_foundation_sdk.cog.encoder import JSONEncoder

from adamwatch_dashboards.executive import UID as EXECUTIVE_UID
from adamwatch_dashboards.executive import executive_dashboard
from adamwatch_dashboards.oncall import UID as ONCALL_UID
from adamwatch_dashboards.oncall import oncall_dashboard
from adamwatch_dashboards.optimizer_debug import UID as DEBUG_UID
from adamwatch_dashboards.optimizer_debug import optimizer_debug_dashboard
from adamwatch_dashboards.overview import UID as OVERVIEW_UID
from adamwatch_dashboards.overview import overview_dashboard

__all__ = ["DASHBOARDS", "build_all", "render"]

# uid -> builder function; the generated file is dashboards/generated/<uid>.json.
DASHBOARDS: dict[str, Callable[[], dashboard_builders.Dashboard]] = {
    OVERVIEW_UID: overview_dashboard,
    ONCALL_UID: oncall_dashboard,
    DEBUG_UID: optimizer_debug_dashboard,
    EXECUTIVE_UID: executive_dashboard,
}


def render(builder: dashboard_builders.Dashboard) -> str:
    """Args: builder: a dashboard builder. Returns: its JSON, sorted keys, 2-space indent, final newline."""
    return json.dumps(builder.build(), cls=JSONEncoder, sort_keys=True, indent=2) + "\n"


def build_all() -> dict[str, str]:
    """Returns: file name (``<uid>.json``) -> rendered JSON, for every dashboard."""
    return {f"{uid}.json": render(make()) for uid, make in DASHBOARDS.items()}
