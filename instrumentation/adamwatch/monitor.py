"""``adamwatch.watch(optimizer)``: the one line a training script adds.

The Monitor attaches to the optimizer through torch's public step hooks:

| hook | what it does | host syncs |
| --- | --- | --- |
| pre-step | reduce gradients (norms, non-finite) and the loss on the device; with fused Adam, set ``found_inf`` so a non-finite step is skipped by the kernel | none |
| post-step | every N steps reduce Adam's state (effective LR, update size, ...); start the async copy of one small vector; apply pending remediation actions | none |
| background thread | wait for the copy, decode, send to the sidecar, receive commands | (its own) |

With a non-fused optimizer, ``guard="sync"`` skips non-finite steps at the cost
of one host sync per step (documented, opt-in); by default they are detected
and reported only.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import torch

from adamwatch import __version__, wire
from adamwatch.client import StreamClient, default_job_name
from adamwatch.distributed import StepCoordinator
from adamwatch.lr_control import LRRecovery
from adamwatch.optimizer_info import describe_optimizer, group_names, is_fused
from adamwatch.remediation import Action, ActionResult, Remediator, SchedulerStepHook, skip_next_scheduler_step
from adamwatch.step_stats import StepLayout, StepStats, decode_step
from adamwatch.transfer import SummaryTransfer
from adamwatch.unwrap import unwrap_optimizer

__all__ = ["watch", "Monitor", "MonitorConfig"]

log = logging.getLogger("adamwatch")

_GUARDS = ("auto", "off", "sync")


@dataclass
class MonitorConfig:
    """Everything ``watch`` accepts besides the objects it attaches to.

    Args:
        endpoint: sidecar endpoint; default ``$ADAMWATCH_ENDPOINT``. None and
            unset: nothing is streamed (actions and checkpoints still work).
        job: job label; default ``$ADAMWATCH_JOB`` or the script name.
        rank: default torch.distributed rank, else ``$RANK``, else 0.
        deep_stats_every: compute Adam-state statistics every N steps; 0 disables.
        sample_size: coordinates sampled per param group for the quantiles.
        guard: "auto" skips non-finite steps without a sync where the
            optimizer is fused and only reports elsewhere; "sync" also skips
            them for non-fused optimizers at one host sync per step; "off"
            only reports.
        samples_per_step, tokens_per_step: throughput, if known and constant.
        max_queued: summaries buffered while the sidecar is slow.
        batch_interval: seconds between sends to the sidecar. None (auto):
            every step as soon as it is summarised when steps take 40 ms or
            more, else every 50 ms (a wake-up per short step would cost the
            trainer more than its budget; 50 ms keeps detection fast in time).
        lr_floor: learning-rate cuts never go below this.
        lr_recovery_steps: after a cut, double the learning rate back (up to
            the schedule) after every this many healthy steps; None keeps cuts.
        command_interval: under torch.distributed, rank 0 broadcasts pending
            actions every this many steps: one asynchronous 4 KiB broadcast on a
            CPU/gloo channel, never waited on in the step path; actions apply on
            every rank one interval after their exchange point.
    """

    endpoint: str | None = None
    job: str | None = None
    rank: int | None = None
    world_size: int | None = None
    deep_stats_every: int = 10
    sample_size: int = 4096
    guard: str = "auto"
    samples_per_step: int | None = None
    tokens_per_step: int | None = None
    max_queued: int = 4096
    seed: int = 0
    batch_interval: float | None = None
    lr_floor: float = 0.0
    lr_recovery_steps: int | None = None
    command_interval: int = 1

    def validate(self) -> None:
        if self.guard not in _GUARDS:
            raise ValueError(f"guard must be one of {_GUARDS}, got {self.guard!r}")
        if not isinstance(self.deep_stats_every, int) or self.deep_stats_every < 0:
            raise ValueError(f"deep_stats_every must be an int >= 0, got {self.deep_stats_every!r}")
        if not isinstance(self.sample_size, int) or self.sample_size < 1:
            raise ValueError(f"sample_size must be an int >= 1, got {self.sample_size!r}")
        for name in ("samples_per_step", "tokens_per_step"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be an int >= 0 or None, got {value!r}")
        if self.lr_recovery_steps is not None and (not isinstance(self.lr_recovery_steps, int)
                                                   or self.lr_recovery_steps < 1):
            raise ValueError(f"lr_recovery_steps must be an int >= 1 or None, got {self.lr_recovery_steps!r}")
        if self.batch_interval is not None and (not isinstance(self.batch_interval, (int, float))
                                                or not 0 <= self.batch_interval <= 10):
            raise ValueError(f"batch_interval must be None or seconds in [0, 10], got {self.batch_interval!r}")
        if not isinstance(self.command_interval, int) or self.command_interval < 1:
            raise ValueError(f"command_interval must be an int >= 1, got {self.command_interval!r}")
        if self.endpoint is not None:
            wire.parse_endpoint(self.endpoint)


def _distributed_rank_world() -> tuple[int | None, int | None]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return None, None


class Monitor:
    """Watches one Adam/AdamW optimizer. Create it with :func:`watch`."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        scheduler: Any = None,
        checkpointer: Any = None,
        scaler: Any = None,
        config: MonitorConfig | None = None,
        on_stop: Callable[[], None] | None = None,
    ):
        config = config or MonitorConfig()
        config.validate()
        # Hooks go on the torch optimizer inside a framework's wrapper (Accelerate's
        # AcceleratedOptimizer, Lightning's LightningOptimizer); the scheduler stays
        # as given, since the wrapper's step() is what the loop calls (lr_control unwraps it).
        optimizer = unwrap_optimizer(optimizer)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.checkpointer = checkpointer
        self.config = config
        self._info = describe_optimizer(optimizer)  # also rejects non-Adam optimizers
        self._fused = is_fused(optimizer)
        self._group_names = group_names(optimizer)

        dist_rank, dist_world = _distributed_rank_world()
        self.job = config.job or default_job_name()
        self.rank = config.rank if config.rank is not None else (
            dist_rank if dist_rank is not None else int(os.environ.get("RANK", "0") or 0)
        )
        self.world_size = config.world_size or dist_world or int(os.environ.get("WORLD_SIZE", "1") or 1)
        self.session = uuid.uuid4().hex

        self.step = 0  # iterations seen (skipped ones included), 1-based after the first
        self._loss: torch.Tensor | float | None = None
        self._pending: tuple[torch.Tensor, StepLayout] | None = None
        self._found_inf_set = False
        self._last_end: float | None = None
        self._samples_next: int | None = None
        self._tokens_next: int | None = None
        self._steps_in_call = 0
        self.errors = 0
        self._error_logged = False
        self._closed = False
        self._actions: "queue.SimpleQueue[Any]" = queue.SimpleQueue()

        self._stats = StepStats(optimizer, sample_size=config.sample_size, seed=config.seed)
        self._transfer = SummaryTransfer(self._stats.device, self._stats.max_length, self._stats.dtype)

        self._scheduler_skip: SchedulerStepHook | None = None
        self._step_seconds: float | None = None
        self._setup_remediation(on_stop)

        endpoint = config.endpoint or os.environ.get(wire.ENDPOINT_ENV)
        self.endpoint = endpoint
        self._client: StreamClient | None = None
        if endpoint:
            self._client = StreamClient(
                endpoint,
                self._hello,
                on_command=self._on_command,
                poll=self._poll_summaries,
                max_queued=config.max_queued,
                batch_interval=self._batch_interval,
            )
        else:
            log.warning("adamwatch: no endpoint (set %s): step summaries are not streamed", wire.ENDPOINT_ENV)
            self._reader = threading.Thread(target=self._drain_without_client, name="adamwatch-reader", daemon=True)

        self._handles = [
            optimizer.register_step_pre_hook(self._pre_step),
            optimizer.register_step_post_hook(self._post_step),
        ]
        self._scaler = None
        self._scaler_step = None
        if scaler is not None:
            self._wrap_scaler(scaler)
        # After the client exists: the Checkpointer replays events from before
        # watch() (a restore at start-up) to a new listener at once.
        if hasattr(self.checkpointer, "add_listener"):
            self.checkpointer.add_listener(self._on_checkpoint_event)
        if self._client is not None:
            self._client.start()
        else:
            self._reader.start()

    # ------------------------------------------------------------------ user API
    def observe_loss(self, loss: torch.Tensor | float) -> None:
        """Record the loss of the current step. A tensor is fine: nothing waits for the device.

        With gradient accumulation, call it once per optimizer step (e.g. with
        the accumulated loss); the last value before ``optimizer.step()`` wins.
        """
        self._loss = loss.detach() if isinstance(loss, torch.Tensor) else loss

    def set_throughput(self, *, samples: int | None = None, tokens: int | None = None) -> None:
        """Samples/tokens processed by the current step, when they vary per step."""
        self._samples_next = samples
        self._tokens_next = tokens

    def reduce_lr(self, factor: float, *, reason: str | None = None) -> str:
        """Cut the learning rate by ``factor`` at the next step boundary, persistently.

        Returns:
            The action id (the outcome is logged and reported to the sidecar).
        """
        return self._queue_action("reduce_lr", {"factor": factor}, reason)

    def restore_checkpoint(self, step: int | None = None, *, reason: str | None = None) -> str:
        """Restore the newest known-good checkpoint (or ``step``) at the next step boundary."""
        return self._queue_action("restore_checkpoint", {"step": step}, reason)

    def request_stop(self, *, reason: str | None = None) -> str:
        """Ask the loop to stop cleanly at the next step boundary (see ``stop_requested``)."""
        return self._queue_action("stop", {}, reason)

    @property
    def dropped_total(self) -> int:
        """Summaries that never reached the sidecar (also reported to it, when it is there)."""
        return self._client.dropped_total if self._client else self._transfer.dropped

    @property
    def stop_requested(self) -> bool:
        """A "stop" action was applied: finish the step, save, and leave the loop."""
        return self._remediator.stop_requested

    @property
    def lr_scale(self) -> float:
        """Cumulative learning-rate factor applied by remediation (1.0 = untouched)."""
        return getattr(self._remediator, "lr_scale", 1.0)

    def close(self, timeout: float = 2.0) -> None:
        """Remove the hooks, flush pending summaries (up to ``timeout``) and say goodbye."""
        if self._closed:
            return
        self._closed = True
        for handle in self._handles:
            handle.remove()
        if hasattr(self.checkpointer, "remove_listener"):
            self.checkpointer.remove_listener(self._on_checkpoint_event)
        self._disarm_scheduler_skip()
        if self._scaler is not None and self._scaler_step is not None:
            try:
                del self._scaler.step  # back to the class's method
            except AttributeError:
                pass
        if self._coordinator is not None:
            for action in self._coordinator.close(timeout):
                # Broadcast but never reached a step boundary: say so to the sidecar.
                if self.rank == 0:
                    self._ack(ActionResult(action, "rejected", None, "the monitor closed before its step boundary"))
        self._transfer.wake()
        if self._client is not None:
            self._client.close(timeout, goodbye={"reason": "closed", "step": self.step})
        else:
            self._reader.join(timeout)

    def __enter__(self) -> "Monitor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ hooks
    def _report_error(self, where: str) -> None:
        self.errors += 1
        if not self._error_logged:
            self._error_logged = True
            log.exception("adamwatch: %s failed; training continues (further errors are counted, not logged)", where)

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._disarm_scheduler_skip()
        try:
            grad_scale = getattr(optimizer, "grad_scale", None)
            found_inf = getattr(optimizer, "found_inf", None)
            guard_fused = self._fused and self.config.guard != "off"
            guard_sync = self.config.guard == "sync" and not self._fused
            vector, bad, layout = self._stats.per_step(
                self._loss,
                grad_scale=grad_scale if isinstance(grad_scale, torch.Tensor) else None,
                found_inf=found_inf if isinstance(found_inf, torch.Tensor) else None,
                guard=guard_fused,
                need_flag=guard_sync,
            )
            if guard_fused:
                # The fused kernel leaves params, m, v and the step count alone
                # when found_inf is non-zero: a skip with no host sync.
                flag = bad.to(torch.float32).reshape(())
                if isinstance(found_inf, torch.Tensor):
                    flag = torch.maximum(found_inf.to(flag.device, torch.float32), flag)
                else:
                    self._found_inf_set = True
                optimizer.found_inf = flag
            elif guard_sync:
                # Opt-in, documented: one host sync per step buys the skip for
                # optimizers without a found_inf input. Dropping every grad
                # makes torch's Adam skip each param (no update, no state change).
                if bool(bad):
                    for group in optimizer.param_groups:
                        for p in group["params"]:
                            p.grad = None
                    layout.meta["skip_reason"] = "guard"
            self._pending = (vector, layout)
        except Exception:
            self._pending = None
            self._report_error("pre-step summary")

    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._found_inf_set:
            self._found_inf_set = False
            try:
                del optimizer.found_inf
            except AttributeError:
                pass
        self._steps_in_call += 1
        try:
            self._finish_step()
        except Exception:
            self._report_error("post-step summary")
        try:
            self._apply_actions()
        except Exception:
            self._report_error("remediation")

    def _finish_step(self, skip_reason: str | None = None) -> None:
        self.step += 1
        now = time.time()
        # Durations from the monotonic clock: a wall-clock jump must not make a
        # step look negative or an hour long.
        ended = time.monotonic()
        duration = None if self._last_end is None else ended - self._last_end
        self._last_end = ended
        if duration is not None:
            # Smoothed step time, for the client's batching (read racily by its
            # thread: a float assignment is atomic, and a stale value is fine).
            self._step_seconds = duration if self._step_seconds is None else 0.9 * self._step_seconds + 0.1 * duration
        pending, self._pending = self._pending, None
        self._loss = None
        if pending is None:
            return
        vector, layout = pending
        every = self.config.deep_stats_every
        if every and self.step % every == 0 and skip_reason is None:
            deep, present = self._stats.deep()
            vector = torch.cat([vector, deep])
            layout.deep_groups = present
        samples = self._samples_next if self._samples_next is not None else self.config.samples_per_step
        tokens = self._tokens_next if self._tokens_next is not None else self.config.tokens_per_step
        self._samples_next = self._tokens_next = None
        layout.meta.update(step=self.step, time=now, duration_s=duration, samples=samples, tokens=tokens)
        if skip_reason is not None:
            layout.meta["skip_reason"] = skip_reason
        if not self._transfer.submit(vector, layout) and self._client is not None:
            self._client.count_dropped(1)  # the reader fell behind: reported like any other drop

    # ------------------------------------------------------------------ GradScaler
    def _wrap_scaler(self, scaler: Any) -> None:
        """Report steps that GradScaler skips without calling optimizer.step().

        With a non-fused optimizer, an overflow makes GradScaler skip
        ``optimizer.step()`` entirely, so no optimizer hook fires. Wrapping this
        scaler's ``step`` (this instance only; undone by close) lets us report
        that step as skipped; the grads are already unscaled then.
        """
        original = scaler.step

        def step(optimizer: Any, *args: Any, **kwargs: Any) -> Any:
            before = self._steps_in_call
            result = original(optimizer, *args, **kwargs)
            if optimizer is self.optimizer and self._steps_in_call == before and not self._closed:
                try:
                    vector, _bad, layout = self._stats.per_step(self._loss)
                    self._pending = (vector, layout)
                    self._finish_step(skip_reason="grad_scaler")
                except Exception:
                    self._report_error("skipped-step summary")
            return result

        self._scaler = scaler
        self._scaler_step = step
        scaler.step = step

    # ------------------------------------------------------------------ background
    _FAST_STEP_SECONDS = 0.04
    _FAST_STEP_BATCH_SECONDS = 0.05

    def _batch_interval(self) -> float:
        if self.config.batch_interval is not None:
            return float(self.config.batch_interval)
        step = self._step_seconds
        if step is not None and step < self._FAST_STEP_SECONDS:
            return self._FAST_STEP_BATCH_SECONDS
        return 0.0

    def _hello(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "rank": int(self.rank),
            "world_size": int(self.world_size),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "session": self.session,
            "adamwatch_version": __version__,
            "torch_version": torch.__version__,
            "optimizer": self._info,
            "deep_stats_every": self.config.deep_stats_every,
        }

    def _summaries(self, timeout: float) -> list[dict[str, Any]]:
        payloads = []
        for values, layout in self._transfer.collect(timeout):
            payload = decode_step(values, layout)
            meta = layout.meta
            payload["step"] = meta["step"]
            payload["time"] = meta["time"]
            payload["duration_s"] = meta["duration_s"]
            if meta.get("samples") is not None:
                payload["samples"] = meta["samples"]
            if meta.get("tokens") is not None:
                payload["tokens"] = meta["tokens"]
            reason = meta.get("skip_reason")
            if reason is not None:
                payload["skipped"] = True
            elif payload["skipped"]:
                reason = "grad_scaler" if values[2] >= 2 else "guard"
            payload["skip_reason"] = reason if payload["skipped"] else None
            payloads.append(payload)
            self._note_health(payload)
        return payloads

    def _poll_summaries(self, timeout: float) -> list[bytes]:
        return [wire.encode_frame(wire.MessageType.STEP, p) for p in self._summaries(timeout)]

    def _drain_without_client(self) -> None:
        while not self._closed or not self._transfer.idle:
            try:
                self._summaries(0.1)
            except Exception:
                self._report_error("summary reader")

    def _note_health(self, payload: dict[str, Any]) -> None:
        healthy = not (payload.get("loss_nonfinite") or payload.get("grad_nonfinite") or payload.get("skipped"))
        try:
            self._remediator.note_step(payload["step"], healthy)
            if self.checkpointer is not None:
                self.checkpointer.note_step(payload["step"], healthy)
        except Exception:
            self._report_error("note_step")

    # ------------------------------------------------------------------ remediation
    def _setup_remediation(self, on_stop: Callable[[], None] | None) -> None:
        recovery = LRRecovery(after_steps=self.config.lr_recovery_steps) if self.config.lr_recovery_steps else None
        self._remediator = Remediator(
            self.optimizer, self.scheduler, self.checkpointer, lr_floor=self.config.lr_floor,
            lr_recovery=recovery, on_stop=on_stop,
        )
        coordinator = StepCoordinator(interval=self.config.command_interval, resolve=self._remediator.resolve)
        self._coordinator = coordinator if coordinator.active() else None

    def _queue_action(self, kind: str, args: dict[str, Any], reason: str | None, source: str = "local",
                      action_id: str | None = None) -> str:
        action = Action(kind, args, source=source, reason=reason)
        if action_id is not None:
            action.id = action_id
        self._actions.put(action)
        return action.id

    def _on_command(self, payload: dict[str, Any]) -> None:
        """A COMMAND from the sidecar (client thread): queue it for the next step boundary."""
        trigger = payload.get("step")
        if self.checkpointer is not None and isinstance(trigger, int):
            # The sidecar saw an incident at this step: checkpoints around it
            # must not be trusted as known-good.
            try:
                self.checkpointer.note_incident(trigger)
            except Exception:
                self._report_error("checkpointer.note_incident")
        self._queue_action(payload["action"], dict(payload.get("args") or {}), payload.get("reason"),
                           source="sidecar", action_id=payload["id"])

    def _on_checkpoint_event(self, event: Any) -> None:
        """A Checkpointer event (adamwatch.checkpoint.CheckpointEvent): forwarded as a CHECKPOINT frame."""
        if self._client is not None:
            self._client.send_control(wire.encode_frame(wire.MessageType.CHECKPOINT, event.as_payload()))

    def _arm_scheduler_skip(self) -> None:
        """Skip the abandoned iteration's ``scheduler.step()`` after a restore.

        A restore happens in the post-step hook, and the user's loop calls
        ``scheduler.step()`` next. The checkpoint already holds the scheduler
        as it was after that step's own ``scheduler.step()``, so stepping it
        again would run the schedule one step ahead. The skip stays armed only
        until the next optimizer step, so a scheduler stepped per epoch is not
        affected (unless the restore lands on an epoch's last iteration: that
        epoch's step is then skipped, which matches the restored state too).
        """
        if self.scheduler is not None and not self._scheduler_skip_armed:
            self._scheduler_skip = skip_next_scheduler_step(self.scheduler)

    @property
    def _scheduler_skip_armed(self) -> bool:
        return self._scheduler_skip is not None and self._scheduler_skip.active

    def _disarm_scheduler_skip(self) -> None:
        if self._scheduler_skip is not None:
            self._scheduler_skip.remove()
            self._scheduler_skip = None

    def _ack(self, result: Any) -> None:
        """Report an outcome to the sidecar: its commands, and actions taken in process too
        (so its audit log and ``adamwatch_learning_rate_scale`` see every change)."""
        if self._client is None or result.action.source == "broadcast":
            return
        ack = result.to_ack()
        ack["lr_scale"] = float(self._remediator.lr_scale)
        self._client.send_control(wire.encode_frame(wire.MessageType.ACK, ack))

    def _apply_actions(self) -> None:
        """Apply pending actions in the post-step hook: between two steps, never inside one.

        Under torch.distributed rank 0 decides: its actions are broadcast and
        every rank applies the same list at the same step, or replicas diverge.
        """
        local = []
        while not self._actions.empty():  # the usual step has none: no exception raised per step
            local.append(self._actions.get_nowait())
        local.extend(self._remediator.pending_actions())
        if self._coordinator is None:
            if not local:
                return
            actions = [self._remediator.resolve(a) for a in local]
        else:
            if self.rank != 0:
                for action in local:
                    if action.source == "sidecar":
                        self._ack(ActionResult(action, "rejected", None,
                                               "under torch.distributed only rank 0 takes commands"))
            actions = self._coordinator.exchange(self.step, local)
            if self.rank != 0:
                # Acks for broadcast commands come from rank 0, which received them.
                for action in actions:
                    action.source = "broadcast" if action.source == "sidecar" else action.source
        for action in actions:
            result = self._remediator.apply(action, self.step)
            if result.outcome == "applied" and action.kind == "restore_checkpoint":
                self.step = int(result.data.get("restored_step", self.step))
                self._last_end = None  # the next step's duration would span the restore
                self._arm_scheduler_skip()
            self._ack(result)


