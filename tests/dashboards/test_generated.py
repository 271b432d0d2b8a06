"""The dashboards: regenerated JSON equals the committed files; uids, variables, panels as promised."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.alerts.assets_under_test import (
    ALERTS_README,
    DASHBOARDS_SRC,
    EVENT_ONLY,
    GENERATED,
    NEEDS_HISTORY,
    RUNBOOKS,
    dashboards,
    panels,
)

if str(DASHBOARDS_SRC) not in sys.path:
    sys.path.insert(0, str(DASHBOARDS_SRC))

from adamwatch_dashboards import build_all  # noqa: E402

UIDS = {"adamwatch-overview": "Overview", "adamwatch-oncall": "On-call", "adamwatch-optimizer-debug": "Optimizer debug",
        "adamwatch-executive": "Executive"}


def test_committed_json_equals_a_fresh_generation():
    fresh = build_all()
    assert sorted(fresh) == sorted(p.name for p in GENERATED.glob("*.json"))
    for name, content in fresh.items():
        assert (GENERATED / name).read_text() == content, f"{name} is stale: run python -m adamwatch_dashboards"


def test_generator_runs_as_a_module_and_check_mode_detects_drift(tmp_path):
    env_path = str(DASHBOARDS_SRC)
    run = lambda *args: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "adamwatch_dashboards", "--out", str(tmp_path), *args],
        capture_output=True, text=True, timeout=120, env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"},
    )
    assert run().returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{uid}.json" for uid in UIDS)
    assert run("--check").returncode == 0
    (tmp_path / "adamwatch-oncall.json").write_text("{}\n")
    drift = run("--check")
    assert drift.returncode == 1 and "adamwatch-oncall.json" in drift.stderr


def test_json_is_written_with_sorted_keys():
    for path in GENERATED.glob("*.json"):
        text = path.read_text()
        assert text == json.dumps(json.loads(text), sort_keys=True, indent=2) + "\n", path.name


def test_four_dashboards_with_fixed_uids_and_variables():
    boards = dashboards()
    assert set(boards) == set(UIDS)
    for uid, board in boards.items():
        assert board["uid"] == uid and "adamwatch" in board["tags"]
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
        assert {"job", "rank"} <= set(variables)
    debug = {v["name"]: v for v in boards["adamwatch-optimizer-debug"]["templating"]["list"]}
    assert not debug["job"].get("multi") and not debug["rank"].get("multi")  # one job and rank


def test_every_panel_queries_through_the_datasource_variable_with_unique_ids():
    for uid, board in dashboards().items():
        ids = [p["id"] for p in panels(board)]
        assert len(ids) == len(set(ids)), uid
        for panel in panels(board):
            if panel["type"] == "text":
                continue
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, (uid, panel["title"])
            assert panel["targets"], (uid, panel["title"])
            assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"])
            assert panel.get("description"), (uid, panel["title"])


def test_issue_panels_are_present():
    titles = {uid: {p["title"] for p in panels(b)} for uid, b in dashboards().items()}
    assert {"Jobs reporting", "Ranks reporting", "Healthy ranks", "Unhealthy ranks", "Remediations by action and outcome",
            "Critical alerts firing", "Optimizer steps per second"} <= titles["adamwatch-overview"]
    assert {"Non-finite steps", "Loss against its baseline", "Seconds since last step", "Remediation history",
            "Firing alerts", "Alerts and runbooks"} <= titles["adamwatch-oncall"]
    assert {"Loss", "Gradient norm by param group", "Scheduled vs effective learning rate", "Update size quantiles",
            "Update-to-weight ratio", "First and second moment norms",
            "Share of coordinates with sqrt(v_hat) <= eps", "Step time"} <= titles["adamwatch-optimizer-debug"]
    # issue 11 item 8
    assert {"Run success rate (30 days)", "Error budget remaining (30 days)", "Time to converge per model family",
            "Device-hours and cost per run", "Remediations per run"} <= titles["adamwatch-executive"]
    assert {"Checkpoint restore success", "Error budget remaining", "Error budget burn"} <= titles["adamwatch-oncall"]


def test_oncall_links_every_runbook():
    board = dashboards()["adamwatch-oncall"]
    markdown = next(p for p in panels(board) if p["title"] == "Alerts and runbooks")["options"]["content"]
    for runbook in RUNBOOKS.glob("*.md"):
        assert f"[{runbook.stem}](https://github.com/adamwatch/adamwatch/blob/main/alerts/runbooks/{runbook.stem}.md)" in markdown
    table = next(p for p in panels(board) if p["title"] == "Firing alerts")
    assert "${__value.text}.md" in json.dumps(table["fieldConfig"]["overrides"])


def test_event_only_and_history_markers_are_documented():
    marked = [p for b in dashboards().values() for p in panels(b)
              if p.get("description", "").startswith((EVENT_ONLY, NEEDS_HISTORY))]
    assert marked, "the e2e test relies on these markers"
    assert "Event-only" in ALERTS_README.read_text()


@pytest.mark.parametrize("runbook", sorted(RUNBOOKS.glob("*.md")), ids=lambda p: p.stem)
def test_panels_named_in_runbooks_exist(runbook):
    short_names = {v: k for k, v in UIDS.items()}
    titles = {uid: {p["title"] for p in panels(b)} for uid, b in dashboards().items()}
    references = re.findall(r"\*\*(Overview|On-call|Optimizer debug|Executive) → ([^*]+)\*\*", runbook.read_text())
    assert references, f"{runbook.name} names no dashboard panel"
    for board, title in references:
        assert title in titles[short_names[board]], f"{runbook.name}: no panel {title!r} on {board}"


def test_executive_cost_uses_the_price_variable():
    board = dashboards()["adamwatch-executive"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["price_per_device_hour"]["type"] == "textbox"
    cost = next(p for p in panels(board) if p["title"] == "Device-hours and cost per run")
    assert any("$price_per_device_hour" in t["expr"] for t in cost["targets"])
