"""The remediation policy: defaults, merging, and errors that name the field."""

from __future__ import annotations

import pathlib

import pytest
import yaml

from adamwatch_sidecar.remediation.policy import (
    DEFAULT_POLICY,
    PolicyError,
    parse_remediation_config,
)

README = pathlib.Path(__file__).resolve().parents[2] / "sidecar" / "README-remediation.md"


def test_no_policy_gives_the_documented_default_ladders():
    cfg = parse_remediation_config(None)
    assert cfg.enabled and not cfg.dry_run
    assert [r.action for r in cfg.ladders["loss_spike"]] == ["reduce_lr", "restore_checkpoint", "escalate"]
    assert [r.action for r in cfg.ladders["non_finite"]] == ["restore_checkpoint", "escalate"]
    assert [r.action for r in cfg.ladders["grad_norm_spike"]] == ["reduce_lr", "escalate"]
    assert [r.action for r in cfg.ladders["stall"]] == ["escalate"]
    assert cfg.detectors.loss_spike.k == 6.0 and cfg.detectors.loss_spike.window == 128
    assert cfg.detectors.stall.timeout_seconds == 300.0
    assert cfg.tracing.exporter == "none" and cfg.audit.path is None


def test_user_keys_override_defaults_and_a_given_ladder_replaces_the_default_one():
    cfg = parse_remediation_config({
        "dry_run": True,
        "detectors": {"loss_spike": {"k": 4, "window": 64}},
        "ladders": {"loss_spike": [{"action": "reduce_lr", "factor": 0.25}]},
        "escalate": {"stop_training": True},
        "alert_actions": {"AdamWatchLossSpike": "loss_spike", "AdamWatchStalled": {"ladder": "stall"}},
    })
    assert cfg.dry_run and cfg.stop_training
    assert cfg.detectors.loss_spike.k == 4.0 and cfg.detectors.loss_spike.window == 64
    assert cfg.detectors.loss_spike.min_samples == 32  # default kept
    assert cfg.detectors.grad_norm_spike.k == 6.0
    assert [(r.action, r.factor) for r in cfg.ladders["loss_spike"]] == [("reduce_lr", 0.25)]
    assert [r.action for r in cfg.ladders["non_finite"]] == ["restore_checkpoint", "escalate"]
    assert cfg.alert_actions == {"AdamWatchLossSpike": "loss_spike", "AdamWatchStalled": "stall"}


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"ladders": {"loss_spike": [{"action": "reduce_lr"}, {"action": "restore_checkpoint",
                                                                "cooldown_seconds": -5}]}},
         "remediation.ladders.loss_spike[1].cooldown_seconds: must be >= 0"),
        ({"ladders": {"loss_spike": [{"action": "reduce_lr", "factor": 1.5}]}},
         "remediation.ladders.loss_spike[0].factor: must be < 1"),
        ({"ladders": {"loss_spike": [{"action": "explode"}]}}, "remediation.ladders.loss_spike[0].action: must be one of"),
        ({"ladders": {"loss_spike": [{"factor": 0.5}]}}, "remediation.ladders.loss_spike[0].action: is required"),
        ({"ladders": {"loss_spike": [{"action": "escalate"}, {"action": "reduce_lr"}]}},
         "remediation.ladders.loss_spike[0].action: escalate must be the last rung"),
        ({"ladders": {"loss_spike": [{"action": "stop", "factor": 0.5}]}},
         "remediation.ladders.loss_spike[0].factor: only applies to action reduce_lr"),
        ({"ladders": {"loss_spike": [{"action": "reduce_lr", "max_per_window": 0}]}},
         "remediation.ladders.loss_spike[0].max_per_window: must be >= 1"),
        ({"ladders": {"loss_spike": [{"action": "reduce_lr", "cooldown_step": 3}]}},
         "remediation.ladders.loss_spike[0].cooldown_step: unknown key"),
        ({"ladders": {"loss_spike": []}}, "remediation.ladders.loss_spike: must be a non-empty list"),
        ({"detectors": {"loss_spike": {"k": 0}}}, "remediation.detectors.loss_spike.k: must be > 0"),
        ({"detectors": {"loss_spike": {"window": 16, "min_samples": 32}}},
         "remediation.detectors.loss_spike.min_samples: must be <= window"),
        ({"detectors": {"grad_norm_spike": {"window": "big"}}},
         "remediation.detectors.grad_norm_spike.window: must be an integer"),
        ({"detectors": {"stall": {"timeout_seconds": 0}}}, "remediation.detectors.stall.timeout_seconds: must be > 0"),
        ({"detectors": {"non_finite": {"consecutive_steps": 0}}},
         "remediation.detectors.non_finite.consecutive_steps: must be >= 1"),
        ({"detectors": {"spiky": {}}}, "remediation.detectors.spiky: unknown key"),
        ({"dry_run": "yes"}, "remediation.dry_run: must be true or false"),
        ({"escalate": {"stop_training": 1}}, "remediation.escalate.stop_training: must be true or false"),
        ({"alert_actions": {"AdamwatchLossSpike": "nope"}}, "remediation.alert_actions.AdamwatchLossSpike: must name a ladder"),
        ({"tracing": {"exporter": "jaeger"}}, "remediation.tracing.exporter: must be one of none, console, otlp-http"),
        ({"audit": {"path": ""}}, "remediation.audit.path: must be a non-empty string"),
        ({"ack_timeout_seconds": float("nan")}, "remediation.ack_timeout_seconds: must be a finite number"),
        ({"typo": 1}, "remediation.typo: unknown key"),
        ([1, 2], "remediation: must be a mapping"),
    ],
)
def test_bad_fields_are_named_in_the_error(raw, message):
    with pytest.raises(PolicyError) as info:
        parse_remediation_config(raw)
    assert str(info.value).startswith(message), str(info.value)
    assert isinstance(info.value, ValueError)


def test_the_error_path_follows_the_callers_prefix():
    with pytest.raises(ValueError, match=r"^config\.remediation\.enabled: "):
        parse_remediation_config({"enabled": None}, path="config.remediation")


def test_the_readme_reference_example_is_the_default_policy_and_parses():
    text = README.read_text()
    start = text.index("```yaml\nremediation:")
    block = text[start + len("```yaml\n"): text.index("```", start + 8)]
    documented = yaml.safe_load(block)["remediation"]
    assert documented == DEFAULT_POLICY
    parse_remediation_config(documented)
