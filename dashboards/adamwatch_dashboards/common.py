"""Defaults shared by every adamwatch dashboard: datasource, variables, panel kinds.

Panel helpers are named ``<panel kind>`` and take the PromQL as plain strings,
so the consistency tests can read every query back from the generated JSON.
"""

from __future__ import annotations

import itertools
import pathlib
from typing import Iterable

import yaml

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as dashboard_builders
from grafana_foundation_sdk.builders import prometheus, stat, table, text, timeseries
from grafana_foundation_sdk.models import common as common_models
from grafana_foundation_sdk.models import dashboard as dashboard_models
from grafana_foundation_sdk.models import prometheus as prometheus_models
from grafana_foundation_sdk.models import text as text_models

__all__ = [
    "base_dashboard",
    "DATASOURCE",
    "EVENT_ONLY",
    "NEEDS_HISTORY",
    "RUNBOOK_BASE_URL",
    "RULES_FILE",
    "PanelIds",
    "datasource_variable",
    "label_variable",
    "query",
    "timeseries_panel",
    "stat_panel",
    "table_panel",
    "text_panel",
]

# Every panel queries the Prometheus chosen in the dashboard's datasource variable.
DATASOURCE = dashboard_models.DataSourceRef(type_val="prometheus", uid="${datasource}")

# Description prefixes the end-to-end test reads: such panels may be empty
# during a short healthy run, and say so to the user too.
EVENT_ONLY = "Event-only: empty while nothing has happened. "
NEEDS_HISTORY = "Needs history: fills once the baseline window (35 minutes) has data. "

RULES_FILE = pathlib.Path(__file__).resolve().parents[2] / "alerts" / "adamwatch-rules.yaml"


def _runbook_base_url(rules_file: pathlib.Path = RULES_FILE) -> str:
    """The folder of the rules' runbook_url annotations: one source for the base URL."""
    for group in yaml.safe_load(rules_file.read_text())["groups"]:
        for rule in group["rules"]:
            url = rule.get("annotations", {}).get("runbook_url")
            if url:
                return url.rsplit("/", 1)[0] + "/"
    raise ValueError(f"{rules_file}: no alert carries a runbook_url")


RUNBOOK_BASE_URL = _runbook_base_url()


