"""Fake trainers for the fleet benchmark: many ranks on the real wire protocol, at little CPU.

One process plays every rank of the fleet. Each rank has its own connection to
its pod's sidecar (a Unix socket, as in a pod), says HELLO and then sends one
STEP frame per step, all ranks in lockstep as synchronous data-parallel
training does. What a rank sends is what a watched fused AdamW sends: four
param groups, deep statistics every N steps, a NaN step skipped by the guard
during an incident.

It is cheap because almost nothing is encoded per rank: the ranks of one job
share the global gradient norm, the learning rates and the optimizer state
(replicas are identical), so a job's STEP payload is encoded once per step and
only each rank's own loss is spliced into the bytes. Sockets are non-blocking:
a sidecar that does not keep up makes its ranks drop frames (counted, as the
real client does), never stalls the other ranks.

Fields of the wire schema this module does not know (a newer STEP or HELLO
field, e.g. a parameter fingerprint) are filled with a neutral value of the
declared kind, the same on every rank, so the sidecar exports their series
and the benchmark counts them without a change here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import socket
import time
from multiprocessing.connection import Connection
from typing import Any

from adamwatch import __version__ as adamwatch_version
from adamwatch import wire

__all__ = ["GROUPS", "RankSpec", "FleetFrames", "hello_payload", "step_payload", "schema_fields_filled", "run"]

GROUPS = ("embeddings", "decay", "no_decay", "head")
# Longest backlog of unsent bytes per connection before new frames are dropped.
MAX_PENDING_BYTES = 1 << 20
# Stands in for the per-rank loss in the encoded payload: a value the JSON
# encoder writes exactly so, which no real field ever takes.
_LOSS_SENTINEL = 1.2345678901234567e300
_LOSS_BYTES = repr(_LOSS_SENTINEL).encode()
_NEUTRAL = {"int": 0, "float": 0.0, "str": "", "bool": False, "list[float]": [], "list[float|null]": [],
            "list[str]": [], "dict": {}, "list[dict]": [], "any": None}


@dataclasses.dataclass(frozen=True)
class RankSpec:
    """One simulated rank.

    Args:
        endpoint: its pod's sidecar, ``unix:///...`` or ``tcp://127.0.0.1:PORT``.
        job: the training job's name.
        rank: the rank within the job.
        world_size: ranks in the job.
        pod: the pod's name (sent as the host).
    """

    endpoint: str
    job: str
    rank: int
    world_size: int
    pod: str


def _fill_unknown(msg_type: wire.MessageType, payload: dict[str, Any]) -> dict[str, Any]:
    for name, spec in wire.SCHEMAS[msg_type].items():
        if name not in payload:
            payload[name] = None if spec.nullable else _NEUTRAL[spec.kind]
    return payload


def schema_fields_filled() -> dict[str, list[str]]:
    """The HELLO and STEP fields of the wire schema that get a neutral value, not a realistic one.

    Returns:
        message type name -> field names (empty lists while this module knows every field).
    """
    filled = {}
    for msg_type, known in ((wire.MessageType.HELLO, hello_payload(RankSpec("unix:///x", "j", 0, 1, "p"), 10)),
                            (wire.MessageType.STEP, step_payload(1, 0.0, 1.0, True, False))):
        filled[msg_type.name] = sorted(set(wire.SCHEMAS[msg_type]) - set(known))
    return filled


def hello_payload(spec: RankSpec, deep_stats_every: int) -> dict[str, Any]:
    """The HELLO a watched fused AdamW with four param groups sends (without schema filling).

    Args:
        spec: the rank.
        deep_stats_every: steps between deep statistics.

    Returns:
        the payload.
    """
    return {
        "job": spec.job, "rank": spec.rank, "world_size": spec.world_size, "host": spec.pod, "pid": os.getpid(),
        "session": f"{spec.job}-{spec.rank}-{random.getrandbits(48):012x}", "adamwatch_version": adamwatch_version,
        "torch_version": "fleet-benchmark", "deep_stats_every": deep_stats_every, "dropped_total": 0,
        "model_family": "fleet-gpt", "target": None,  # issue 11: no convergence target
        "monitor_errors": {},  # issue 8: a healthy monitor
        "step_encoding": "json",  # the fleet simulator sends JSON STEPs (its pre-encoded template)
        "optimizer": {"kind": "AdamW", "implementation": "fused", "betas": [0.9, 0.95], "eps": 1e-8,
                      "weight_decay": 0.1, "amsgrad": False, "param_groups": list(GROUPS), "device": "cuda"},
        # issue 12: the configuration as adamwatch.optimizer_config.capture_config writes it (the
        # fleet has no policy, so no trainer waits for a verdict)
        "config": _FLEET_CONFIG, "config_hash": _FLEET_CONFIG_HASH,
        "features": {"checkpointer": True, "guard": True, "deep_stats": deep_stats_every > 0},
        "lr_scale": 1.0, "policy_wait_s": 0.0,
        # issue 10: the shared secret, as a trainer sends it when ADAMWATCH_SECRET_FILE is set
        # (sidecars without secret_file drop it unread)
        "secret": "fleet-benchmark-secret",
    }


# One fused AdamW with a linear warm-up, as capture_config describes it (no torch needed here).
_FLEET_CONFIG: dict[str, Any] = {
    "format": 1,
    "optimizer": {"kind": "AdamW", "implementation": "fused"},
    "param_groups": [
        {"name": name, "peak_lr": 3e-4, "peak_lr_source": "initial_lr", "betas": [0.9, 0.95], "eps": 1e-8,
         "weight_decay": 0.0 if name == "no_decay" else 0.1, "amsgrad": False, "maximize": False,
         "capturable": False, "differentiable": False, "num_tensors": 12, "num_elements": 1 << 24}
        for name in GROUPS
    ],
    "scheduler": {"class": "LambdaLR", "args": {}},
    "grad_scaler": None,
}
_FLEET_CONFIG_HASH = hashlib.sha256(
    json.dumps(_FLEET_CONFIG, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()[:16]


def step_payload(step: int, now: float, duration: float, deep: bool, nonfinite: bool) -> dict[str, Any]:
    """One job's STEP at ``step`` (without schema filling); the loss is the sentinel to splice.

    A healthy step has a slowly decaying loss and gradient norm with a little
    noise; a non-finite one is what the fused guard reports: NaN loss and
    norms, the step skipped.

    Args:
        step: optimizer step (1-based).
        now: unix seconds at which the step finished.
        duration: seconds since the previous step.
        deep: include deep statistics.
        nonfinite: the incident's NaN step.

    Returns:
        the payload.
    """
    decay = math.exp(-step / 2000)
    grad = math.nan if nonfinite else 0.8 + 0.6 * decay + random.gauss(0, 0.02)
    payload: dict[str, Any] = {
        "step": step, "time": now, "duration_s": duration,
        "loss": math.nan if nonfinite else _LOSS_SENTINEL, "loss_nonfinite": nonfinite,
        "grad_norm": grad, "group_grad_norms": [grad * share for share in (0.3, 0.8, 0.2, 0.5)],
        "grad_nonfinite": nonfinite, "lr": [3e-4 * min(1.0, step / 100)] * len(GROUPS),
        "skipped": nonfinite, "skip_reason": "guard" if nonfinite else None,
        "samples": 64, "tokens": 65536,
        # clipped at 1.0 (HF Trainer's default) and no step extension's numbers
        "extras": {}, "clip_max_norm": 1.0,
        "clip_coefficient": math.nan if nonfinite else min(1.0, 1.0 / (grad + 1e-6)),
    }
    if deep and not nonfinite:
        payload["deep"] = [{
            "effective_lr": [q * 3e-4 for q in (0.5, 2.0, 10.0, 60.0, 400.0)],
            "update_size": [q * 3e-4 * (0.5 + decay) for q in (0.01, 0.1, 0.5, 1.0, 2.0)],
            "update_to_weight": 1e-3 * (0.5 + decay), "exp_avg_norm": 0.1 * grad, "exp_avg_sq_norm": 0.01 * grad * grad,
            "eps_dominated_ratio": 0.01,
        } for _ in GROUPS]
    return payload


class FleetFrames:
    """Encoded STEP frames for every rank of one job at one step: one JSON encode, one splice per rank.

    Args:
        payload: the job's step payload (``loss`` is the sentinel on healthy steps).
    """

    def __init__(self, payload: dict[str, Any]):
        body = wire.encode_frame(wire.MessageType.STEP, _fill_unknown(wire.MessageType.STEP, payload))[wire.HEADER.size:]
        self._parts = body.split(_LOSS_BYTES)
        assert len(self._parts) <= 2, "the loss sentinel appears more than once"

    def for_rank(self, loss: float) -> bytes:
        """The frame of one rank with its own ``loss``."""
        if len(self._parts) == 1:  # a NaN step: the same bytes for everyone
            body = self._parts[0]
        else:
            body = self._parts[0] + repr(loss).encode() + self._parts[1]
        return wire.HEADER.pack(wire.MAGIC, wire.PROTOCOL_VERSION, wire.MessageType.STEP, len(body)) + body


class _Rank:
    """One connected rank: its socket, unsent bytes, dropped frames."""

    def __init__(self, spec: RankSpec, deep_stats_every: int):
        self.spec = spec
        endpoint = wire.parse_endpoint(spec.endpoint)
        if endpoint.scheme == "unix":
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(endpoint.path)
        else:
            self.sock = socket.create_connection((endpoint.host, endpoint.port))
        hello = _fill_unknown(wire.MessageType.HELLO, hello_payload(spec, deep_stats_every))
        self.sock.sendall(wire.encode_frame(wire.MessageType.HELLO, hello))
        self.sock.setblocking(False)
        self.pending = bytearray()
        self.dropped = 0
        # A rank's loss wobbles around the job's curve by its own small offset.
        self.offset = random.gauss(0, 0.01)

    def send(self, frame: bytes) -> None:
        if len(self.pending) + len(frame) > MAX_PENDING_BYTES:
            self.dropped += 1
            return
        self.pending += frame
        self.flush()

    def flush(self) -> None:
        try:
            sent = self.sock.send(self.pending)
        except BlockingIOError:
            return
        del self.pending[:sent]

    def drain(self) -> int:
        """Read and discard what the sidecar sent (commands); returns the bytes read."""
        total = 0
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return total
            if not data:
                return total
            total += len(data)


def run(specs: list[RankSpec], interval: float, deep_stats_every: int, control: Connection) -> None:
    """Play every rank in ``specs`` until told to stop; the body of the feeder process.

    Protocol on ``control`` (a multiprocessing pipe end): sends ``("ready", n)``
    once every rank has said HELLO (``("error", text)`` if that failed); receives ``("incident", job, steps)`` to make
    the next ``steps`` steps of ``job`` non-finite on every rank and answers
    ``("nan", step, unix_time)`` when the first of them is sent; receives
    ``("stop",)`` and answers ``("stopped", {"steps": n, "dropped": n, "command_bytes": n})``.

    Args:
        specs: the ranks.
        interval: seconds between steps.
        deep_stats_every: steps between deep statistics.
        control: the pipe end.
    """
    try:
        ranks = []
        for spec in specs:
            try:
                ranks.append(_Rank(spec, deep_stats_every))
            except OSError as exc:
                control.send(("error", f"{spec.job} rank {spec.rank} cannot reach {spec.endpoint}: {exc}"))
                return
        by_job: dict[str, list[_Rank]] = {}
        for rank in ranks:
            by_job.setdefault(rank.spec.job, []).append(rank)
        control.send(("ready", len(ranks)))
        incident: dict[str, int] = {}  # job -> non-finite steps left
        starting: set[str] = set()  # jobs whose incident has not sent its first NaN yet
        step, command_bytes = 0, 0
        previous = time.time()
        next_tick = time.monotonic()
        while True:
            step += 1
            now = time.time()
            deep = step % deep_stats_every == 0
            loss_curve = 2.0 + 3.0 * math.exp(-step / 2000)
            for job, members in by_job.items():
                nonfinite = incident.get(job, 0) > 0
                frames = FleetFrames(step_payload(step, now, now - previous, deep, nonfinite))
                for rank in members:
                    rank.send(frames.for_rank(loss_curve * (1 + rank.offset + random.gauss(0, 0.002))))
                if nonfinite:
                    incident[job] -= 1
                    if job in starting:
                        starting.discard(job)
                        control.send(("nan", step, now))
            previous = now
            if step % 10 == 0:
                command_bytes += sum(rank.drain() for rank in ranks)
            next_tick += interval
            while True:
                timeout = next_tick - time.monotonic()
                if not control.poll(max(0.0, timeout)):
                    break
                message = control.recv()
                if message[0] == "stop":
                    for rank in ranks:
                        rank.sock.close()
                    control.send(("stopped", {"steps": step, "dropped": sum(r.dropped for r in ranks),
                                              "command_bytes": command_bytes}))
                    return
                if message[0] == "incident":
                    _, job, steps = message
                    incident[job] = steps
                    starting.add(job)
            for rank in ranks:
                if rank.pending:
                    rank.flush()
    except (KeyboardInterrupt, EOFError, BrokenPipeError):
        # Ctrl-C reaches the whole process group, and a driver that is gone
        # closes the pipe: either way the driver (if any) cleans up.
        return
