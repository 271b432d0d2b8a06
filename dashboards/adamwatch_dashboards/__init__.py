"""adamwatch's Grafana dashboards as code (grafana-foundation-sdk, pinned exactly).

Regenerate the committed JSON from the repository root with::

    PYTHONPATH=dashboards .venv/bin/python -m adamwatch_dashboards

Four dashboards: Overview (fleet), On-call (what is wrong now), Optimizer
debug (one job and rank) and Executive (SLOs, time to converge, cost). Panels whose description starts with ``Event-only:``
stay empty while nothing happens; ``Needs history:`` panels fill once their
recording rules have the minutes of data they compare against.
"""

from __future__ import annotations

from adamwatch_dashboards.build import DASHBOARDS, build_all, render

__all__ = ["DASHBOARDS", "build_all", "render"]
