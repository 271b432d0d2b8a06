"""Paths of the shipped alerting assets, and readers the alert, dashboard and e2e tests share."""

from __future__ import annotations

import json
import pathlib
import re
from typing import Iterator

import promql_parser
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
RULES_FILE = ROOT / "alerts" / "adamwatch-rules.yaml"
ALERTMANAGER_FILE = ROOT / "alerts" / "alertmanager.yaml"
PROMTOOL_TESTS = sorted((ROOT / "alerts" / "tests").glob("*-test.yaml"))
RUNBOOKS = ROOT / "alerts" / "runbooks"
ALERTS_README = ROOT / "alerts" / "README.md"
DASHBOARDS_SRC = ROOT / "dashboards"
GENERATED = ROOT / "dashboards" / "generated"

EVENT_ONLY = "Event-only:"
NEEDS_HISTORY = "Needs history:"


def rules() -> list[dict]:
    """Every rule (recording and alerting) of every group, in file order."""
    return [rule for group in yaml.safe_load(RULES_FILE.read_text())["groups"] for rule in group["rules"]]


def alert_rules() -> list[dict]:
    return [r for r in rules() if "alert" in r]


def recording_names() -> set[str]:
    return {r["record"] for r in rules() if "record" in r}


def dashboards() -> dict[str, dict]:
    """uid -> dashboard JSON, from the committed files."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(GENERATED.glob("*.json"))}


def panels(dashboard: dict) -> Iterator[dict]:
    """Every panel with a type other than row (rows nest panels only when collapsed)."""
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def dashboard_queries() -> Iterator[tuple[str, dict, str]]:
    """(dashboard uid, panel, expr) for every Prometheus target of every panel."""
    for uid, dashboard in dashboards().items():
        for panel in panels(dashboard):
            for target in panel.get("targets") or []:
                if target.get("expr"):
                    yield uid, panel, target["expr"]


def substitute(expr: str, *, job: str = ".*", rank: str = ".*", param_group: str = ".*",
               rate_interval: str = "1m") -> str:
    """A dashboard query with Grafana's variables replaced, as Grafana would send it.

    Single-value selectors (``job="$job"``) get the literal value, so pass a
    real job and rank for the Optimizer debug dashboard.
    """
    values = {"__rate_interval": rate_interval, "job": job, "rank": rank, "param_group": param_group,
              # Executive dashboard (issue 11): the time range and the price textbox
              "__range": "1h", "price_per_device_hour": "2.5"}
    return re.sub(r"\$\{?(__rate_interval|__range|price_per_device_hour|param_group|job|rank)\}?",
                  lambda m: values[m.group(1)], expr)


def metric_names(expr: str) -> set[str]:
    """Every metric name a PromQL expression selects (parsed, AST walked)."""
    names: set[str] = set()

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector):
            name = node.name
            if name is None:
                for matcher in node.matchers.matchers:
                    if matcher.name == "__name__":
                        name = matcher.value
            names.add(name or "<no name>")

    promql_parser.walk(promql_parser.parse(expr), pre_visit=visit)
    return names