def watch(
    optimizer: torch.optim.Optimizer,
    *,
    scheduler: Any = None,
    endpoint: str | None = None,
    job: str | None = None,
    rank: int | None = None,
    checkpointer: Any = None,
    scaler: Any = None,
    deep_stats_every: int = 10,
    samples_per_step: int | None = None,
    tokens_per_step: int | None = None,
    guard: str = "auto",
    on_stop: Callable[[], None] | None = None,
    **options: Any,
) -> Monitor:
    """Watch every step of a torch Adam/AdamW optimizer.

    Args:
        optimizer: torch.optim.Adam or AdamW, any implementation (for-loop, foreach, fused).
        scheduler: its LR scheduler, so learning-rate cuts persist.
        endpoint: ``unix:///path`` or ``tcp://127.0.0.1:PORT``; default ``$ADAMWATCH_ENDPOINT``.
        job, rank: labels; defaults from the environment / torch.distributed.
        checkpointer: an :class:`adamwatch.Checkpointer` for known-good tracking and restores.
        scaler: the GradScaler, if any, so steps it skips are reported.
        deep_stats_every: Adam-state statistics every N steps (0 disables).
        samples_per_step, tokens_per_step: for throughput metrics.
        guard: "auto" (skip non-finite steps where free), "sync" or "off".
        on_stop: called when a "stop" action is applied (``monitor.stop_requested`` turns True too).
        **options: further MonitorConfig fields (sample_size, max_queued, world_size, seed,
            lr_floor, lr_recovery_steps, command_interval).

    Returns:
        The Monitor; use it as a context manager or call ``close()``.
    """
    config = MonitorConfig(
        endpoint=endpoint,
        job=job,
        rank=rank,
        deep_stats_every=deep_stats_every,
        samples_per_step=samples_per_step,
        tokens_per_step=tokens_per_step,
        guard=guard,
        **options,
    )
    return Monitor(optimizer, scheduler=scheduler, checkpointer=checkpointer, scaler=scaler, config=config,
                   on_stop=on_stop)