class PanelIds:
    """Hands out panel ids 1, 2, 3, ... so every panel in a dashboard is unique."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)

    def next(self) -> int:
        """Returns: the next unused panel id."""
        return next(self._ids)


def datasource_variable() -> dashboard_builders.DatasourceVariable:
    """Returns: the ``datasource`` variable every panel queries through."""
    return (
        dashboard_builders.DatasourceVariable("datasource")
        .label("Data source")
        .type("prometheus")
    )


def label_variable(name: str, label: str, query_expr: str, *, multi: bool) -> dashboard_builders.QueryVariable:
    """A variable listing the values of one label.

    Args:
        name: variable and label name (``job``, ``rank``, ``param_group``).
        label: what the dashboard shows next to it.
        query_expr: the series to take the values from.
        multi: allow several values and "All" (fleet views) or exactly one (debug views).

    Returns:
        the variable builder.
    """
    variable = (
        dashboard_builders.QueryVariable(name)
        .label(label)
        .datasource(DATASOURCE)
        .query({"query": f"label_values({query_expr}, {name})", "refId": f"{name}-values"})
        .refresh(dashboard_models.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dashboard_models.VariableSort.NATURAL_ASC)
    )
    if multi:
        variable = variable.multi(True).include_all(True).all_value(".*")
    return variable


def base_dashboard(title: str, uid: str, description: str, *, since: str, multi: bool) -> dashboard_builders.Dashboard:
    """The part every adamwatch dashboard shares: fixed uid, tag, refresh, UTC, and the
    datasource, job and rank variables (several at once, or one job and rank).

    Args:
        title: the dashboard title.
        uid: its fixed uid.
        description: one sentence.
        since: start of the default time range, e.g. "now-3h".
        multi: whether several jobs and ranks can be selected.

    Returns:
        The builder, ready for more variables, rows and panels.
    """
    job_match = 'job=~"$job"' if multi else 'job="$job"'
    return (
        dashboard_builders.Dashboard(title)
        .uid(uid)
        .tags(["adamwatch"])
        .description(description)
        .refresh("30s")
        .time(since, "now")
        .timezone("utc")
        .with_variable(datasource_variable())
        .with_variable(label_variable("job", "Job", "adamwatch_trainer_connected", multi=multi))
        .with_variable(label_variable("rank", "Rank", f"adamwatch_trainer_connected{{{job_match}}}", multi=multi))
    )


def query(expr: str, legend: str = "", *, instant: bool = False) -> prometheus.Dataquery:
    """A Prometheus query; ``instant`` for tables and stats that show the latest value."""
    q = prometheus.Dataquery().expr(expr).datasource(DATASOURCE)
    if legend:
        q = q.legend_format(legend)
    if instant:
        q = q.instant().format(prometheus_models.PromQueryFormat.TABLE)
    return q


def _describe(description: str, event_only: bool, needs_history: bool) -> str:
    prefix = (EVENT_ONLY if event_only else "") + (NEEDS_HISTORY if needs_history else "")
    return prefix + description


def _with_targets(panel, panel_id: int, title: str, description: str, targets: Iterable[prometheus.Dataquery], width: int, height: int):
    panel = panel.id(panel_id).title(title).description(description).datasource(DATASOURCE).span(width).height(height)
    for ref_id, target in zip("ABCDEFGHIJ", targets):
        panel = panel.with_target(target.ref_id(ref_id))
    return panel


def timeseries_panel(
    ids: PanelIds,
    title: str,
    description: str,
    targets: Iterable[prometheus.Dataquery],
    *,
    unit: str = "short",
    log_scale: bool = False,
    width: int = 12,
    height: int = 8,
    event_only: bool = False,
    needs_history: bool = False,
) -> timeseries.Panel:
    """A time series panel.

    Args:
        ids: the dashboard's panel id source.
        title, description: what the panel shows and how to read it.
        targets: its queries.
        unit: Grafana unit id.
        log_scale: log10 y axis (learning rates, update sizes, norms).
        width, height: grid size (24 columns wide).
        event_only, needs_history: may be empty in a healthy or young run (see module docs).

    Returns:
        the panel builder.
    """
    panel = timeseries.Panel().unit(unit).legend(
        common_builders.VizLegendOptions()
        .show_legend(True)
        .display_mode(common_models.LegendDisplayMode.TABLE)
        .placement(common_models.LegendPlacement.BOTTOM)
        .calcs(["lastNotNull", "max"])
    )
    if log_scale:
        panel = panel.scale_distribution(
            common_builders.ScaleDistributionConfig().type(common_models.ScaleDistribution.LOG).log(10)
        )
    return _with_targets(panel, ids.next(), title, _describe(description, event_only, needs_history), targets, width, height)


def stat_panel(
    ids: PanelIds,
    title: str,
    description: str,
    targets: Iterable[prometheus.Dataquery],
    *,
    unit: str = "short",
    width: int = 6,
    height: int = 4,
    red_from: float | None = None,
    event_only: bool = False,
) -> stat.Panel:
    """A single big number; turns red at ``red_from`` when given.

    Returns:
        the panel builder.
    """
    panel = (
        stat.Panel()
        .unit(unit)
        .graph_mode(common_models.BigValueGraphMode.AREA)
        .color_mode(common_models.BigValueColorMode.BACKGROUND)
        .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]))
    )
    steps = [dashboard_models.Threshold(value=None, color="green")]
    if red_from is not None:
        steps.append(dashboard_models.Threshold(value=red_from, color="red"))
    panel = panel.thresholds(
        dashboard_builders.ThresholdsConfig().mode(dashboard_models.ThresholdsMode.ABSOLUTE).steps(steps)
    )
    return _with_targets(panel, ids.next(), title, _describe(description, event_only, False), targets, width, height)


def table_panel(
    ids: PanelIds,
    title: str,
    description: str,
    targets: Iterable[prometheus.Dataquery],
    *,
    width: int = 24,
    height: int = 8,
    event_only: bool = False,
    runbook_links: bool = False,
) -> table.Panel:
    """A table of the latest values (instant queries), one row per series.

    Args:
        runbook_links: link each row's ``alertname`` cell to its runbook.

    Returns:
        the panel builder.
    """
    panel = table.Panel().with_transformation(
        dashboard_models.DataTransformerConfig(id_val="organize", options={"excludeByName": {"Time": True, "__name__": True}})
    )
    if runbook_links:
        panel = panel.override_by_name(
            "alertname",
            [
                dashboard_models.DynamicConfigValue(
                    id_val="links",
                    value=[{"title": "Runbook", "url": RUNBOOK_BASE_URL + "${__value.text}.md", "targetBlank": True}],
                )
            ],
        )
    return _with_targets(panel, ids.next(), title, _describe(description, event_only, False), targets, width, height)


def text_panel(ids: PanelIds, title: str, markdown: str, *, width: int = 24, height: int = 8) -> text.Panel:
    """A markdown panel (no queries).

    Returns:
        the panel builder.
    """
    return (
        text.Panel()
        .id(ids.next())
        .title(title)
        .mode(text_models.TextMode.MARKDOWN)
        .content(markdown)
        .span(width)
        .height(height)
    )
