"""values.yaml is documented key by key, and values.schema.json rejects bad values by name."""

from __future__ import annotations

import re

import pytest
import yaml

import helm_python as helm

from .chart_render import CHART, render

BAD_VALUES = [
    ({"sidecar": {"ports": {"metrics": "ninety-four-hundred"}}}, "/sidecar/ports/metrics"),
    ({"workload": {"kind": "Deployment"}}, "/workload/kind"),
    ({"rules": {"disabled": "AdamwatchLossSpike"}}, "/rules/disabled"),
    ({"rules": {"runbookBaseURL": "wiki/runbooks"}}, "/rules/runbookBaseURL"),
    ({"podMonitor": {"interval": "fifteen seconds"}}, "/podMonitor/interval"),
    ({"networkPolicy": {"enabled": "yes"}}, "/networkPolicy/enabled"),
    ({"sidecar": {"imagee": {}}}, "imagee"),
    ({"sidecar": {"config": {"maxFrameBytes": 100}}}, "/sidecar/config/maxFrameBytes"),
]


@pytest.mark.parametrize(("values", "named"), BAD_VALUES, ids=[named for _, named in BAD_VALUES])
def test_lint_should_fail_on_a_bad_value_and_name_it(values, named):
    report = helm.lint(CHART, values, strict=True)

    errors = [m["error"] for m in report["messages"] if m["severity"] == 3]
    assert errors and any(named in error for error in errors), report


@pytest.mark.parametrize(("values", "named"), BAD_VALUES, ids=[named for _, named in BAD_VALUES])
def test_template_should_refuse_a_bad_value_and_name_it(values, named):
    with pytest.raises(helm.HelmValuesError) as caught:
        render(values)

    assert named in str(caught.value)


def test_schema_should_accept_every_ci_values_file_and_the_defaults():
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(chart.values)
        for path in sorted((CHART / "ci").glob("*-values.yaml")):
            chart.validate_schema(chart.merge_values(yaml.safe_load(path.read_text())))


def test_every_values_key_should_be_documented_by_a_comment():
    """A key is documented by a comment right above it, by a documented ancestor
    (its value is one documented block, e.g. resources), or, for a mapping, by
    documented children (as helm-docs reads kube-prometheus-stack)."""
    undocumented = _undocumented(_key_tree((CHART / "values.yaml").read_text()))

    assert undocumented == []


def _key_tree(text: str) -> list[dict]:
    roots: list[dict] = []
    stack: list[tuple[int, list[dict]]] = [(-1, roots)]
    previous = ""
    for line in text.splitlines():
        key = re.match(r"^(\s*)([A-Za-z][\w.-]*):", line)
        if key:
            indent = len(key.group(1))
            while stack[-1][0] >= indent:
                stack.pop()
            node = {"key": key.group(2), "commented": previous.startswith("#"), "children": []}
            stack[-1][1].append(node)
            stack.append((indent, node["children"]))
        if line.strip():
            previous = line.strip()
    return roots


def _undocumented(nodes: list[dict], prefix: str = "") -> list[str]:
    missing = []
    for node in nodes:
        path = f"{prefix}{node['key']}"
        if node["commented"]:
            continue
        if not node["children"]:
            missing.append(path)
        else:
            missing += _undocumented(node["children"], path + ".")
    return missing
