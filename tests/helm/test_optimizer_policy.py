"""The chart carries the optimizer policy as a value, into the sidecar's config file, checked by the schema."""

from __future__ import annotations

import pytest
import yaml

import helm_python as helm

from adamwatch_sidecar.config import load_config
from adamwatch_sidecar.optimizer_policy import evaluate, parse_policy

from .chart_render import CHART, render, render_case


def config_yaml(manifests) -> dict:
    maps = [m for m in manifests if m["kind"] == "ConfigMap" and "config.yaml" in (m.get("data") or {})]
    assert len(maps) == 1
    return yaml.safe_load(maps[0]["data"]["config.yaml"])


def test_the_policy_value_should_reach_the_sidecar_config_and_load_there(tmp_path):
    rendered = config_yaml(render_case("optimizer-policy-values.yaml"))
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(rendered))
    config = load_config(str(path))  # the sidecar's own loader: a bad policy would be a ConfigError
    policy = parse_policy(config.optimizer_policy)
    bad = {"optimizer": {"implementation": "for-loop"},
           "param_groups": [{"name": "0", "peak_lr": 1e-3, "betas": [0.9, 0.999]}]}
    assert [v.rule for v in evaluate(policy, "prod-gpt", bad, {"checkpointer": True, "guard": True})] == \
        ["prod-llm.peak_lr", "prod-llm.implementation"]


def test_no_policy_by_default_should_render_no_optimizer_policy_key():
    assert "optimizer_policy" not in config_yaml(render())


@pytest.mark.parametrize(("policy", "named"), [
    ({"enforce": "kill"}, "/sidecar/config/optimizerPolicy/enforce"),
    ({"rules": [{"name": "x", "peak_lr": {"maximum": 1}}]}, "/sidecar/config/optimizerPolicy/rules/0/peak_lr"),
    ({"rules": [{"name": "x", "require": {"gpu": True}}]}, "/sidecar/config/optimizerPolicy/rules/0/require"),
])
def test_the_schema_should_refuse_a_bad_policy_and_name_it(policy, named):
    with pytest.raises(helm.HelmValuesError) as caught:
        render({"sidecar": {"config": {"optimizerPolicy": policy}}})
    assert named in str(caught.value)
