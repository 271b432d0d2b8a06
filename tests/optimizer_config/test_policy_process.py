"""A real sidecar with an optimizer policy, real trainer processes: verdicts, stops, changes, status."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

HERE = Path(__file__).resolve().parent
SIDECAR = os.path.join(os.path.dirname(sys.executable), "adamwatch-sidecar")
TOKEN = "policy-token"

POLICY = {
    "enforce": "warn",
    "rules": [
        {"name": "prod-lr", "jobs": ["prod-*"], "enforce": "stop", "peak_lr": {"min": 1e-5, "max": 1e-3}},
        {"name": "betas", "jobs": ["*"], "beta1": {"min": 0.8, "max": 0.99}},
        {"name": "features", "jobs": ["prod-*"], "require": {"deep_stats": True}},
        {"name": "prod-betas", "jobs": ["prod-*"], "enforce": "stop", "beta1": {"min": 0.8}},
    ],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def sidecar(tmp_path):
    token = tmp_path / "token"
    token.write_text(TOKEN)
    audit = tmp_path / "audit.jsonl"
    config = tmp_path / "sidecar.yaml"
    config.write_text(yaml.safe_dump({"remediation": {"audit": {"path": str(audit)}}, "optimizer_policy": POLICY}))
    ingest, metrics, control = free_port(), free_port(), free_port()
    log = open(tmp_path / "sidecar.log", "wb")
    proc = subprocess.Popen([SIDECAR, "serve", "--config", str(config), "--listen", f"tcp://127.0.0.1:{ingest}",
                             "--metrics-address", f"127.0.0.1:{metrics}", "--control-address",
                             f"127.0.0.1:{control}", "--control-token-file", str(token)], stdout=log, stderr=log)
    url = f"http://127.0.0.1:{metrics}"
    deadline = time.monotonic() + 20
    while True:
        assert proc.poll() is None, (tmp_path / "sidecar.log").read_text()[-2000:]
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=1):
                break
        except OSError:
            assert time.monotonic() < deadline, "sidecar not ready"
            time.sleep(0.05)
    yield {"endpoint": f"tcp://127.0.0.1:{ingest}", "metrics": url, "control": f"127.0.0.1:{control}",
           "audit": audit, "token": token}
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    log.close()


def samples(url: str) -> list:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(url: str, name: str, **labels: str) -> float | None:
    for s in samples(url):
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    return None


def run_trainer(endpoint: str, job: str, lr: float, steps: int, *extra: str) -> tuple[dict, str]:
    done = subprocess.run([sys.executable, str(HERE / "_trainer.py"), endpoint, job, str(lr), str(steps), *extra],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def audit_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
def test_a_policy_violation_with_enforce_stop_stops_a_real_trainer_before_its_first_step(sidecar):
    result, stderr = run_trainer(sidecar["endpoint"], "prod-gpt", 0.01, 50)
    assert result["steps"] == 0, result
    assert value(sidecar["metrics"], "adamwatch_optimizer_config_changes_total", job="prod-gpt") == 0.0
    assert result["stop_requested"] is True
    assert result["verdict"]["verdict"] == "stop"
    # the trainer's log names the rule and what is allowed
    assert "the optimizer policy stops this run" in stderr
    assert "rule prod-lr.peak_lr: peak_lr must be in [1e-05, 0.001]; found group 0: 0.01" in stderr
    assert value(sidecar["metrics"], "adamwatch_policy_violations", job="prod-gpt", rule="prod-lr.peak_lr") == 1.0
    # the info series carries the fingerprint the trainer computed
    info = [s for s in samples(sidecar["metrics"]) if s.name == "adamwatch_optimizer_info"
            and s.labels["job"] == "prod-gpt"]
    assert [s.labels["config_hash"] for s in info] == [result["config_hash"]]
    audit = audit_lines(sidecar["audit"])
    assert any(a["event"] == "policy_violation" and a["detector"] == "prod-lr.peak_lr" and a["outcome"] == "stop"
               for a in audit), audit
    assert any(a["event"] == "policy_verdict" and a["args"]["verdict"] == "stop"
               for a in audit)


@pytest.mark.slow
def test_a_compliant_trainer_starts_at_once_and_a_mid_run_change_is_counted_audited_and_reevaluated(sidecar):
    result, stderr = run_trainer(sidecar["endpoint"], "dev-gpt", 1e-4, 20, "5")
    assert result["verdict"]["verdict"] == "ok"
    assert result["steps"] == 20  # warn-only rule: the run goes on
    assert result["config_changes"] == 1
    assert "param_groups[0].betas: [0.9, 0.999] -> [0.5, 0.999]" in stderr
    deadline = time.monotonic() + 5
    while value(sidecar["metrics"], "adamwatch_optimizer_config_changes_total", job="dev-gpt") != 1.0:
        assert time.monotonic() < deadline, "config change not counted"
        time.sleep(0.05)
    assert value(sidecar["metrics"], "adamwatch_policy_violations", job="dev-gpt", rule="betas.beta1") == 1.0
    info = [s for s in samples(sidecar["metrics"]) if s.name == "adamwatch_optimizer_info"
            and s.labels["job"] == "dev-gpt"]
    assert [s.labels["config_hash"] for s in info] == [result["config_hash"]]  # the hash after the change
    audit = audit_lines(sidecar["audit"])
    change = [a for a in audit if a["event"] == "config_change"]
    # edited after step 5: step 6 is the first to run with it, and sees it at its end
    assert len(change) == 1 and change[0]["step"] == 6
    assert change[0]["evidence"]["changed"] == ["param_groups[0].betas: [0.9, 0.999] -> [0.5, 0.999]"]
    assert any(a["event"] == "policy_violation" and a["detector"] == "betas.beta1" and a["step"] == 6 for a in audit)
    # the whole configuration is readable with ctl status
    done = subprocess.run([SIDECAR, "ctl", "--address", sidecar["control"], "--token-file", str(sidecar["token"]),
                           "status"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    entry = json.loads(done.stdout)["optimizer_configs"]["dev-gpt/0"]
    assert entry["config_hash"] == result["config_hash"]
    assert entry["config"]["param_groups"][0]["betas"] == [0.5, 0.999]
    assert entry["config"]["scheduler"]["class"] == "LambdaLR"
    assert entry["features"] == {"checkpointer": False, "guard": True, "deep_stats": True}
    assert entry["changes"] == 1


@pytest.mark.slow
def test_a_mid_run_change_that_breaks_a_stop_rule_stops_the_run_at_a_step_boundary(sidecar):
    result, stderr = run_trainer(sidecar["endpoint"], "prod-ok", 1e-4, 200, "5")
    assert result["verdict"]["verdict"] == "ok"
    assert result["stop_requested"] is True
    assert 6 <= result["steps"] < 200, result  # stopped soon after the change at step 6, not before it
    assert "rule prod-betas.beta1: beta1 must be >= 0.8; found group 0: 0.5" in stderr
    assert value(sidecar["metrics"], "adamwatch_policy_violations", job="prod-ok", rule="prod-betas.beta1") == 1.0
    audit = audit_lines(sidecar["audit"])
    assert any(a["event"] == "decision" and a["action"] == "stop" and a["source"] == "policy" for a in audit)


@pytest.mark.slow
def test_without_a_sidecar_the_trainer_never_waits_for_a_verdict(tmp_path):
    result, _ = run_trainer(f"unix://{tmp_path}/nobody.sock", "prod-gpt", 0.01, 3)
    assert result["steps"] == 3 and result["verdict"] is None and result["stop_requested"] is False
    assert result["seconds"] < 4.0  # policy_wait=5 in the script: it was not spent


@pytest.mark.slow
def test_under_torch_distributed_one_rank_stop_verdict_stops_every_rank_before_step_1(sidecar, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(HERE / "_dist_policy_worker.py"), str(r), "2", str(tmp_path),
                               sidecar["endpoint"]], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=env) for r in range(2)]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=120)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["steps"] == r1["steps"] == 0 and r0["stop"] and r1["stop"]
    assert r0["verdict"]["verdict"] == "stop"
    assert r1["verdict"]["reason"] == "another rank's verdict was stop"
