"""Check every trainer's optimizer configuration against the policy, at HELLO and at every change.

    service = attach_policy(sidecar, config.optimizer_policy, audit=remediation.audit)

| trainer message | what the service does |
| --- | --- |
| HELLO with ``config`` | evaluate; set ``adamwatch_policy_violations{rule}``; audit each violation; answer with a ``policy_verdict`` COMMAND (``ok``, ``warn`` or ``stop``) that the trainer waits for before its first step |
| CONFIG (a change mid-run) | count ``adamwatch_optimizer_config_changes_total``; audit the change; evaluate again; a new ``stop`` violation sends a ``stop`` COMMAND, applied at the next step boundary |

The latest configuration of every trainer is part of ``ctl status``
(section ``optimizer_configs``). Rules are per job-name pattern; see
:mod:`adamwatch_sidecar.optimizer_policy`.
"""

from __future__ import annotations

import logging
import threading
import uuid
from typing import Any, Callable, Mapping

from adamwatch import wire

from .optimizer_policy import OptimizerPolicy, Violation, evaluate, parse_policy, verdict
from .remediation.audit import AuditLog

__all__ = ["OptimizerPolicyService", "attach_policy"]

log = logging.getLogger(__name__)

Key = tuple[str, int]


class OptimizerPolicyService:
    """The run-state listener that applies an :class:`OptimizerPolicy`.

    Args:
        policy: the parsed policy (an empty one still tracks configurations and changes).
        send_command: ``fn(key, payload) -> bool`` (``IngestServer.send_command``).
        metrics: the sidecar's ``RunState`` (``inc``, ``set_gauge``).
        audit: where violations and changes are recorded (the remediation audit log when attached).
        new_id: makes command ids (tests).
    """

    def __init__(self, policy: OptimizerPolicy, *, send_command: Callable[[Key, dict[str, Any]], bool],
                 metrics: Any, audit: AuditLog | None = None, new_id: Callable[[], str] | None = None):
        self.policy = policy
        self._send = send_command
        self._metrics = metrics
        self.audit = audit or AuditLog()
        self._new_id = new_id or (lambda: "aw-policy-" + uuid.uuid4().hex[:12])
        self._lock = threading.Lock()
        # (job, rank) -> {"config", "config_hash", "features", "violations", "changes", "last_change"}
        self._trainers: dict[Key, dict[str, Any]] = {}

    # ------------------------------------------------------------------ listener
    def on_message(self, key: Any, message: Any) -> None:
        """Run-state listener (ingest loop thread)."""
        if message is None:
            return
        key = (key[0], int(key[1]))
        if message.type is wire.MessageType.HELLO:
            self._hello(key, message.payload)
        elif message.type is wire.MessageType.CONFIG:
            self._change(key, message.payload)

    def _hello(self, key: Key, payload: Mapping[str, Any]) -> None:
        config = payload.get("config")
        features = payload.get("features")
        with self._lock:
            entry = self._trainers.setdefault(key, {"changes": 0, "last_change": None, "violations": []})
            entry.update(config=config, config_hash=payload.get("config_hash"), features=features)
        # The counter exists from the start at 0, so increase() sees the first change.
        self._safe(lambda: self._metrics.inc(key, "adamwatch_optimizer_config_changes_total", {}, 0.0))
        violations = self._evaluate(key, config, features, when="hello", step=None)
        if "config_hash" not in payload:
            return  # an older trainer: it does not know the verdict command
        outcome = verdict(violations)
        reason = self._reason(violations) if violations else "the optimizer configuration complies with the policy"
        self._command(key, "policy_verdict", {"verdict": outcome, "violations": [v.as_dict() for v in violations]},
                      reason)

    def _change(self, key: Key, payload: Mapping[str, Any]) -> None:
        with self._lock:
            entry = self._trainers.setdefault(key, {"changes": 0, "last_change": None, "violations": [],
                                                    "features": None})
            entry["config"], entry["config_hash"] = payload["config"], payload["config_hash"]
            entry["changes"] += 1
            entry["last_change"] = {"step": payload["step"], "previous_hash": payload.get("previous_hash"),
                                    "changed": list(payload["changed"])}
            features = entry.get("features")
            before = {v["rule"] for v in entry["violations"] if v["enforce"] == "stop"}
        self._safe(lambda: self._metrics.inc(key, "adamwatch_optimizer_config_changes_total", {}))
        self.audit.write("config_change", job=key[0], rank=key[1], step=payload["step"],
                         evidence={"previous_hash": payload.get("previous_hash"),
                                   "config_hash": payload["config_hash"], "changed": list(payload["changed"])},
                         detail="; ".join(payload["changed"])[:2000], source="trainer")
        log.warning("optimizer configuration of job=%s rank=%s changed at step %s: %s", key[0], key[1],
                    payload["step"], "; ".join(payload["changed"]))
        violations = self._evaluate(key, payload["config"], features, when="change", step=payload["step"])
        new_stops = [v for v in violations if v.enforce == "stop" and v.rule not in before]
        if new_stops and key[1] == 0:
            # Mid-run, a stop goes through the ordinary action (rank 0 broadcasts it to every rank).
            self._command(key, "stop", {}, self._reason(new_stops))

    # ------------------------------------------------------------------ helpers
    def _evaluate(self, key: Key, config: Any, features: Any, *, when: str, step: int | None) -> list[Violation]:
        config = config if isinstance(config, Mapping) else None
        features = features if isinstance(features, Mapping) else None
        violations = evaluate(self.policy, key[0], config, features)
        with self._lock:
            entry = self._trainers.setdefault(key, {"changes": 0, "last_change": None})
            previous = {v["rule"] for v in entry.get("violations", [])}
            entry["violations"] = [v.as_dict() for v in violations]
        current = {v.rule for v in violations}
        for rule in sorted(previous - current):
            self._safe(lambda rule=rule: self._metrics.set_gauge(key, "adamwatch_policy_violations", {"rule": rule}, 0.0))
            self.audit.write("policy_ok", job=key[0], rank=key[1], step=step, detail=f"{rule} complies again",
                             source="policy")
        for v in violations:
            self._safe(lambda v=v: self._metrics.set_gauge(key, "adamwatch_policy_violations", {"rule": v.rule}, 1.0))
            if v.rule not in previous:
                self.audit.write("policy_violation", job=key[0], rank=key[1], step=step, detector=v.rule,
                                 detail=v.message, outcome=v.enforce, source=f"policy:{when}")
                log.warning("optimizer policy: job=%s rank=%s breaks %s (%s): %s", key[0], key[1], v.rule,
                            v.enforce, v.message)
        return violations

    @staticmethod
    def _reason(violations: list[Violation]) -> str:
        return "optimizer policy: " + "; ".join(f"rule {v.rule}: {v.message}" for v in violations)

    def _command(self, key: Key, action: str, args: dict[str, Any], reason: str) -> None:
        payload = {"id": self._new_id(), "action": action, "args": args, "reason": reason[:4000]}
        try:
            sent = self._send(key, payload)
        except Exception:
            log.exception("sending %s to %s failed", action, key)
            sent = False
        # The verdict gets its own event: remediation's "decision" lines stay the ladder's and the stop's.
        self.audit.write("policy_verdict" if action == "policy_verdict" else "decision", job=key[0], rank=key[1],
                         action=action, args=args, command_id=payload["id"], detail=reason[:2000],
                         outcome="sent" if sent else "failed", source="policy")

    def _safe(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:
            log.exception("optimizer policy metric update failed")

    # ------------------------------------------------------------------ status
    def status(self, job: str | None = None) -> dict[str, Any]:
        """Every trainer's configuration, fingerprint, features, violations and changes (``ctl status``).

        Args:
            job: only this job (None: all).

        Returns:
            ``{"<job>/<rank>": {...}}``.
        """
        with self._lock:
            return {f"{k[0]}/{k[1]}": dict(v) for k, v in sorted(self._trainers.items())
                    if job is None or k[0] == job}


def attach_policy(sidecar: Any, raw_policy: Any, *, audit: AuditLog | None = None) -> OptimizerPolicyService:
    """Build the service from the ``optimizer_policy`` config and hook it into ``sidecar``.

    Args:
        sidecar: an ``adamwatch_sidecar.server.Sidecar``.
        raw_policy: the ``optimizer_policy`` mapping (validated again here).
        audit: the audit log to share (the remediation service's).

    Returns:
        The service; its status is added to the remediation status when remediation is attached.
    """
    remediation = getattr(sidecar, "remediation", None)
    if audit is None and remediation is not None:
        audit = getattr(remediation, "audit", None)
    service = OptimizerPolicyService(parse_policy(raw_policy), send_command=sidecar.ingest.send_command,
                                     metrics=sidecar.state, audit=audit)
    # HELLO and CONFIG only: the ingest hot path (STEP) skips it
    sidecar.state.add_listener(service.on_message, types=(wire.MessageType.HELLO, wire.MessageType.CONFIG))
    if remediation is not None and hasattr(remediation, "status_extensions"):
        remediation.status_extensions["optimizer_configs"] = service.status
    sidecar.optimizer_policy = service
    log.info("optimizer policy: %d rule(s)", len(service.policy.rules))
    return service
