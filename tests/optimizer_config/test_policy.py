"""The optimizer policy: parsed strictly, evaluated per job pattern, checkable offline from the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from adamwatch.optimizer_config import write_config_file
from adamwatch_sidecar.config import ConfigError, build_config
from adamwatch_sidecar.optimizer_policy import PolicyError, evaluate, parse_policy, verdict

SIDECAR = os.path.join(os.path.dirname(sys.executable), "adamwatch-sidecar")
POLICY = {"enforce": "warn", "rules": [
    {"name": "prod", "jobs": ["prod-*"], "enforce": "stop", "peak_lr": {"max": 3e-4}, "beta2": {"min": 0.95},
     "amsgrad": False, "implementation": ["fused"], "require": {"checkpointer": True, "guard": True}},
    {"name": "all", "eps": {"min": 1e-10, "max": 1e-6}},
]}


def config(lr=1e-4, beta2=0.99, eps=1e-8, amsgrad=False, implementation="fused"):
    group = {"name": "0", "peak_lr": lr, "betas": [0.9, beta2], "eps": eps, "amsgrad": amsgrad, "weight_decay": 0.1}
    return {"optimizer": {"kind": "AdamW", "implementation": implementation}, "param_groups": [group]}


FEATURES = {"checkpointer": True, "guard": True, "deep_stats": True}


def test_a_compliant_configuration_has_no_violation():
    assert evaluate(parse_policy(POLICY), "prod-gpt", config(), FEATURES) == []


def test_each_field_is_checked_and_named_in_its_rule_label():
    policy = parse_policy(POLICY)
    bad = config(lr=1e-3, beta2=0.9, eps=1e-3, amsgrad=True, implementation="foreach")
    found = evaluate(policy, "prod-gpt", bad, {"checkpointer": False, "guard": True})
    assert [v.rule for v in found] == ["prod.peak_lr", "prod.beta2", "prod.amsgrad", "prod.implementation",
                                       "prod.require.checkpointer", "all.eps"]
    assert found[0].message == "peak_lr must be <= 0.0003; found group 0: 0.001"
    assert verdict(found) == "stop"
    # another job only meets the catch-all rule, which warns
    assert [(v.rule, v.enforce) for v in evaluate(policy, "dev", bad, {})] == [("all.eps", "warn")]


def test_a_value_the_trainer_could_not_read_does_not_pass_a_range():
    cfg = config()
    cfg["param_groups"][0]["peak_lr"] = "tensor on cuda"
    assert [v.rule for v in evaluate(parse_policy(POLICY), "prod-gpt", cfg, FEATURES)] == ["prod.peak_lr"]


@pytest.mark.parametrize("raw, message", [
    ({"rules": [{"name": "x", "eps": {"min": 1, "max": 0}}]}, "optimizer_policy.rules[0].eps: min 1 is above max 0"),
    ({"rules": [{"name": "x", "lr": 1}]}, "optimizer_policy.rules[0].lr: unknown key"),
    ({"enforce": "kill"}, "optimizer_policy.enforce: must be one of warn, stop"),
    ({"rules": [{"name": "x", "require": {"gpu": True}}]}, "optimizer_policy.rules[0].require.gpu: unknown feature"),
    ({"rules": [{"name": "x"}, {"name": "x"}]}, "rule names must be unique"),
])
def test_a_bad_policy_is_a_config_error_naming_the_field(raw, message):
    with pytest.raises(PolicyError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_policy(raw)
    with pytest.raises(ConfigError, match="optimizer_policy"):
        build_config({"optimizer_policy": raw})


def test_policy_check_cli_evaluates_a_written_configuration_offline(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    path = tmp_path / "optimizer-config.json"
    write_config_file(str(path), optimizer, job="prod-gpt", features=FEATURES)
    policy = tmp_path / "sidecar.yaml"
    policy.write_text(yaml.safe_dump({"optimizer_policy": POLICY}))
    done = subprocess.run([SIDECAR, "policy", "check", "--policy", str(policy), str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert "VIOLATION prod.peak_lr [stop]: peak_lr must be <= 0.0003; found group 0: 0.001" in done.stdout
    assert "verdict: stop" in done.stdout
    done = subprocess.run([SIDECAR, "policy", "check", "--policy", str(policy), "--job", "dev", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("OK: job dev"), done.stdout + done.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"optimizer_policy": {"rules": [{"name": "x", "eps": "small"}]}}))
    done = subprocess.run([SIDECAR, "policy", "check", "--policy", str(bad), str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "optimizer_policy.rules[0].eps" in done.stderr


def test_numbers_that_yaml_reads_as_strings_are_accepted_and_words_are_not():
    raw = yaml.safe_load("rules: [{name: r, peak_lr: {max: 3e-4}}]")
    assert raw["rules"][0]["peak_lr"]["max"] == "3e-4"  # PyYAML's YAML 1.1 quirk
    assert parse_policy(raw).rules[0].ranges["peak_lr"] == (None, 3e-4)
    with pytest.raises(PolicyError, match=r"rules\[0\].peak_lr.max: must be a finite number, got 'tiny'"):
        parse_policy({"rules": [{"name": "r", "peak_lr": {"max": "tiny"}}]})


def test_a_malformed_configuration_from_a_trainer_is_checked_as_missing_never_raises():
    policy = parse_policy(POLICY)
    for junk in ({"param_groups": "many"}, {"param_groups": [1, None], "optimizer": "fast"}):
        rules = {v.rule for v in evaluate(policy, "prod-gpt", junk, "features?")}
        assert "prod.peak_lr" in rules and "prod.require.checkpointer" in rules
