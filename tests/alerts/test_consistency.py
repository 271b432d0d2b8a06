"""Every metric a rule or a dashboard queries exists: in the sidecar's metric table, or as our recording rule."""

from __future__ import annotations

import pytest

from adamwatch_sidecar.metric_table import METRICS

from .assets_under_test import dashboard_queries, metric_names, recording_names, rules, substitute

# Prometheus's own series: the scrape health and the alert state.
PROMETHEUS_SERIES = {"up", "ALERTS"}
KNOWN = {name for m in METRICS for name in m.series_names} | PROMETHEUS_SERIES


def test_the_walker_sees_nested_and_renamed_selectors():
    # Guards the check below: a walker that found nothing would pass everything.
    expr = 'sum(rate(a_total[5m])) / on (job) group_left b offset 5m or histogram_quantile(0.5, c_bucket) and {__name__="d"}'
    assert metric_names(expr) == {"a_total", "b", "c_bucket", "d"}


def test_unknown_metric_is_reported():
    assert metric_names('adamwatch_loss_typo{job="x"}') - KNOWN == {"adamwatch_loss_typo"}


@pytest.mark.parametrize("rule", rules(), ids=lambda r: r.get("alert") or r.get("record"))
def test_rule_uses_only_known_metrics(rule):
    # Recording rules may use those defined before them in the file.
    unknown = metric_names(rule["expr"]) - KNOWN - recording_names()
    assert not unknown, f"{rule.get('alert') or rule.get('record')} uses {sorted(unknown)}"


def test_recording_rules_follow_the_naming_scheme():
    for name in recording_names():
        level, metric, operation = name.split(":")
        assert level.startswith("adamwatch_") and metric and operation, name


def test_every_recording_rule_is_used():
    used = set()
    for rule in rules():
        used |= metric_names(rule["expr"])
    for _, _, expr in dashboard_queries():
        used |= metric_names(substitute(expr))
    assert recording_names() <= used, sorted(recording_names() - used)


QUERIES = list(dashboard_queries())


def test_dashboards_have_queries():
    assert len(QUERIES) > 30


@pytest.mark.parametrize("uid,panel,expr", QUERIES, ids=[f"{u}:{p['title']}:{i}" for i, (u, p, _) in enumerate(QUERIES)])
def test_dashboard_query_parses_and_uses_only_known_metrics(uid, panel, expr):
    unknown = metric_names(substitute(expr, job="j", rank="0")) - KNOWN - recording_names()
    assert not unknown, f"{uid} / {panel['title']} uses {sorted(unknown)}"
