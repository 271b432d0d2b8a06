"""Step-latency detectors and the remediation ladder of the sidecar.

The sidecar watches every STEP a trainer reports, raises incidents (non-finite
values, loss spike, gradient-norm spike, stall), walks a per-job ladder of
actions (cut the learning rate, restore a checkpoint, escalate) under cooldowns
and limits, sends the chosen COMMAND to rank 0 of the job, and records every
decision and outcome in an append-only audit log, a counter and an
OpenTelemetry span. Alertmanager's webhook and the ``adamwatch-sidecar ctl``
command drive the same ladder over an authenticated control endpoint.

Modules:

| module | job |
| --- | --- |
| ``policy`` | the ``remediation:`` YAML schema, defaults and validation |
| ``detectors`` | pure detectors fed with STEP payloads and a clock |
| ``ladder`` | rung selection: cooldowns, per-window limits, escalation |
| ``audit`` | append-only JSONL audit log |
| ``tracing`` | OpenTelemetry tracer (none, console, OTLP/HTTP) |
| ``service`` | ties detectors, ladder, commands, ACKs, metrics and audit together |
| ``control_http`` | the webhook, actions and status routes with token auth |
| ``ctl`` | the ``adamwatch-sidecar ctl`` command line |
| ``wiring`` | ``attach(sidecar, raw_config)`` for the sidecar process |
"""

from __future__ import annotations

from .policy import RemediationConfig, PolicyError, parse_remediation_config

__all__ = ["RemediationConfig", "PolicyError", "parse_remediation_config"]
