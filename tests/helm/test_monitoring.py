"""What watches the pods: PrometheusRule, dashboards, PodMonitor/ServiceMonitor, AlertmanagerConfig.

alerts/ and dashboards/ are the source of truth; the chart's rendered copies
must equal them (with the values' changes applied). Prometheus Operator kinds
are unknown to kubernetes-validate, so their key fields are checked here, and
their contents by the real promtool and amtool.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from .chart_render import CHART, NAMESPACE, REPO_ROOT, matches, notes_of, of_kind, one, render, render_case

RULES_SOURCE = REPO_ROOT / "alerts" / "adamwatch-rules.yaml"
DASHBOARDS_SOURCE = REPO_ROOT / "dashboards" / "generated"
ALERTMANAGER_EXAMPLE = REPO_ROOT / "alerts" / "alertmanager.yaml"
SYNC = REPO_ROOT / "helm" / "sync_assets.py"
DEFAULT_RUNBOOKS = "https://github.com/adamwatch/adamwatch/blob/main/alerts/runbooks"


def expected_groups(disabled=(), runbook_base=DEFAULT_RUNBOOKS, extra_labels=None, objectives=None) -> list[dict]:
    """alerts/adamwatch-rules.yaml with the chart's documented changes applied, in Python."""
    groups = []
    for group in yaml.safe_load(RULES_SOURCE.read_text())["groups"]:
        rules = []
        for rule in group["rules"]:
            if rule.get("alert") in disabled:
                continue
            rule = copy.deepcopy(rule)
            if rule.get("record") == "adamwatch_slo:objective:ratio":
                for slo, objective in (objectives or {}).items():
                    default = f'vector(0.95), "slo", "{slo}"'
                    assert default in rule["expr"]
                    rule["expr"] = rule["expr"].replace(default, f'vector({objective}), "slo", "{slo}"')
            if "alert" in rule:
                if extra_labels:
                    rule["labels"] = {**rule.get("labels", {}), **extra_labels}
                url = rule.get("annotations", {}).get("runbook_url")
                if url:
                    rule["annotations"]["runbook_url"] = f"{runbook_base.rstrip('/')}/{url.rsplit('/', 1)[1]}"
            rules.append(rule)
        if rules:
            groups.append({**group, "rules": rules})
    return groups


def alert_names(groups: list[dict]) -> list[str]:
    return [rule["alert"] for group in groups for rule in group["rules"] if "alert" in rule]


def test_chart_copies_of_rules_and_dashboards_should_equal_alerts_and_dashboards():
    result = subprocess.run(
        [sys.executable, str(SYNC), "--check"], capture_output=True, text=True, timeout=60, check=False
    )

    assert result.returncode == 0, result.stderr


