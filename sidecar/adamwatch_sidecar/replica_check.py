"""Replica consistency: compares the parameter fingerprints of a job's ranks.

Every N steps each trainer sends a FINGERPRINT (``adamwatch.fingerprint``: an
exact integer hash of its parameters and Adam state). Data-parallel replicas at
the same step must send the same value. For every job this sidecar sees, the
check keeps the fingerprints of the latest few steps by rank and, as soon as
two ranks disagree at one step:

| what | where |
| --- | --- |
| ``adamwatch_replica_divergence`` = 1 on each rank outside the most common value (0 on the others) | /metrics |
| one ``detection`` line, detector ``replica_divergence``, with every rank's fingerprint as evidence | the audit log (and a warning in the sidecar's log) |

``adamwatch_parameter_fingerprint`` and ``..._step`` are exported for every
rank, so the ``AdamwatchReplicaDivergence`` alert compares ranks across
sidecars (the whole job) in PromQL. One sidecar sees only the ranks of its pod.

    >>> from adamwatch import wire
    >>> from adamwatch_sidecar.run_state import RunState
    >>> state = RunState(retention_seconds=60, clock=lambda: 1000.0)
    >>> check = ReplicaCheck(state)
    >>> for rank, value in ((0, 7), (1, 9)):
    ...     key = state.hello(f"c{rank}", {"job": "gpt", "rank": rank, "world_size": 2, "host": "h",
    ...         "pid": 1, "session": "s", "adamwatch_version": "0", "optimizer": {"param_groups": []}})
    ...     check.on_message(key, wire.Message(wire.MessageType.FINGERPRINT, {"step": 100, "fingerprint": value}))
    >>> check.divergent("gpt")
    (100, [1])
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Any

from adamwatch import wire

from .run_state import RunState, TrainerKey

__all__ = ["ReplicaCheck"]

log = logging.getLogger(__name__)

# Ranks compared per job and step; a sidecar serves the ranks of one pod, far fewer.
MAX_RANKS_PER_JOB = 4096


class ReplicaCheck:
    """Listener of :class:`RunState` that compares FINGERPRINT messages across ranks.

    Args:
        state: where the gauges go (its generic store).
        audit: an ``AuditLog`` (remediation's) for the detection lines, or None.
        keep_steps: fingerprint steps remembered per job (ranks report a step
            at slightly different times; older steps are dropped).
        max_jobs: jobs remembered; the one that reported least recently is
            forgotten first (memory stays bounded whatever trainers send).
    """

    def __init__(self, state: RunState, *, audit: Any = None, keep_steps: int = 4, max_jobs: int = 1024):
        self.state = state
        self.audit = audit
        self.keep_steps = keep_steps
        self.max_jobs = max_jobs
        self._lock = threading.Lock()
        # job -> {step: {rank: fingerprint}}, steps in arrival order; jobs least recent first
        self._jobs: collections.OrderedDict[str, collections.OrderedDict[int, dict[int, int]]] = \
            collections.OrderedDict()
        self._reported: dict[str, int] = {}  # job -> latest step already audited as divergent
        self._divergent: dict[str, tuple[int, list[int]]] = {}

    def on_message(self, key: TrainerKey, message: wire.Message | None) -> None:
        """RunState listener: records FINGERPRINT messages, ignores everything else."""
        if message is None or message.type is not wire.MessageType.FINGERPRINT:
            return
        step, value = message.payload["step"], message.payload["fingerprint"]
        self.state.set_gauge(key, "adamwatch_parameter_fingerprint", {}, float(value))
        self.state.set_gauge(key, "adamwatch_parameter_fingerprint_step", {}, float(step))
        with self._lock:
            steps = self._jobs.setdefault(key.job, collections.OrderedDict())
            self._jobs.move_to_end(key.job)
            while len(self._jobs) > self.max_jobs:
                old, _ = self._jobs.popitem(last=False)
                self._reported.pop(old, None)
                self._divergent.pop(old, None)
            by_rank = steps.setdefault(step, {})
            if len(by_rank) >= MAX_RANKS_PER_JOB and key.rank not in by_rank:
                return
            by_rank[key.rank] = value
            while len(steps) > self.keep_steps:
                steps.popitem(last=False)
            by_rank = dict(by_rank)
        self._compare(key.job, step, by_rank)

    def divergent(self, job: str) -> tuple[int, list[int]] | None:
        """The latest step at which ranks of ``job`` disagreed and the ranks outside the majority."""
        with self._lock:
            return self._divergent.get(job)

    def _compare(self, job: str, step: int, by_rank: dict[int, int]) -> None:
        counts = collections.Counter(by_rank.values())
        # The most common value is taken as the replicas' state; on a tie, the
        # value of the lowest rank (rank 0 is the usual source of truth in DDP).
        top = max(counts.values())
        majority = next(by_rank[r] for r in sorted(by_rank) if counts[by_rank[r]] == top)
        outliers = sorted(r for r, v in by_rank.items() if v != majority)
        for rank in by_rank:
            self.state.set_gauge(TrainerKey(job, rank), "adamwatch_replica_divergence", {},
                                 1.0 if rank in outliers else 0.0)
        if not outliers:
            return
        with self._lock:
            self._divergent[job] = (step, outliers)
            if self._reported.get(job) == step:
                return
            self._reported[job] = step
        evidence = {"fingerprints": {str(r): v for r, v in sorted(by_rank.items())}, "divergent_ranks": outliers}
        log.warning("replica divergence in job %s at step %d: ranks %s differ from the majority (%s)",
                    job, step, outliers, evidence["fingerprints"])
        if self.audit is not None:
            self.audit.write("detection", job=job, rank=outliers[0], detector="replica_divergence", step=step,
                             evidence=evidence,
                             detail=f"ranks {outliers} hold different parameters or Adam state than the others")
