"""Shared test helpers: an injectable clock, trainer payloads, a service on a real RunState."""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from adamwatch import wire
from adamwatch_sidecar.remediation.audit import AuditLog
from adamwatch_sidecar.remediation.policy import parse_remediation_config
from adamwatch_sidecar.remediation.service import RemediationService
from adamwatch_sidecar.run_state import RunState, TrainerKey


class Clock:
    """A settable clock: tests move time, nothing sleeps."""

    def __init__(self, t: float = 1_763_700_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def hello(job: str = "gpt", rank: int = 0, session: str = "s1", world_size: int = 1) -> dict[str, Any]:
    return {"job": job, "rank": rank, "world_size": world_size, "host": "h", "pid": 1, "session": session,
            "adamwatch_version": "0.1.0", "optimizer": {"kind": "AdamW", "param_groups": ["all_params"]}}


def step(i: int, loss: float | None = 2.0, grad_norm: float | None = 1.0, **extra: Any) -> dict[str, Any]:
    payload = {"step": i, "time": float(i), "duration_s": 0.1, "loss": loss, "grad_norm": grad_norm,
               "group_grad_norms": [grad_norm], "grad_nonfinite": False, "lr": [1e-3]}
    payload.update(extra)
    return payload


def noisy(i: int, base: float = 2.0) -> float:
    """Deterministic +-1.5% wiggle: healthy, never a spike."""
    return base * (1 + 0.015 * ((i * 7919) % 11 - 5) / 5)


@dataclass
class Rig:
    """A RemediationService on a real RunState, with a recording command sender."""

    service: RemediationService
    state: RunState
    clock: Clock
    spans: InMemorySpanExporter
    audit_path: pathlib.Path
    sent: list = field(default_factory=list)
    connected: set = field(default_factory=set)

    def hello(self, job: str = "gpt", rank: int = 0, session: str = "s1") -> TrainerKey:
        self.connected.add((job, rank))
        return self.state.hello(f"conn-{job}-{rank}", hello(job, rank, session))

    def step(self, i: int, job: str = "gpt", rank: int = 0, **kw: Any) -> None:
        self.state.apply(TrainerKey(job, rank), wire.Message(wire.MessageType.STEP, step(i, **kw)))
        self.clock.advance(0.1)

    def warm_up(self, steps: int = 40, job: str = "gpt", rank: int = 0) -> int:
        for i in range(1, steps + 1):
            self.step(i, job, rank, loss=noisy(i), grad_norm=noisy(i, 1.0))
        return steps

    def ack(self, payload: dict[str, Any], outcome: str = "applied", step: int | None = None, **extra: Any) -> None:
        ack = {"id": payload["id"], "action": payload["action"], "outcome": outcome, "step": step, "detail": None}
        ack.update(extra)
        self.state.apply(TrainerKey("gpt", 0), wire.Message(wire.MessageType.ACK, ack))

    def value(self, name: str, **labels: Any) -> float | None:
        return self.state.value(name, labels)

    def audit(self) -> list[dict[str, Any]]:
        if not self.audit_path.exists():
            return []
        return [json.loads(line) for line in self.audit_path.read_text().splitlines()]


def make_rig(tmp_path: pathlib.Path, raw: dict[str, Any] | None = None) -> Rig:
    clock = Clock()
    state = RunState(retention_seconds=300, clock=clock)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    audit_path = tmp_path / "audit" / "remediation.jsonl"
    config = parse_remediation_config(raw)
    rig = Rig(service=None, state=state, clock=clock, spans=exporter, audit_path=audit_path)  # type: ignore[arg-type]

    def send(key, payload):
        wire.validate_payload(wire.MessageType.COMMAND, payload)  # what the real ingest does
        if tuple(key) not in rig.connected:
            return False
        rig.sent.append((tuple(key), payload))
        return True

    rig.service = RemediationService(config, send_command=send, metrics=state, clock=clock,
                                     audit=AuditLog(str(audit_path), clock=clock),
                                     tracer=provider.get_tracer("test"))
    state.add_listener(rig.service.on_message)
    return rig
