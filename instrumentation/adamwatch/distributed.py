"""Make every rank apply the same remediation at the same step.

Only rank 0 talks to its sidecar, and user code may issue actions on any rank,
so at each step boundary rank 0's actions are broadcast and every rank applies
exactly that list. Without it, one replica would cut its LR or restore a
checkpoint alone and the replicas would diverge.

    coordinator = StepCoordinator()          # the default process group
    actions = coordinator.exchange(step, local_actions)
    for action in actions:
        remediator.apply(action, step)

Cost while a process group is initialised: one broadcast of one int64 per
exchange, plus one broadcast of the JSON payload on the rare steps that carry
actions. The collective is blocking (on gloo the CPU waits for every rank; on
NCCL reading the flag is one device-to-host sync). ``interval=N`` exchanges only
on steps that are multiples of N: an action then waits for the next multiple,
and still takes effect at the same step on every rank. When torch.distributed
is not initialised, :meth:`StepCoordinator.exchange` returns the local actions
unchanged and costs nothing.

A hung rank makes the broadcast wait for the process group's timeout (the
``timeout=`` of ``init_process_group``), after which torch raises on every
rank that is still alive.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from .remediation import Action

__all__ = ["StepCoordinator"]

log = logging.getLogger(__name__)


class StepCoordinator:
    """Broadcast rank 0's actions so that all ranks apply the same list at the same step.

    Args:
        process_group: the group to coordinate (None: the default group).
        interval: exchange only when ``step % interval == 0`` (>= 1).
        resolve: called on rank 0 for each action before it is broadcast,
            e.g. :meth:`adamwatch.remediation.Remediator.resolve` to pin a
            restore to one concrete checkpoint step for all ranks.
    """

    def __init__(
        self,
        process_group: Any = None,
        *,
        interval: int = 1,
        resolve: Callable[[Action], Action] | None = None,
    ):
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"interval: must be an int >= 1, got {interval!r}")
        self.process_group = process_group
        self.interval = interval
        self.resolve = resolve
        self._pending: list[Action] = []
        #: local actions issued on ranks other than 0, which are not applied
        self.dropped = 0
        #: collectives issued so far (for cost accounting)
        self.exchanges = 0

    def active(self) -> bool:
        """Whether a process group is initialised (else exchange is a no-op).

        Returns:
            True under torch.distributed.
        """
        return dist.is_available() and dist.is_initialized()

    def _device(self) -> torch.device:
        backend = dist.get_backend(self.process_group)
        if "nccl" in str(backend).lower() and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _src(self) -> int:
        if self.process_group is None:
            return 0
        return dist.get_global_rank(self.process_group, 0)

    def _resolved(self, action: Action) -> Action:
        if self.resolve is None:
            return action
        try:
            return self.resolve(action)
        except Exception:  # noqa: BLE001 - broadcast it unresolved; applying it reports the error
            log.exception("adamwatch: resolving %s failed", action.kind)
            return action

    def exchange(self, step: int, local_actions: list[Action]) -> list[Action]:
        """Return the actions every rank applies at this step boundary.

        Must be called on every rank at every step boundary, with the same
        ``step`` (it is a collective when initialised).

        Args:
            step: the current step.
            local_actions: actions issued on this rank since the last call.

        Returns:
            Rank 0's actions (identical on every rank), or ``local_actions``
            when torch.distributed is not initialised.
        """
        if not self.active():
            return list(local_actions)
        rank = dist.get_rank(self.process_group)
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
        payload = b""
        if rank == 0 and self._pending:
            actions, self._pending = self._pending, []
            payload = json.dumps([self._resolved(a).to_dict() for a in actions]).encode()
        device = self._device()
        length = torch.tensor([len(payload)], dtype=torch.int64, device=device)
        self.exchanges += 1
        dist.broadcast(length, src=self._src(), group=self.process_group)
        n = int(length.item())
        if n == 0:
            return []
        if rank == 0:
            buffer = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device)
        else:
            buffer = torch.empty(n, dtype=torch.uint8, device=device)
        dist.broadcast(buffer, src=self._src(), group=self.process_group)
        return [Action.from_dict(d) for d in json.loads(bytes(buffer.cpu().tolist()).decode())]
