"""The large-fleet Prometheus examples: promtool-clean, sharded by training job, federating what exists.

alerts/prometheus-large-fleet.yaml (one shard, remote_write to Mimir/Thanos) and
alerts/prometheus-global.yaml (a federating tier) are documented in
alerts/README.md, "Large fleets".
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

from .assets_under_test import ROOT, recording_names, rules

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (scripts/setup.sh installs it)")
SHARD = ROOT / "alerts" / "prometheus-large-fleet.yaml"
GLOBAL = ROOT / "alerts" / "prometheus-global.yaml"
HELM_HELPERS = ROOT / "helm" / "adamwatch" / "templates" / "_helpers.tpl"
# The pod labels the Job controller and the Kubeflow training operator put on a
# job's pods (the chart's adamwatch.jobNameLabel), as Kubernetes discovery names them.
JOB_NAME_LABELS = ["__meta_kubernetes_pod_label_batch_kubernetes_io_job_name",
                   "__meta_kubernetes_pod_label_training_kubeflow_org_job_name"]


def _promtool_knows_kubernetes(tmp_path) -> bool:
    probe = tmp_path / "probe.yaml"
    probe.write_text("scrape_configs:\n  - job_name: probe\n    kubernetes_sd_configs: [{role: pod}]\n")
    return subprocess.run([PROMTOOL, "check", "config", str(probe)], capture_output=True, timeout=60).returncode == 0


def _checkable(path, tmp_path):
    """The example as this machine's promtool can check it.

    Debian's Prometheus is built without Kubernetes discovery. Where promtool
    lacks it, each ``kubernetes_sd_configs`` block, asserted to be exactly
    ``[{role: pod}]`` first, becomes a ``file_sd_configs`` block; everything else
    (relabelling, remote_write, alerting, the rule files) is checked as written.
    """
    if _promtool_knows_kubernetes(tmp_path):
        return path
    config = yaml.safe_load(path.read_text())
    targets = tmp_path / "targets.json"
    targets.write_text("[]")
    for scrape in config.get("scrape_configs", []):
        if "kubernetes_sd_configs" in scrape:
            assert scrape.pop("kubernetes_sd_configs") == [{"role": "pod"}], scrape["job_name"]
            scrape["file_sd_configs"] = [{"files": [str(targets)]}]
    config["rule_files"] = [str(path.parent / name) for name in config.get("rule_files", [])]
    copy = tmp_path / path.name
    copy.write_text(yaml.safe_dump(config, sort_keys=False))
    return copy


@needs_promtool
@pytest.mark.parametrize("path", [SHARD, GLOBAL], ids=lambda p: p.name)
def test_promtool_check_config_is_clean(path, tmp_path):
    result = subprocess.run([PROMTOOL, "check", "config", str(_checkable(path, tmp_path))],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "is valid prometheus config file syntax" in result.stdout
    if path is SHARD:  # its rule_files are the shipped rules, checked through it
        assert f"SUCCESS: {len(rules())} rules found" in result.stdout, result.stdout


def _scrape(config: dict, name: str) -> dict:
    return next(s for s in config["scrape_configs"] if s["job_name"] == name)


def test_a_shard_loads_the_shipped_rules_and_scrapes_sidecars_as_the_rules_expect():
    config = yaml.safe_load(SHARD.read_text())
    assert config["rule_files"] == ["adamwatch-rules.yaml"]  # next to it: alerts/adamwatch-rules.yaml
    sidecars = _scrape(config, "adamwatch-sidecar")  # the name AdamwatchSidecarDown selects
    assert sidecars["honor_labels"] is True
    keep = sidecars["relabel_configs"][0]
    assert keep["action"] == "keep" and keep["regex"] == "adamwatch-sidecar;metrics"
    # ...which are the chart's sidecar container and port names.
    helpers = HELM_HELPERS.read_text()
    assert "- name: adamwatch-sidecar\n" in helpers and "- name: metrics\n" in helpers


def test_a_shard_keeps_whole_jobs_hashing_the_job_name_never_the_pod():
    relabel = _scrape(yaml.safe_load(SHARD.read_text()), "adamwatch-sidecar")["relabel_configs"]
    hashmod = [r for r in relabel if r.get("action") == "hashmod"]
    assert len(hashmod) == 1 and hashmod[0]["source_labels"] == JOB_NAME_LABELS
    keep_shard = [r for r in relabel if r.get("source_labels") == [hashmod[0]["target_label"]]]
    assert keep_shard and keep_shard[0]["action"] == "keep"
    helpers = HELM_HELPERS.read_text()
    for label in ("batch.kubernetes.io/job-name", "training.kubeflow.org/job-name"):
        assert label in helpers, label


def test_replicas_of_a_shard_send_alertmanager_identical_alerts():
    config = yaml.safe_load(SHARD.read_text())
    assert "prometheus_replica" in config["global"]["external_labels"]
    assert {"action": "labeldrop", "regex": "prometheus_replica"} in config["alerting"]["alert_relabel_configs"]


def test_the_global_tier_federates_per_job_aggregates_that_the_shipped_rules_record():
    federate = _scrape(yaml.safe_load(GLOBAL.read_text()), "adamwatch-federate")
    assert federate["metrics_path"] == "/federate" and federate["honor_labels"] is True
    selectors = federate["params"]["match[]"]
    name_regex = re.search(r'__name__=~"([^"]+)"', selectors[0]).group(1)
    aggregates = {name for name in recording_names() if re.fullmatch(name_regex, name)}
    assert len(aggregates) >= 5, aggregates
    # Only per-job series: none of them keeps a rank.
    for rule in rules():
        if rule.get("record") in aggregates:
            assert re.search(r"\bby \((namespace, )?job\)", rule["expr"]), rule["record"]