def test_sync_check_should_fail_and_name_a_differing_copy(tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text("groups: []\n")
    alertmanager = tmp_path / "alertmanager.yaml"
    alertmanager.write_text("route: {receiver: x}\n")
    dashboards = tmp_path / "dashboards"
    dashboards.mkdir()
    (dashboards / "a.json").write_text("{}")
    chart_files = tmp_path / "files"
    args = ["--rules", str(rules), "--alertmanager", str(alertmanager), "--dashboards", str(dashboards),
            "--chart-files", str(chart_files)]

    assert subprocess.run([sys.executable, str(SYNC), *args], timeout=60, check=False).returncode == 0
    assert subprocess.run([sys.executable, str(SYNC), "--check", *args], timeout=60, check=False).returncode == 0
    (dashboards / "a.json").write_text('{"changed": true}')
    (dashboards / "b.json").write_text("{}")
    (chart_files / "dashboards" / "gone.json").write_text("{}")
    result = subprocess.run(
        [sys.executable, str(SYNC), "--check", *args], capture_output=True, text=True, timeout=60, check=False
    )

    assert result.returncode == 1
    assert "differs" in result.stderr and "a.json" in result.stderr
    assert "missing" in result.stderr and "b.json" in result.stderr
    assert "left over" in result.stderr and "gone.json" in result.stderr


def test_prometheus_rule_should_equal_the_rules_of_alerts_folder_by_default():
    rule = one(render_case("default"), "PrometheusRule")

    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"]["groups"] == expected_groups()


def test_prometheus_rule_should_apply_disabled_alerts_runbook_base_and_extra_labels():
    rule = one(render_case("rules-tuned-values.yaml"), "PrometheusRule")

    assert rule["spec"]["groups"] == expected_groups(
        disabled=["AdamwatchLossSpike"],
        runbook_base="https://wiki.example.com/runbooks/adamwatch/",
        extra_labels={"team": "ml-platform"},
        objectives={"run_success": 0.99},
    )
    assert rule["metadata"]["labels"]["release"] == "kps"


def test_slo_objectives_should_set_the_objective_record_and_refuse_values_outside_0_1():
    groups = one(render({"rules": {"sloObjectives": {"run_success": 0.99, "target_within_budget": 0.9}}}),
                 "PrometheusRule")["spec"]["groups"]
    record = next(r for g in groups for r in g["rules"] if r.get("record") == "adamwatch_slo:objective:ratio")
    assert 'vector(0.99), "slo", "run_success"' in record["expr"]
    assert 'vector(0.9), "slo", "target_within_budget"' in record["expr"]
    for bad in (1, 0, 1.5, "high"):
        with pytest.raises(Exception, match="sloObjectives"):
            render({"rules": {"sloObjectives": {"run_success": bad}}})


def test_disabled_alert_should_be_removed_and_every_other_rule_kept():
    default = one(render_case("default"), "PrometheusRule")["spec"]["groups"]
    tuned = one(render_case("rules-tuned-values.yaml"), "PrometheusRule")["spec"]["groups"]

    assert "AdamwatchLossSpike" in alert_names(default)
    assert "AdamwatchLossSpike" not in alert_names(tuned)
    assert set(alert_names(default)) - set(alert_names(tuned)) == {"AdamwatchLossSpike"}
    records = [[r["record"] for r in g["rules"] if "record" in r] for g in default]
    assert records == [[r["record"] for r in g["rules"] if "record" in r] for g in tuned]


def test_extra_labels_should_go_on_alerts_only():
    groups = one(render_case("rules-tuned-values.yaml"), "PrometheusRule")["spec"]["groups"]
    rules = [rule for group in groups for rule in group["rules"]]

    assert all(rule["labels"]["team"] == "ml-platform" for rule in rules if "alert" in rule)
    assert all("team" not in rule.get("labels", {}) for rule in rules if "record" in rule)


def test_prometheus_rule_groups_should_be_well_formed_for_the_operator():
    for case in ["default", "rules-tuned-values.yaml"]:
        groups = one(render_case(case), "PrometheusRule")["spec"]["groups"]
        assert len({g["name"] for g in groups}) == len(groups)
        for group in groups:
            assert group["rules"], group["name"]
            for rule in group["rules"]:
                assert ("alert" in rule) != ("record" in rule), rule
                assert isinstance(rule["expr"], str) and rule["expr"].strip()
                if "alert" in rule:
                    assert rule["labels"]["severity"] in {"critical", "warning", "info"}
                    assert rule["annotations"]["runbook_url"].endswith(f"/{rule['alert']}.md")


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
@pytest.mark.parametrize("case", ["default", "rules-tuned-values.yaml"])
def test_rendered_rules_should_pass_promtool_check_rules(case, tmp_path):
    rule_file = tmp_path / "rendered-rules.yaml"
    rule_file.write_text(yaml.safe_dump(one(render_case(case), "PrometheusRule")["spec"]))

    result = subprocess.run(
        ["promtool", "check", "rules", str(rule_file)], capture_output=True, text=True, timeout=60, check=False
    )

    assert result.returncode == 0, result.stdout + result.stderr


def test_should_render_one_dashboard_config_map_per_dashboard_with_the_grafana_label():
    sources = sorted(DASHBOARDS_SOURCE.glob("*.json"))
    config_maps = [m for m in of_kind(render_case("default"), "ConfigMap") if "-dashboard-" in m["metadata"]["name"]]

    assert sources, f"no dashboards in {DASHBOARDS_SOURCE}"
    assert len(config_maps) == len(sources)
    rendered = {}
    for config_map in config_maps:
        assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
        (file_name, text), *others = config_map["data"].items()
        assert others == []
        rendered[file_name] = json.loads(text)
    assert rendered == {path.name: json.loads(path.read_text()) for path in sources}


def test_dashboards_should_follow_the_label_namespace_and_annotation_values():
    config_maps = [
        m for m in of_kind(render_case("rules-tuned-values.yaml"), "ConfigMap") if "-dashboard-" in m["metadata"]["name"]
    ]

    assert config_maps
    for config_map in config_maps:
        assert config_map["metadata"]["namespace"] == "grafana"
        assert config_map["metadata"]["annotations"] == {"grafana_folder": "Training"}


def test_pod_monitor_should_keep_the_trainer_job_label_and_name_the_scrape_job_as_the_rules_expect():
    endpoint = one(render_case("default"), "PodMonitor")["spec"]["podMetricsEndpoints"][0]
    scrape_jobs = set(re.findall(r'up\{[^}]*job="([^"]+)"', RULES_SOURCE.read_text()))

    assert endpoint["honorLabels"] is True
    relabel = [r for r in endpoint["relabelings"] if r.get("targetLabel") == "job"]
    assert len(relabel) == 1 and relabel[0]["action"] == "replace"
    assert scrape_jobs == {relabel[0]["replacement"]}, "the rules' up{job=...} must name the PodMonitor's job"


def test_pod_monitor_should_carry_the_selector_labels_of_prometheus():
    monitor = one(render_case("rules-tuned-values.yaml"), "PodMonitor")

    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kps"


def test_should_not_render_a_service_monitor_by_default():
    assert of_kind(render_case("default"), "ServiceMonitor") == []


def test_service_monitor_should_select_the_metrics_service_which_selects_the_trainer_pods():
    manifests = render_case("servicemonitor-values.yaml")
    monitor = one(manifests, "ServiceMonitor")
    service = next(s for s in of_kind(manifests, "Service") if s["metadata"]["name"].endswith("-metrics"))
    pod_labels = one(manifests, "Job")["spec"]["template"]["metadata"]["labels"]

    assert of_kind(manifests, "PodMonitor") == []
    assert matches(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert matches(service["spec"]["selector"], pod_labels)
    assert service["spec"]["clusterIP"] == "None"
    endpoint = monitor["spec"]["endpoints"][0]
    assert endpoint["port"] in [p["name"] for p in service["spec"]["ports"]]
    assert endpoint["honorLabels"] is True and endpoint["interval"] == "30s"
    assert service["spec"]["ports"][0]["targetPort"] == 9400


def test_alertmanager_config_should_route_only_adamwatch_alerts_and_leave_out_disabled_ones():
    default = one(render_case("default"), "AlertmanagerConfig")["spec"]["route"]
    tuned = one(render_case("rules-tuned-values.yaml"), "AlertmanagerConfig")["spec"]["route"]

    assert default["matchers"][0]["name"] == "alertname" and default["matchers"][0]["matchType"] == "=~"
    assert sorted(default["matchers"][0]["value"].split("|")) == sorted(alert_names(expected_groups()))
    assert "AdamwatchLossSpike" not in tuned["matchers"][0]["value"].split("|")


def test_alertmanager_config_should_send_remediable_alerts_to_the_rank0_control_service_with_the_token():
    manifests = render_case("example-job-values.yaml")
    config = one(manifests, "AlertmanagerConfig")["spec"]
    receivers = {r["name"]: r for r in config["receivers"]}
    control = next(s for s in of_kind(manifests, "Service") if s["metadata"]["name"].endswith("-control"))
    token = next(s for s in of_kind(manifests, "Secret") if s["metadata"]["name"].endswith("-control-token"))

    webhook = receivers["adamwatch-remediation"]["webhookConfigs"][0]
    port = control["spec"]["ports"][0]["port"]
    assert webhook["url"] == f"http://{control['metadata']['name']}.{NAMESPACE}.svc:{port}/api/v1/alertmanager"
    credentials = webhook["httpConfig"]["authorization"]
    assert credentials["type"] == "Bearer"
    assert credentials["credentials"] == {"name": token["metadata"]["name"], "key": "token"}
    assert credentials["credentials"]["key"] in token["data"]
    route = config["route"]["routes"][0]
    assert route["receiver"] == "adamwatch-remediation" and route["continue"] is True


def test_alertmanager_config_should_page_critical_alerts_with_the_routing_key_secret():
    manifests = render_case("secrets-values.yaml")
    config = one(manifests, "AlertmanagerConfig")["spec"]
    pagerduty = {r["name"]: r for r in config["receivers"]}["adamwatch-pagerduty"]["pagerdutyConfigs"][0]
    secret = next(s for s in of_kind(manifests, "Secret") if s["metadata"]["name"] == pagerduty["routingKey"]["name"])

    assert pagerduty["routingKey"]["key"] in secret["data"]
    route = config["route"]["routes"][-1]
    assert route["receiver"] == "adamwatch-pagerduty"
    assert route["matchers"] == [{"name": "severity", "value": "critical", "matchType": "="}]


def test_webhook_route_should_be_limited_to_the_named_job():
    route = one(render_case("secrets-values.yaml"), "AlertmanagerConfig")["spec"]["route"]["routes"][0]

    assert {"name": "job", "value": "llm-pretrain", "matchType": "="} in route["matchers"]


def test_routes_should_match_the_alertmanager_example_and_some_alert_of_the_rules():
    """The chart's matchers equal alerts/alertmanager.yaml's, and each selects an alert that exists."""
    example = yaml.safe_load(ALERTMANAGER_EXAMPLE.read_text())["route"]["routes"]
    example_matchers = {route["receiver"]: route["matchers"] for route in example}
    routes = one(render_case("default"), "AlertmanagerConfig")["spec"]["route"]["routes"]
    alerts = [rule for group in expected_groups() for rule in group["rules"] if "alert" in rule]

    as_strings = {r["receiver"]: [f'{m["name"]}{m["matchType"]}"{m["value"]}"' for m in r["matchers"]] for r in routes}
    assert as_strings["adamwatch-remediation"] == example_matchers["adamwatch-sidecar"]
    assert as_strings["adamwatch-pagerduty"] == example_matchers["pagerduty"]
    for route in routes:
        selected = [a for a in alerts if all(a["labels"].get(m["name"]) == m["value"] for m in route["matchers"])]
        assert selected, f"route to {route['receiver']} matches no alert"


def parse_matcher(text: str) -> dict:
    name, match_type, value = re.fullmatch(r'\s*(\w+)\s*(=~|!~|!=|=)\s*"?(.*?)"?\s*', text).groups()
    return {"name": name, "value": value, "matchType": match_type}


def test_inhibit_rules_should_equal_those_of_the_alertmanager_example():
    example = yaml.safe_load(ALERTMANAGER_EXAMPLE.read_text())["inhibit_rules"]
    rendered = one(render_case("default"), "AlertmanagerConfig")["spec"]["inhibitRules"]

    assert rendered == [
        {
            "sourceMatch": [parse_matcher(m) for m in rule["source_matchers"]],
            "targetMatch": [parse_matcher(m) for m in rule["target_matchers"]],
            "equal": rule["equal"],
        }
        for rule in example
    ]
    assert "inhibitRules" not in one(render({"alertmanagerConfig": {"inhibitRules": False}}), "AlertmanagerConfig")["spec"]


def test_every_route_should_name_a_defined_receiver():
    for case in ["default", "secrets-values.yaml", "rules-tuned-values.yaml"]:
        config = one(render_case(case), "AlertmanagerConfig")["spec"]
        names = [r["name"] for r in config["receivers"]]
        assert len(names) == len(set(names))
        for route in [config["route"], *config["route"]["routes"]]:
            assert route["receiver"] in names


def to_alertmanager_yaml(spec: dict) -> dict:
    """The plain Alertmanager config the operator would generate (secrets as files)."""

    def matchers(items):
        return [f'{m["name"]}{m["matchType"]}"{m["value"]}"' for m in items]

    def route(item):
        out = {"receiver": item["receiver"], "matchers": matchers(item.get("matchers", []))}
        for key, name in [("groupBy", "group_by"), ("groupWait", "group_wait"), ("groupInterval", "group_interval"),
                          ("repeatInterval", "repeat_interval"), ("continue", "continue")]:
            if key in item:
                out[name] = item[key]
        if item.get("routes"):
            out["routes"] = [route(child) for child in item["routes"]]
        return out

    receivers = []
    for receiver in spec["receivers"]:
        out = {"name": receiver["name"]}
        for webhook in receiver.get("webhookConfigs", []):
            out.setdefault("webhook_configs", []).append(
                {
                    "url": webhook["url"],
                    "send_resolved": webhook["sendResolved"],
                    "max_alerts": webhook["maxAlerts"],
                    "http_config": {"authorization": {"type": "Bearer", "credentials_file": "/secrets/token"}},
                }
            )
        for pagerduty in receiver.get("pagerdutyConfigs", []):
            out.setdefault("pagerduty_configs", []).append(
                {
                    "routing_key_file": "/secrets/routing-key",
                    "send_resolved": pagerduty["sendResolved"],
                    "severity": pagerduty["severity"],
                    "client": pagerduty["client"],
                    "description": pagerduty["description"],
                    "details": {d["key"]: d["value"] for d in pagerduty["details"]},
                }
            )
        receivers.append(out)
    # The operator hangs the config's route under Alertmanager's root route,
    # with a namespace matcher added.
    namespaced = route(spec["route"])
    namespaced["matchers"].append(f'namespace="{NAMESPACE}"')
    root = {"receiver": spec["route"]["receiver"], "routes": [namespaced]}
    inhibit_rules = [
        {
            "source_matchers": matchers(rule["sourceMatch"]),
            "target_matchers": matchers(rule["targetMatch"]),
            "equal": rule.get("equal", []),
        }
        for rule in spec.get("inhibitRules", [])
    ]
    return {"route": root, "receivers": receivers, "inhibit_rules": inhibit_rules}


@pytest.mark.skipif(shutil.which("amtool") is None, reason="amtool is not installed")
@pytest.mark.parametrize("case", ["default", "secrets-values.yaml"])
def test_alertmanager_config_should_pass_amtool_check_config(case, tmp_path):
    config_file = tmp_path / "alertmanager.yaml"
    config_file.write_text(yaml.safe_dump(to_alertmanager_yaml(one(render_case(case), "AlertmanagerConfig")["spec"])))
    (tmp_path / "token").write_text("t")

    result = subprocess.run(
        ["amtool", "check-config", str(config_file)], capture_output=True, text=True, timeout=60, check=False
    )

    assert result.returncode == 0, result.stdout + result.stderr


def test_should_not_render_an_alertmanager_config_when_turned_off():
    manifests = render({"alertmanagerConfig": {"enabled": False}})

    assert of_kind(manifests, "AlertmanagerConfig") == []
    assert [s for s in of_kind(manifests, "Secret") if "pagerduty" in s["metadata"]["name"]] == []


def test_notes_should_warn_when_the_pagerduty_secret_is_not_provided():
    assert "create secret generic demo-adamwatch-pagerduty" in notes_of(None)
    assert "create secret generic" not in notes_of(
        {"alertmanagerConfig": {"pagerduty": {"routingKey": {"value": "k"}}}}
    )


def test_chart_should_carry_its_files_inside_the_chart():
    assert (CHART / "files" / "rules" / "adamwatch-rules.yaml").is_file()
    assert list((CHART / "files" / "dashboards").glob("*.json"))


def test_dashboard_runbook_links_should_follow_the_runbook_base_url():
    base = "https://wiki.example.com/runbooks/adamwatch"
    config_maps = [m for m in of_kind(render(values={"rules": {"runbookBaseURL": base}}), "ConfigMap")
                   if "-dashboard-" in m["metadata"]["name"]]
    texts = [text for m in config_maps for text in m["data"].values()]
    assert any(base + "/" in text for text in texts)
    assert not any("github.com/adamwatch/adamwatch/blob/main/alerts/runbooks" in text for text in texts)
