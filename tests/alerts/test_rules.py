"""The rules file: promtool clean, every alert tested, conventions every alert follows."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

from .assets_under_test import ALERTS_README, PROMTOOL_TESTS, RULES_FILE, RUNBOOKS, alert_rules, rules

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (scripts/setup.sh installs it)")
RUNBOOK_BASE = "https://github.com/adamwatch/adamwatch/blob/main/alerts/runbooks/"


@needs_promtool
def test_promtool_check_rules_is_clean():
    result = subprocess.run([PROMTOOL, "check", "rules", str(RULES_FILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


@needs_promtool
@pytest.mark.parametrize("test_file", PROMTOOL_TESTS, ids=lambda p: p.name)
def test_promtool_unit_tests_pass(test_file):
    result = subprocess.run([PROMTOOL, "test", "rules", test_file.name], cwd=test_file.parent,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def _alert_checks() -> dict[str, dict[str, int]]:
    """alertname -> {"quiet": checks expecting no alert, "fires": checks expecting exact alerts}."""
    counts: dict[str, dict[str, int]] = {}
    for path in PROMTOOL_TESTS:
        for test in yaml.safe_load(path.read_text())["tests"]:
            for check in test.get("alert_rule_test", []):
                entry = counts.setdefault(check["alertname"], {"quiet": 0, "fires": 0})
                if check.get("exp_alerts"):
                    for expected in check["exp_alerts"]:
                        # "fires with exactly these labels and annotations"
                        # SLO alerts are fleet-wide: they carry the SLO's name instead of a job
                        scope = "slo" if "slo" in expected["exp_labels"] else "job"
                        assert {"severity", scope} <= set(expected["exp_labels"]), (path.name, check)
                        assert {"summary", "description", "runbook_url"} == set(expected["exp_annotations"]), (path.name, check)
                    entry["fires"] += 1
                else:
                    entry["quiet"] += 1
    return counts


@pytest.mark.parametrize("alert", [r["alert"] for r in alert_rules()])
def test_every_alert_has_a_quiet_and_a_firing_promtool_case(alert):
    counts = _alert_checks().get(alert)
    assert counts, f"no promtool test mentions {alert}"
    assert counts["quiet"] >= 1, f"{alert}: no 'does not fire yet' case"
    assert counts["fires"] >= 1, f"{alert}: no 'fires with exactly these labels' case"


@pytest.mark.parametrize("alert", ["AdamwatchLossSpike", "AdamwatchGradNormExplosion", "AdamwatchThroughputDrop",
                                   # issue 11
                                   "AdamwatchTrainerOutOfMemory", "AdamwatchTrainerCrashLooping",
                                   "AdamwatchOverfitting", "AdamwatchSlowConvergence",
                                   "AdamwatchErrorBudgetFastBurn", "AdamwatchErrorBudgetSlowBurn"])
def test_noisy_alerts_have_a_healthy_but_noisy_case(alert):
    names = [t["name"] for p in PROMTOOL_TESTS for t in yaml.safe_load(p.read_text())["tests"]
             if any(c["alertname"] == alert and not c.get("exp_alerts") for c in t.get("alert_rule_test", []))
             and not any(c["alertname"] == alert and c.get("exp_alerts") for c in t.get("alert_rule_test", []))]
    assert any(("noisy" in n or "wobbles" in n or "heavy-tailed" in n) for n in names), names


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_alert_follows_the_conventions(rule):
    name = rule["alert"]
    assert re.fullmatch(r"Adamwatch[A-Z][A-Za-z]+", name)
    assert rule["labels"]["severity"] in {"critical", "warning", "info"}
    annotations = rule["annotations"]
    assert set(annotations) >= {"summary", "description", "runbook_url"}
    assert annotations["summary"].endswith(".") and "{{" not in annotations["summary"]
    assert "{{ $labels." in annotations["description"] or "{{ $value" in annotations["description"]
    assert annotations["runbook_url"] == f"{RUNBOOK_BASE}{name}.md"
    assert (RUNBOOKS / f"{name}.md").is_file(), f"no runbook page for {name}"


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_runbook_page_has_every_section(rule):
    text = (RUNBOOKS / f"{rule['alert']}.md").read_text()
    assert text.startswith(f"# {rule['alert']}\n")
    for section in ("## What it means", "## What adamwatch already did", "## What to do next", "## Where to look"):
        assert section in text, f"{rule['alert']}: missing {section}"
    assert f"**Severity:** {rule['labels']['severity']}" in text


def test_no_runbook_without_an_alert():
    assert {p.stem for p in RUNBOOKS.glob("*.md")} == {r["alert"] for r in alert_rules()}


def test_critical_alerts_do_not_wait_long():
    # A NaN, a failed remediation or an exhausted ladder is not transient.
    for rule in alert_rules():
        if rule["alert"] in {"AdamwatchNonFiniteStep", "AdamwatchRemediationFailed", "AdamwatchRemediationLadderExhausted"}:
            assert rule.get("for", "0s") in ("0s", "0m"), rule["alert"]
            assert rule["labels"]["severity"] == "critical"


def _seconds(duration: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600}
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)([smh])", duration))


def test_increase_windows_outlast_for():
    # increase(x[W]) > 0 with for >= W never fires for a single event.
    for rule in alert_rules():
        for window in re.findall(r"increase\([^\[]+\[(\w+)\]\)", rule["expr"]):
            assert _seconds(window) > _seconds(rule.get("for", "0s")), rule["alert"]


def test_readme_defaults_table_lists_every_alert_with_its_severity_and_for():
    table = ALERTS_README.read_text().split("## Defaults", 1)[1].split("###", 1)[0]
    for rule in alert_rules():
        row = next((line for line in table.splitlines() if f"[{rule['alert']}]" in line), None)
        assert row, f"alerts/README.md has no defaults row for {rule['alert']}"
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == rule["labels"]["severity"]
        assert cells[3] == (rule.get("for") or "none")


def test_the_monitor_errors_runbook_explains_every_where_the_trainer_counts():
    """``adamwatch_monitor_errors_total{where}`` takes its label from the names the trainer
    passes when it counts a failure; the runbook's table must explain each of them."""
    root = RUNBOOKS.parents[1] / "instrumentation" / "adamwatch"
    counted = set()
    for source in root.rglob("*.py"):
        counted.update(re.findall(r"""(?:_report_error|_on_error|on_error)\(\s*["']([a-z_]+)["']""",
                                  source.read_text()))
        counted.update(re.findall(r"""@guarded\(\s*["']([a-z_]+)["']""", source.read_text()))
    adapter_events = {name for name in counted if name.startswith("on_")}
    table = (RUNBOOKS / "AdamwatchMonitorErrors.md").read_text().split("| where |", 1)[1].split("\n\n", 1)[0]
    explained = set(re.findall(r"`([a-z_]+)`", table))
    assert {"pre_step_summary", "fingerprint", "background_job", "control_queue_full"} <= counted  # the scan works
    assert counted - adapter_events - explained == set()
    # adapter failures are labelled "<framework> adapter: <event>", explained by one row
    assert "`<framework> adapter: <event>`" in table and adapter_events
