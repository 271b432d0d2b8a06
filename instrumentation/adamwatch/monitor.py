"""``adamwatch.watch(optimizer)``: the one line a training script adds.

The Monitor attaches to the optimizer through torch's public step hooks:

| hook | what it does | host syncs |
| --- | --- | --- |
| pre-step | reduce gradients (norms, non-finite) and the loss on the device; with fused Adam, set ``found_inf`` so a non-finite step is skipped by the kernel | none |
| post-step | every N steps reduce Adam's state (effective LR, update size, ...); start the async copy of one small vector; apply pending remediation actions | none |
| deep-statistics thread (CPU only) | the Adam-state reduction of the post-step row, overlapping the next forward and backward; the next pre-step waits for it | none |
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
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import torch

from adamwatch import __version__, grad_clip, wire
from adamwatch.background import BackgroundJob
from adamwatch.client import StreamClient, default_job_name
from adamwatch.distributed import StepCoordinator
from adamwatch.evaluation import EvalRecorder, validate_eval_metrics
from adamwatch.exits import ExitReporter, classify_exception
from adamwatch.footprint import footprint_payload
from adamwatch.fingerprint import fingerprint
from adamwatch.folded_vector import FoldedStepVector, append_block
from adamwatch.loss_window import LossWindow
from adamwatch.lr_control import LRRecovery
from adamwatch.optimizer_config import GroupsSnapshot, capture_config, config_hash, diff_configs, group_signature
from adamwatch.optimizer_info import describe_optimizer, group_names, is_fused
from adamwatch.remediation import Action, ActionResult, Remediator, SchedulerStepHook, skip_next_scheduler_step
from adamwatch.shards import params_are_sharded
from adamwatch.mixed_precision import GradScalerStats
from adamwatch.not_traced import not_traced
from adamwatch.spike_guard import SpikeGuard, SpikeGuardConfig
from adamwatch.step_extensions import StepContext, StepExtension
from adamwatch.step_stats import (SKIP_INDEX, GradNorms, StepLayout, StepStats, decode_step, plain_step,
                                  skip_reason)
from adamwatch.transfer import SummaryTransfer
from adamwatch.unwrap import unwrap_optimizer

__all__ = ["watch", "Monitor", "MonitorConfig"]

log = logging.getLogger("adamwatch")

_GUARDS = ("auto", "off", "sync")


# Environment switch for MonitorConfig.step_encoding ("packed" or "json").
STEP_ENCODING_ENV = "ADAMWATCH_STEP_ENCODING"


@dataclass
class MonitorConfig:
    """Everything ``watch`` accepts besides the objects it attaches to.

    Args:
        endpoint: sidecar endpoint; default ``$ADAMWATCH_ENDPOINT``. None and
            unset: nothing is streamed (actions and checkpoints still work).
        job: job label; default ``$ADAMWATCH_JOB`` or the script name.
        rank: default torch.distributed rank, else ``$RANK``, else 0.
        deep_stats_every: compute Adam-state statistics every N steps; 0 disables.
        sample_size: coordinates sampled per param group for the quantiles (up to
            4 groups; more groups share 4 x sample_size equally).
        guard: "auto" skips non-finite steps without a sync where the
            optimizer is fused and only reports elsewhere; "sync" also skips
            them for non-fused optimizers at one host sync per step; "off"
            only reports.
        samples_per_step, tokens_per_step: throughput, if known and constant.
        max_queued: summaries buffered while the sidecar is slow.
        batch_interval: the shortest time between two sends to the sidecar.
            None (auto): 100 ms. A summary that finds the client idle for that
            long goes out at once; the steps finished within 100 ms of a send
            go out together in the next one. Slow steps are thus streamed with
            no delay, fast ones batched: a wake-up of the client thread is a
            few system calls (0.07-0.15 ms of CPU each on a 2-core VM), and
            encoding a summary about 0.01 ms. 0 sends every step as soon as it
            is summarised.
        lr_floor: learning-rate cuts never go below this.
        lr_recovery_steps: after a cut, double the learning rate back (up to
            the schedule) after every this many healthy steps; None keeps cuts.
        command_interval: under torch.distributed, rank 0 broadcasts pending
            actions every this many steps: one asynchronous 4 KiB broadcast on a
            CPU/gloo channel, never waited on in the step path; actions apply on
            every rank one interval after their exchange point.
        policy_wait: seconds ``watch()`` waits for the sidecar's verdict on the
            optimizer configuration before returning (so a policy that says
            "stop" stops the run before its first step). Only when the first
            connection succeeded: with no sidecar it never waits. 0 disables.
        check_config_every: compare the optimizer's hyperparameters and param
            groups with the announced configuration every this many steps (a
            few dict reads, no device access); 0 disables.
        cross_rank: under torch.distributed with more than one rank, "auto"
            (default) registers :class:`adamwatch.cross_rank.CrossRankReduction`
            as the first step extension: global norms under FSDP1/FSDP2, one
            non-finite decision for all ranks, the rank where a NaN began (one
            asynchronous all-reduce per step on a group of its own). "on": also
            with a single rank (exercises the path). "off" keeps every number rank-local.
        local_grads: from :func:`adamwatch.comm_watch.watch_local_grads`, so the
            gradient origin is this rank's gradients before the ranks' reduction.
        fingerprint_every: every this many steps, a fingerprint of the
            parameters and Adam state (adamwatch.fingerprint) is sent, so the
            sidecar and the AdamwatchReplicaDivergence alert can compare
            data-parallel replicas; 0 disables.
        step_encoding: how STEP summaries travel: "packed" (the compact binary
            STEP_PACKED, default) or "json" (for a sidecar older than
            STEP_PACKED); None: ``$ADAMWATCH_STEP_ENCODING``, else "packed".
        deep_stats_thread: when the parameters are on the CPU, compute the
            Adam-state block and the replica fingerprint on a helper thread
            (adamwatch.background) while the next forward and backward run;
            the next optimizer step waits for them, since they read the state
            that step updates. Free when torch leaves a core idle (fewer
            intra-op threads than cores), the same CPU otherwise. False: in
            the post-step hook. Never used on a GPU (its kernels are
            asynchronous already), with cross-rank reductions (collectives
            stay on the training thread) or for sharded (FSDP) parameters.
            The values are the same.
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
    policy_wait: float = 1.0
    check_config_every: int = 1
    # issue 11: evaluation, convergence, run ends, footprint
    target: dict[str, float] | None = None
    model_family: str | None = None
    footprint_interval: float = 30.0
    report_exits: bool = True
    cross_rank: str = "auto"
    local_grads: Any = None
    fingerprint_every: int = 100
    # On-device spike guard (adamwatch.spike_guard): None/False (off), "clip", "skip",
    # a dict of SpikeGuardConfig fields or a SpikeGuardConfig.
    spike_guard: Any = None
    step_encoding: str | None = None
    deep_stats_thread: bool = True

    def resolved_step_encoding(self) -> str:
        """The STEP encoding in force: the field, else $ADAMWATCH_STEP_ENCODING, else "packed"."""
        return self.step_encoding or os.environ.get(STEP_ENCODING_ENV) or "packed"

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
        if not isinstance(self.deep_stats_thread, bool):
            raise ValueError(f"deep_stats_thread must be True or False, got {self.deep_stats_thread!r}")
        if self.cross_rank not in ("auto", "on", "off"):
            raise ValueError(f"cross_rank must be 'auto', 'on' or 'off', got {self.cross_rank!r}")
        if self.local_grads is not None and not callable(getattr(self.local_grads, "take", None)):
            raise TypeError(f"local_grads must come from adamwatch.comm_watch.watch_local_grads, "
                            f"got {type(self.local_grads).__name__}")
        if not isinstance(self.command_interval, int) or self.command_interval < 1:
            raise ValueError(f"command_interval must be an int >= 1, got {self.command_interval!r}")
        if isinstance(self.policy_wait, bool) or not isinstance(self.policy_wait, (int, float)) \
                or not 0 <= self.policy_wait <= 60:
            raise ValueError(f"policy_wait must be seconds in [0, 60], got {self.policy_wait!r}")
        if not isinstance(self.check_config_every, int) or isinstance(self.check_config_every, bool) \
                or self.check_config_every < 0:
            raise ValueError(f"check_config_every must be an int >= 0, got {self.check_config_every!r}")
        if not isinstance(self.fingerprint_every, int) or isinstance(self.fingerprint_every, bool) \
                or self.fingerprint_every < 0:
            raise ValueError(f"fingerprint_every must be an int >= 0, got {self.fingerprint_every!r}")
        if self.endpoint is not None:
            wire.parse_endpoint(self.endpoint)
        if self.target is not None:
            if not isinstance(self.target, dict) or not self.target:
                raise ValueError(f"target must be a non-empty dict like {{'eval_loss': 1.6}}, got {self.target!r}")
            for name, value in self.target.items():
                if not isinstance(name, str) or isinstance(value, bool) or not isinstance(value, (int, float)) \
                        or value != value:
                    raise ValueError(f"target[{name!r}] must be a number, got {value!r}")
        if self.model_family is not None and (not isinstance(self.model_family, str)
                                              or not 0 < len(self.model_family) <= 64):
            raise ValueError(f"model_family must be a string of 1..64 characters, got {self.model_family!r}")
        if not isinstance(self.footprint_interval, (int, float)) or not self.footprint_interval > 0:
            raise ValueError(f"footprint_interval must be seconds > 0, got {self.footprint_interval!r}")
        SpikeGuardConfig.coerce(self.spike_guard)  # raises naming the bad spike_guard field
        if self.resolved_step_encoding() not in wire.STEP_ENCODINGS:
            raise ValueError(f"step_encoding (or ${STEP_ENCODING_ENV}) must be one of {wire.STEP_ENCODINGS}, "
                             f"got {self.resolved_step_encoding()!r}")


def _distributed_rank_world() -> tuple[int | None, int | None]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return None, None


class Monitor:
    """Watches one torch optimizer (built for Adam/AdamW). Create it with :func:`watch`."""

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
        self._step_encoding = config.resolved_step_encoding()  # fixed for the session: HELLO announces it
        self._info = describe_optimizer(optimizer)  # also rejects what is not a torch optimizer
        self._fused = is_fused(optimizer)
        self._group_names = group_names(optimizer)
        # The configuration as announced (HELLO, then CONFIG after each change seen).
        self._opt_config = capture_config(optimizer, scheduler, scaler)
        self._opt_config_hash = config_hash(self._opt_config)
        self._opt_signature = group_signature(optimizer)
        self._groups_snapshot = GroupsSnapshot(optimizer)  # the every-step check's fast answer
        self.config_changes = 0
        self.policy_verdict: dict[str, Any] | None = None
        self._verdict_event = threading.Event()
        self._spike_guard_config = SpikeGuardConfig.coerce(config.spike_guard)
        if (self._spike_guard_config is not None and self._spike_guard_config.mode == "skip"
                and not self._fused and config.guard != "sync"):
            # A skip request is enforced for free only through found_inf; otherwise
            # the guard's verdicts would be reported while every step is applied.
            raise ValueError("spike_guard mode 'skip' needs a fused optimizer (fused=True), or guard='sync' "
                             "for the documented one host sync per step; got a non-fused optimizer with "
                             f"guard={config.guard!r}")

        dist_rank, dist_world = _distributed_rank_world()
        self.job = config.job or default_job_name()
        self.rank = config.rank if config.rank is not None else (
            dist_rank if dist_rank is not None else int(os.environ.get("RANK", "0") or 0)
        )
        self.world_size = config.world_size or dist_world or int(os.environ.get("WORLD_SIZE", "1") or 1)
        self.session = uuid.uuid4().hex

        self.step = 0  # iterations seen (skipped ones included), 1-based after the first
        self._loss_window = LossWindow()
        self._extensions: list[StepExtension] = []
        # summarize_step(): the step is summarised (True) until its post-step hook;
        # once an adapter drives the moment, the pre-step hook leaves it to it.
        self._summarized = False
        self._extensions_ran = False  # this step's extensions (and cross-rank collectives) were entered
        self._explicit = False
        self._guard_flag: torch.Tensor | None = None
        # Clipping seen this step (adamwatch.grad_clip): the pre-clip norm pass,
        # and (max_norm, coefficient tensor).
        self._clip_params_key: tuple[int, ...] | None = None  # the parameter list last checked for a shared pass
        self._clip_owners: list[int] = []  # and the param group of each of its parameters
        self._clip_dtype = torch.float32
        self._clip_norms: GradNorms | None = None
        # coefficient None: the clip used our own total norm (shared pass), so the
        # coefficient follows from the reported pre-clip norm on the host (no device op)
        self._clip: tuple[float, torch.Tensor | None] | None = None
        self._clip_total: torch.Tensor | None = None
        self._params_sharded = params_are_sharded(p for g in optimizer.param_groups for p in g["params"])
        self._clip_tap = _ClipTap(self)
        self.errors_by_where: dict[str, int] = {}
        self._pending: tuple[torch.Tensor | FoldedStepVector, StepLayout] | None = None
        self._found_inf_set = False
        self._last_end: float | None = None
        self._samples_next: int | None = None
        self._tokens_next: int | None = None
        self._steps_in_call = 0
        self.errors = 0
        self._errors_lock = threading.Lock()  # the training thread and the reader thread both report
        self._errors_sent = 0  # self.errors when the sidecar was last told
        self._closed = False
        self._actions: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self.commands_refused = 0  # sidecar commands refused because too many were pending
        self._evals = EvalRecorder()
        self._next_footprint = 0.0  # monotonic time of the next FOOTPRINT (background thread)
        self._exit: dict[str, Any] = {"exit_reason": "clean"}
        self._exit_reporter: ExitReporter | None = None
        self._goodbye_sent = False
        self._deferred: list[Action] = []  # restores queued before a step: applied after it

        self._stats = StepStats(optimizer, sample_size=config.sample_size, seed=config.seed, fold_on_reader=True)
        self._transfer = SummaryTransfer(self._stats.device, self._stats.max_length, self._stats.dtype)

        self._scheduler_skip: SchedulerStepHook | None = None
        self._setup_remediation(on_stop)
        self._cross_rank = self._setup_cross_rank()
        self._deep_job: BackgroundJob | None = None
        # Not for sharded parameters: FSDP1 points its flat parameters at the unsharded
        # storage during forward and backward, so a helper reading them then would
        # describe the whole tensor instead of this rank's shard.
        if (config.deep_stats_thread and (config.deep_stats_every or config.fingerprint_every)
                and self._stats.device.type == "cpu" and self._cross_rank is None and not self._params_sharded):
            self._deep_job = BackgroundJob("adamwatch-deep-stats", self._report_error)

        endpoint = config.endpoint or os.environ.get(wire.ENDPOINT_ENV)
        self.endpoint = endpoint
        self._client: StreamClient | None = None
        if endpoint:
            self._client = StreamClient(
                endpoint,
                self._hello,
                on_command=self._on_command,
                poll=self._poll_summaries,
                next_due=self._next_side_frame_due,
                max_queued=config.max_queued,
                batch_interval=self._batch_interval,
                on_error=self._report_error,
            )
            # Each submitted summary wakes the client thread; between steps it sleeps.
            self._transfer.on_submit = self._client.wake
            self._transfer.on_backlog = self._client.hurry
        else:
            log.warning("adamwatch: no endpoint (set %s): step summaries are not streamed", wire.ENDPOINT_ENV)
            self._reader = threading.Thread(target=self._drain_without_client, name="adamwatch-reader", daemon=True)

        self._handles = [
            optimizer.register_step_pre_hook(self._pre_step),
            optimizer.register_step_post_hook(self._post_step),
        ]
        grad_clip.attach(self._clip_tap)
        self._scaler = None
        self._scaler_step = None
        if scaler is not None:
            self._wrap_scaler(scaler)
        # After the client exists: the Checkpointer replays events from before
        # watch() (a restore at start-up) to a new listener at once.
        if hasattr(self.checkpointer, "add_listener"):
            self.checkpointer.add_listener(self._on_checkpoint_event)
        self._add_guard_extensions(scaler)
        if self._client is not None:
            self._client.start()
            self._await_policy_verdict()
        else:
            self._reader.start()
        self._agree_on_policy_stop()
        if config.report_exits:
            self._exit_reporter = ExitReporter(self._report_exit)
            self._exit_reporter.install()

    def _add_guard_extensions(self, scaler: Any) -> None:
        """The spike guard and the GradScaler statistics, registered last: after any
        cross-rank extension, so the guard judges global values."""
        guard = self._spike_guard_config
        self.spike_guard: SpikeGuard | None = None
        if guard is not None:
            # The user's clip_grad_norm_ of this step (adamwatch.grad_clip), if any.
            self.spike_guard = SpikeGuard(guard, clip_coefficient=self._user_clip_coefficient)
            self.add_step_extension(self.spike_guard)
        if scaler is not None:
            self.add_step_extension(GradScalerStats(scaler, every=self.config.deep_stats_every,
                                                    sample_size=self.config.sample_size, seed=self.config.seed))

    # ------------------------------------------------------------------ user API
    @not_traced
    def observe_loss(self, loss: torch.Tensor | float, *, scaled_by: float = 1) -> None:
        """Record a loss of the current step. A tensor is fine: nothing waits for the device.

        With gradient accumulation call it on every micro-batch: the step's
        exported loss is the mean over the micro-batches observed since the
        previous step was summarised (summed on the device, no sync).

        Args:
            loss: the micro-batch's loss (tensor or number).
            scaled_by: pass ``accum_steps`` when ``loss`` is the scaled value you
                backpropagate (``loss / accum_steps``): it is multiplied back.
        """
        self._loss_window.add(loss, scaled_by)

    @not_traced
    def summarize_step(self) -> None:
        """Summarise the current step now: its gradients (pre-clip, unscaled) and its loss.

        Computes the per-step vector on the device (no sync), runs the step
        extensions and sets the fused guard's ``found_inf``. Call it once the
        step's backward is done and before the update: adapters for stacks that
        run backward inside ``optimizer.step(closure)`` call it from their
        "before optimizer step" callback. The optimizer's pre-step hook then does
        not summarise that step again; once called, the Monitor leaves the moment
        to its caller for every later step too (a step it was not called for is
        summarised after the update, counted in ``errors_by_where["summary_missed"]``).
        """
        if self._closed:
            return
        self._explicit = True
        self._disarm_scheduler_skip()
        if self._coordinator is None and not self._actions.empty():
            self._apply_early()
        self._summarize(self.optimizer)

    def add_step_extension(self, extension: StepExtension) -> None:
        """Take part in summarising every step (see adamwatch.step_extensions).

        Extensions run in registration order at the summary moment, after the
        local norms and before the global norm, the guard's decision and the
        copy to the host.

        Raises:
            TypeError: when ``extension`` has no callable ``on_summary``.
        """
        if not callable(getattr(extension, "on_summary", None)):
            raise TypeError(f"add_step_extension: {type(extension).__qualname__} has no on_summary(ctx) method")
        self._extensions.append(extension)

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
    def optimizer_config(self) -> dict[str, Any]:
        """The optimizer's configuration as last announced to the sidecar (see adamwatch.optimizer_config)."""
        return self._opt_config

    @property
    def config_hash(self) -> str:
        """Fingerprint of :attr:`optimizer_config` (the ``config_hash`` label of ``adamwatch_optimizer_info``)."""
        return self._opt_config_hash

    def features(self) -> dict[str, bool]:
        """What an optimizer policy can require: a checkpointer, the non-finite guard, deep statistics."""
        guard = (self._fused and self.config.guard != "off") or (self.config.guard == "sync")
        return {"checkpointer": self.checkpointer is not None, "guard": bool(guard),
                "deep_stats": self.config.deep_stats_every > 0}

    @property
    def dropped_total(self) -> int:
        """Summaries that never reached the sidecar (also reported to it, when it is there)."""
        return self._client.dropped_total if self._client else self._transfer.dropped

    @property
    def dropped_evaluations(self) -> int:
        """Evaluations that never reached the sidecar (queue full, or the sidecar was lost)."""
        return self._evals.dropped

    @property
    def stop_requested(self) -> bool:
        """A "stop" action was applied: finish the step, save, and leave the loop."""
        return self._remediator.stop_requested

    @property
    def lr_scale(self) -> float:
        """Cumulative learning-rate factor applied by remediation (1.0 = untouched)."""
        return getattr(self._remediator, "lr_scale", 1.0)

    def observe_eval(self, step: int | None = None, **metrics: torch.Tensor | float) -> None:
        """Record evaluation results (validation loss, scores) for a step; nothing waits for the device.

        Args:
            step: the optimizer step they belong to; default the latest step.
            **metrics: name -> number or scalar tensor, e.g. ``loss=val_loss, accuracy=acc``.
                The validation loss is the one named ``loss``; targets name it ``eval_loss``.

        Raises:
            ValueError, TypeError: a bad name or value (named in the message).
        """
        validate_eval_metrics(metrics)
        self._evals.observe(self.step if step is None else int(step), metrics, time.time())
        if self._client is not None:
            self._client.wake()

    def close(self, timeout: float = 2.0, *, exit_reason: str = "clean", exception: str | None = None,
              signal: str | None = None) -> None:
        """Remove the hooks, flush pending summaries (up to ``timeout``) and say goodbye.

        Args:
            timeout: seconds to flush.
            exit_reason: how the run ended, one of ``wire.EXIT_REASONS`` (the
                ``with`` block and the exit hooks set it; a script rarely needs to).
            exception, signal: the exception type name or signal name, if any.
        """
        if self._closed:
            return
        if exit_reason not in wire.EXIT_REASONS or exit_reason == "vanished":
            raise ValueError(f"exit_reason must be one of {wire.EXIT_REASONS[:-1]}, got {exit_reason!r}")
        self._exit = {"exit_reason": exit_reason, "exception": exception, "signal": signal}
        if self._exit_reporter is not None:
            self._exit_reporter.disarm()
            self._exit_reporter.uninstall()
        self._closed = True
        for handle in self._handles:
            handle.remove()
        grad_clip.detach(self._clip_tap)
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
        # Commands that never reached a step boundary: answered, not lost.
        for action in self._deferred + self._take_actions(1 << 30):
            if action.source == "sidecar":
                self._ack(ActionResult(action, "rejected", None, "the monitor closed before its step boundary"))
        self._deferred = []
        if self._deep_job is not None:
            self._deep_job.close()  # its summary goes out with the others
        self._transfer.wake()
        if self._client is not None:
            if self._goodbye_sent:
                self._client.close(timeout)  # a signal's goodbye went out already
            else:
                self._say_goodbye(timeout)
        else:
            self._reader.join(timeout)
        self._release_process_groups()

    def _release_process_groups(self) -> None:
        """Drop every reference the monitor holds to torch.distributed process groups.

        The Monitor sits in reference cycles (its client calls back into it), so
        it may be freed only by the garbage collector, possibly during
        interpreter shutdown. A gloo process group freed then (after the script's
        ``destroy_process_group()``) aborts the process ("terminate called
        without an active exception"); without references from here, the groups
        go when the script destroys them, while Python is fully alive.
        """
        self._transfer.on_submit = None
        self._transfer.on_backlog = None
        if self._cross_rank is not None:
            self._cross_rank.group = None
        if self._coordinator is not None:
            self._coordinator.release()
        for extension in self._extensions:
            if hasattr(extension, "process_group"):
                extension.process_group = None

    def __enter__(self) -> "Monitor":
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        reason, name = classify_exception(exc)
        self.close(exit_reason=reason, exception=name)

    _SIGNAL_GOODBYE_SECONDS = 2.0

    def _report_exit(self, exit_reason: str, *, exception: str | None = None, signal: str | None = None) -> None:
        """From the exit hooks (uncaught exception, fatal signal): say goodbye with the reason."""
        if self._closed or exit_reason not in wire.EXIT_REASONS:
            return
        if signal is None:
            # sys.excepthook: the training thread's stack is unwound, closing is safe.
            self.close(exit_reason=exit_reason, exception=exception)
            return
        # A signal handler interrupts the training thread anywhere: inside a
        # hook, or holding the client's lock. Only say goodbye, from another
        # thread and for a bounded time; the hooks stay until close(), so a
        # script whose own handler lets it finish the step keeps working.
        self._exit = {"exit_reason": exit_reason, "exception": exception, "signal": signal}
        if self._client is None:
            return
        farewell = threading.Thread(target=self._say_goodbye, name="adamwatch-goodbye", daemon=True)
        farewell.start()
        farewell.join(self._SIGNAL_GOODBYE_SECONDS + 0.5)

    def _say_goodbye(self, timeout: float = _SIGNAL_GOODBYE_SECONDS) -> None:
        if self._client is not None and not self._goodbye_sent:
            if self._deep_job is not None:
                # A signal's goodbye (another thread): the deep step on the helper goes out first.
                self._deep_job.settle(timeout / 4)
            self._goodbye_sent = True
            self._client.close(timeout, goodbye={"reason": "closed", "step": self.step,
                                                 **{k: v for k, v in self._exit.items() if v is not None}})

    # ------------------------------------------------------------------ hooks
    def _report_error(self, where: str) -> None:
        """Count a failure inside the monitor (any thread), log the first of each kind.

        The counts reach the sidecar (MONITOR_ERRORS, ``adamwatch_monitor_errors_total{where}``):
        a monitor that cannot compute or send a number is never silent.
        """
        with self._errors_lock:
            self.errors += 1
            first = where not in self.errors_by_where
            self.errors_by_where[where] = self.errors_by_where.get(where, 0) + 1
        if first:
            # With a traceback when a failure is being handled; a refusal counted
            # outside an except block (a full queue) has none to show.
            log.error("adamwatch: %s failed; training continues (further %s errors are counted, not logged)",
                      where, where, exc_info=sys.exc_info()[0] is not None)
        client = getattr(self, "_client", None)
        if client is not None:
            client.wake()  # the counts go out in the thread's next turn

    def _errors_frame(self) -> bytes | None:
        """A MONITOR_ERRORS frame when the counts changed since the last one."""
        if self.errors == self._errors_sent:
            return None
        with self._errors_lock:
            self._errors_sent = self.errors
            counts = dict(self.errors_by_where)
        return wire.encode_frame(wire.MessageType.MONITOR_ERRORS, {"errors": counts})

    @not_traced
    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._deep_job is not None:
            self._deep_job.wait()  # the last deep block reads the state this step updates
        self._disarm_scheduler_skip()
        if self._coordinator is None and not self._actions.empty():
            self._apply_early()
        if self._summarized:
            self._keep_guard_flag(optimizer)
            return
        if self._explicit:
            return  # the adapter summarises inside the step (closure), or _post_step does it late
        self._summarize(optimizer)

    def _keep_guard_flag(self, optimizer: torch.optim.Optimizer) -> None:
        """summarize_step() ran before ``scaler.step()``, which sets its own found_inf:
        combine both, so the guard's verdict is not lost."""
        flag = self._guard_flag
        current = getattr(optimizer, "found_inf", None)
        if flag is None or current is flag or not isinstance(current, torch.Tensor):
            return
        try:
            optimizer.found_inf = torch.maximum(current, flag.to(current.device, current.dtype))
        except Exception:
            self._report_error("guard")

    def _summarize(self, optimizer: torch.optim.Optimizer, guard: bool = True) -> None:
        """The summary moment: per-step vector on the device, extensions, guard."""
        self._summarized = True
        self._extensions_ran = False
        try:
            grad_scale = getattr(optimizer, "grad_scale", None)
            found_inf = getattr(optimizer, "found_inf", None)
            if found_inf is not None and found_inf is self._guard_flag:
                found_inf = None  # our own flag from an earlier summary of this step, not GradScaler's
            guard_fused = guard and self._fused and self.config.guard != "off"
            guard_sync = guard and self.config.guard == "sync" and not self._fused
            vector, bad, layout = self._stats.per_step(
                self._loss_window.mean(),
                grad_scale=grad_scale if isinstance(grad_scale, torch.Tensor) else None,
                found_inf=found_inf if isinstance(found_inf, torch.Tensor) else None,
                guard=guard_fused,
                need_flag=guard_sync,
                norms=self._clip_norms,
                on_context=self._run_extensions if self._extensions else None,
                step=self.step + 1,
            )
            layout.norms_from_every_rank = self._cross_rank is not None and self._cross_rank.sharded
            if guard_fused:
                # The fused kernel leaves params, m, v and the step count alone
                # when found_inf is non-zero: a skip with no host sync.
                flag = bad.to(torch.float32).reshape(())
                if isinstance(found_inf, torch.Tensor):
                    flag = torch.maximum(found_inf.to(flag.device, torch.float32), flag)
                else:
                    self._found_inf_set = True
                optimizer.found_inf = flag
                self._guard_flag = flag
            elif guard_sync:
                # Opt-in, documented: one host sync per step buys the skip for
                # optimizers without a found_inf input. Dropping every grad
                # makes torch's Adam skip each param (no update, no state change).
                if bool(bad):
                    for group in optimizer.param_groups:
                        for p in group["params"]:
                            p.grad = None
                    code = layout.meta.get("skip_code")  # an extension's request, read after the sync
                    layout.meta["skip_reason"] = "guard" if code is None else skip_reason(float(code), layout)
                    layout.meta["skip_sync"] = True
            self._pending = (vector, layout)
        except Exception:
            self._pending = None
            self._report_error("pre_step_summary")
            self._enter_cross_rank_failed()

    def _enter_cross_rank_failed(self) -> None:
        """The summary failed on this rank before the cross-rank collectives: enter them anyway.

        The other ranks are (or will be) inside the same all-reduces; a rank
        that skips them hangs every other rank forever (issue 9). Its payload
        says "failed", so the others export NaN rather than a partial sum.
        """
        if self._cross_rank is None or self._extensions_ran:
            return
        try:
            self._cross_rank.enter_failed()
            if len(self._extensions) > 1:
                flag = torch.zeros(1, dtype=torch.float32, device=self._cross_rank._payload_place(None)[0])  # agree_on_skip's dtype
                work = torch.distributed.all_reduce(
                    flag, op=torch.distributed.ReduceOp.MAX, group=self._cross_rank.group, async_op=True)
                self._cross_rank.reductions += 1
                work.wait()
        except Exception:
            self._report_error("extension")

    def _run_extensions(self, ctx: StepContext) -> None:
        self._extensions_ran = True
        for extension in self._extensions:
            try:
                extension.on_summary(ctx)
            except Exception:
                self._report_error("extension")
        if self._cross_rank is not None and len(self._extensions) > 1:
            # Later extensions (a spike guard) may ask to skip on one rank only:
            # every rank skips, or none. Same registrations on every rank, so
            # every rank makes this second all-reduce or none does.
            try:
                self._cross_rank.agree_on_skip(ctx)
            except Exception:
                self._report_error("extension")

    def _clip_total_norm(self, parameters: list[torch.Tensor]) -> torch.Tensor | None:
        """clip_grad_norm_ over exactly this optimizer's gradients: our pass gives its total norm.

        Returns None (torch computes the norm itself) when the gradients are not
        exactly ours, not all on the statistics device, or the step is already summarised.
        """
        if self._closed or self._summarized or self._clip_norms is not None:
            return None
        if self._params_sharded:
            return None  # FSDP: our pass sees this rank's shard; the clip needs the global norm (torch's)
        try:
            if not parameters:
                return None
            # The same parameter list as a step ago (the usual case) was checked
            # then: only whether every one has a gradient is new. The full check
            # runs once per new list, and rejects another optimizer's at once.
            key = tuple(map(id, parameters))
            if key != self._clip_params_key:
                owners = self._clip_params_are_ours(parameters)
                if owners is None:
                    return None
                self._clip_params_key, self._clip_owners = key, owners
            norms = self._stats.grad_norms(order=(parameters, self._clip_owners))
            if not norms.norms:
                return None  # no gradient at all: torch's own (empty) norm
            self._clip_norms = norms
            # torch's own formula over the same float32 norms in the clip's own
            # parameter order (so the clip scales the gradients bit for bit as an
            # unwatched clip would), in the gradients' dtype
            self._clip_total = norms.total_norm().to(self._clip_dtype)
            return self._clip_total
        except Exception:
            self._report_error("clip")
            return None

    def _clip_params_are_ours(self, parameters: list[torch.Tensor]) -> list[int] | None:
        """The group of each parameter when they are exactly this optimizer's, plain tensors of
        one dtype on the statistics device; None otherwise.

        A gradient has its parameter's type, dtype and device (autograd and the
        ``.grad`` setter enforce it), so checking the parameters once is enough.
        Plain tensors only: a sharded one (DTensor under FSDP2) has a global norm
        our local pass does not give, and the clip must stay torch's then.
        """
        if not self._stats.owns(parameters[0]):
            return None  # another optimizer's
        owners = self._stats.owners_of(parameters)
        if owners is None:
            return None
        dtype = parameters[0].dtype
        for p in parameters:
            if type(p) not in (torch.Tensor, torch.nn.Parameter) or p.device != self._stats.device or p.dtype != dtype:
                return None
        self._clip_dtype = dtype
        return owners

    def _user_clip_coefficient(self) -> torch.Tensor | None:
        """The factor the user's clip_grad_norm_ applied to this step's gradients (a
        device tensor), or None when they were not clipped (for the spike guard)."""
        clip = self._clip
        if clip is None:
            return None
        if clip[1] is not None:
            return clip[1]
        if self._clip_total is None:
            return None
        # The clip used our own total norm (shared pass): derive its factor on the device.
        own = self._clip_total.to(self._stats.dtype)
        return torch.clamp(clip[0] / (own + 1e-6), max=1.0).reshape(())

    def _before_clip(self, parameters: list[torch.Tensor], max_norm: float, total_norm: torch.Tensor) -> None:
        """A norm clip of some parameters is about to scale their gradients (adamwatch.grad_clip)."""
        if self._closed:
            return
        try:
            first = next((p for p in parameters if getattr(p, "grad", None) is not None), None)
            if first is None:
                return
            if not self._stats.owns(first):
                return  # another optimizer's parameters
            if total_norm is self._clip_total and self._clip is None:
                self._clip = (float(max_norm), None)  # the norm of our own pass: derived on the host
                return
            if not self._summarized and self._clip_norms is None:
                # The pass the summary would make anyway, taken before clipping.
                self._clip_norms = self._stats.grad_norms()
            total = total_norm if isinstance(total_norm, torch.Tensor) else torch.tensor(float(total_norm))
            total = self._stats._to_dev(total.detach()).to(self._stats.dtype)
            coef = torch.clamp(float(max_norm) / (total + 1e-6), max=1.0).reshape(())
            if self._clip is not None:
                # clipped twice in one step: the combined factor
                first = self._clip[1]
                if first is None:
                    own = self._clip_total.to(self._stats.dtype)
                    first = torch.clamp(self._clip[0] / (own + 1e-6), max=1.0).reshape(())
                coef = coef * first
            self._clip = (float(max_norm), coef)
        except Exception:
            self._report_error("clip")

    @not_traced
    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._found_inf_set:
            self._found_inf_set = False
            try:
                del optimizer.found_inf
            except AttributeError:
                pass
        self._steps_in_call += 1
        if not self._summarized and not self._closed:
            # Driven by summarize_step() but not called for this step: summarise
            # late (after the update, unguarded) rather than not at all, and say so.
            self._report_error("summary_missed")
            self._summarize(optimizer, guard=False)
        try:
            self._finish_step()
        except Exception:
            self._report_error("post_step_summary")
        try:
            self._apply_actions()
        except Exception:
            self._report_error("remediation")
        every = self.config.check_config_every
        if every and self.step % every == 0:
            try:
                self._check_config()
            except Exception:
                self._report_error("config_check")

    def _finish_step(self, skip_reason: str | None = None) -> None:
        if self._deep_job is not None:
            self._deep_job.wait()  # summaries go out in step order
        self.step += 1
        now = time.time()
        # Durations from the monotonic clock: a wall-clock jump must not make a
        # step look negative or an hour long.
        ended = time.monotonic()
        duration = None if self._last_end is None else ended - self._last_end
        self._last_end = ended
        pending, self._pending = self._pending, None
        clip, self._clip, self._clip_norms, self._clip_total = self._clip, None, None, None
        self._loss_window.reset()
        self._summarized = False
        self._guard_flag = None
        if pending is None:
            return
        vector, layout = pending
        # The blocks after the per-step part, in the vector's order: deep, clip, fingerprint.
        tail: list[torch.Tensor] = []
        if clip is not None:
            layout.clip_max_norm = clip[0]
            if clip[1] is None:
                layout.clip_from_norm = True
            else:
                tail.append(clip[1])
        fingerprint_due = bool(self.config.fingerprint_every) and self.step % self.config.fingerprint_every == 0
        samples = self._samples_next if self._samples_next is not None else self.config.samples_per_step
        tokens = self._tokens_next if self._tokens_next is not None else self.config.tokens_per_step
        self._samples_next = self._tokens_next = None
        layout.meta.update(step=self.step, time=now, duration_s=duration, samples=samples, tokens=tokens)
        if skip_reason is not None:
            layout.meta["skip_reason"] = skip_reason
        every = self.config.deep_stats_every
        deep_due = bool(every) and self.step % every == 0 and skip_reason is None
        if not deep_due and not fingerprint_due:
            self._submit(vector, layout, tail)
            return
        if self._cross_rank is None:
            # One path, here or on the helper thread (CPU: the deep block and the
            # fingerprint are computed while the next forward and backward run;
            # the next step waits for them, as they read the state it updates).
            compute = None
            if deep_due:
                try:
                    compute = self._stats.prepare_deep()
                except Exception:
                    self._report_error("deep_stats")  # the step goes without its block
            job = lambda: self._submit_with_state_blocks(vector, layout, tail, compute, fingerprint_due)  # noqa: E731
            if self._deep_job is None or not self._deep_job.submit(job):
                job()  # in the hook (a GPU, deep_stats_thread=False, or a helper closed meanwhile)
            return
        if fingerprint_due:
            tail = self._with_fingerprint(layout, tail)  # a failure counted, and on: the reduction is a collective
        if not deep_due:
            self._submit(vector, layout, tail)
            return
        # Under the cross-rank reduction, in the hook: the block's reduction is a collective.
        try:
            deep, present = self._stats.deep()
        except Exception:
            self._report_error("deep_stats")
            # The other ranks are entering the deep reduction (a collective):
            # enter it too, with NaN, so that they get NaN norms, not a partial
            # sum, and nobody waits forever.
            deep, present = self._cross_rank.failed_deep(vector.device, vector.dtype)
        deep, present = self._cross_rank.reduce_deep(deep, present)  # global m, v, update and weight norms
        layout.deep_groups = present
        self._submit(vector, layout, [deep, *tail])

    def _submit_with_state_blocks(self, vector: torch.Tensor | FoldedStepVector, layout: StepLayout,
                                  tail: list[torch.Tensor],
                                  compute: Callable[[], tuple[torch.Tensor, list[bool]]] | None,
                                  fingerprint_due: bool) -> None:
        """The blocks read from the weights and Adam's state (the deep block, the
        fingerprint), then the summary: in the hook or on the helper thread. A block
        that cannot be computed is left out and its failure counted; the step is sent."""
        if compute is not None:
            try:
                deep, present = compute()
            except Exception:
                self._report_error("deep_stats")
            else:
                layout.deep_groups = present
                tail = [deep, *tail]
        if fingerprint_due:
            tail = self._with_fingerprint(layout, tail)
        self._submit(vector, layout, tail)

    def _with_fingerprint(self, layout: StepLayout, tail: list[torch.Tensor]) -> list[torch.Tensor]:
        """``tail`` with the replica fingerprint as its last block (after the clip's), or
        as it is when the fingerprint cannot be computed (counted as ``fingerprint``)."""
        try:
            block = fingerprint(self.optimizer, self._stats.device, self._stats.dtype)
        except Exception:
            self._report_error("fingerprint")
            return tail
        layout.fingerprint = True
        return [*tail, block]

    def _submit(self, vector: torch.Tensor | FoldedStepVector, layout: StepLayout, tail: list[torch.Tensor]) -> None:
        for block in tail:
            vector = append_block(vector, block)
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
                    if self._pending is None:
                        vector, _bad, layout = self._stats.per_step(
                            self._loss_window.mean(), norms=self._clip_norms, step=self.step + 1)
                        self._pending = (vector, layout)
                    self._finish_step(skip_reason="grad_scaler")
                except Exception:
                    self._report_error("scaler_skipped_summary")
            return result

        self._scaler = scaler
        self._scaler_step = step
        scaler.step = step

    # ------------------------------------------------------------------ background
    # The client's pause after each send. Not tied to the step time: a send
    # pauses only the next one, so a summary arriving after a quiet spell
    # (slow steps, or fast ones resuming after an evaluation) goes out at once,
    # and a run of fast steps costs one wake-up per pause, however it is
    # interrupted. (A smoothed step time used to gate it: one slow step in ten
    # made every fast step a wake-up of its own.)
    _BATCH_SECONDS = 0.1

    def _batch_interval(self) -> float:
        if self.config.batch_interval is not None:
            return float(self.config.batch_interval)
        return self._BATCH_SECONDS

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
            "config": self._opt_config,
            "config_hash": self._opt_config_hash,
            "features": self.features(),
            "lr_scale": float(self.lr_scale),
            "policy_wait_s": float(self.config.policy_wait),
            "model_family": self.config.model_family,
            "target": dict(self.config.target) if self.config.target else None,
            "monitor_errors": dict(self.errors_by_where),
            "step_encoding": self._step_encoding,
        }

    def _summaries(self, timeout: float) -> list[dict[str, Any]]:
        payloads = []
        for values, layout in self._transfer.collect(timeout):
            payload = self._payload(values, layout)
            payloads.append(payload)
            self._note_health(payload)
        return payloads

    @staticmethod
    def _payload(values: list[float], layout: StepLayout) -> dict[str, Any]:
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
            reason = skip_reason(values[SKIP_INDEX], layout)
        payload["skip_reason"] = reason if payload["skipped"] else None
        return payload

    def _poll_summaries(self) -> list[bytes]:
        packed = self._step_encoding == "packed"
        encode_step = wire.encode_step_packed if packed else self._encode_json_step
        try:
            frames = []
            for values, layout in self._transfer.collect(0):
                usual = self._usual_step_frame(values, layout) if packed else None
                if usual is not None:
                    frames.append(usual[0])
                    self._note_step_health(layout.meta["step"], usual[1])
                    continue
                p = self._payload(values, layout)
                self._note_health(p)
                fp = p.pop("fingerprint", None)
                frames.append(encode_step(p))
                if fp is not None:
                    frames.append(wire.encode_frame(wire.MessageType.FINGERPRINT,
                                                    {"step": p["step"], "fingerprint": fp}))
        except Exception:
            self._report_error("summary_reader")
            frames = []
        errors = self._errors_frame()
        if errors is not None and self._client is not None:
            self._client.send_control(errors)
        client = self._client
        if client is not None and not client.connected:
            # Evaluations wait (bounded) for a first connection; once the sidecar
            # is lost they are dropped and counted in the recorder, never as
            # dropped step summaries. The footprint waits for the connection.
            if client.connections:
                self._evals.discard()
            return frames
        try:
            frames.extend(self._side_frames())
        except Exception:
            self._report_error("evaluation_footprint")
        return frames

    @staticmethod
    def _usual_step_frame(values: list[float], layout: StepLayout) -> tuple[bytes, bool] | None:
        """The usual step's STEP_PACKED frame straight from its fields (no payload dict;
        the client thread holds the GIL meanwhile), and whether the step was healthy.
        None for any other step: the caller takes the general path."""
        meta = layout.meta
        fields = plain_step(values, layout) if "skip_reason" not in meta else None
        if fields is None:
            return None
        loss, grad_norm, group_norms, grad_nonfinite, lr = fields
        frame = wire.encode_plain_step_packed(meta["step"], meta["time"], meta["duration_s"], loss, grad_norm,
                                              group_norms, grad_nonfinite, lr, meta.get("samples"), meta.get("tokens"))
        if frame is None:
            return None
        return frame, not grad_nonfinite and (loss is None or loss - loss == 0)  # (inf - inf and NaN are NaN)

    @staticmethod
    def _encode_json_step(payload: dict[str, Any]) -> bytes:
        return wire.encode_frame(wire.MessageType.STEP, payload)

    def _next_side_frame_due(self) -> float | None:
        """When the client thread must run a turn without being woken: the next FOOTPRINT."""
        return self._next_footprint

    def _side_frames(self) -> list[bytes]:
        """EVAL frames of recorded evaluations, and a FOOTPRINT every ``footprint_interval`` seconds."""
        frames = [wire.encode_frame(wire.MessageType.EVAL, p) for p in self._evals.drain()]
        now = time.monotonic()
        if now >= self._next_footprint:
            # Before the first step Adam holds no state yet: look again within a
            # second, so the state's bytes do not wait a whole interval.
            interval = self.config.footprint_interval
            self._next_footprint = now + (interval if self.optimizer.state else min(interval, 1.0))
            frames.append(wire.encode_frame(wire.MessageType.FOOTPRINT, footprint_payload(self.optimizer, time.time())))
        return frames

    def _drain_without_client(self) -> None:
        while not self._closed or not self._transfer.idle:
            try:
                self._summaries(5.0)  # close() wakes it; no ticks while idle
                self._evals.discard()  # nowhere to send them
            except Exception:
                self._report_error("summary_reader")

    def _note_health(self, payload: dict[str, Any]) -> None:
        healthy = not (payload.get("loss_nonfinite") or payload.get("grad_nonfinite") or payload.get("skipped")
                       # a step another rank could not summarise is not vouched for
                       or (payload.get("extras") or {}).get("cross_rank_failed_ranks", 0.0) > 0)
        self._note_step_health(payload["step"], healthy)

    def _note_step_health(self, step: int, healthy: bool) -> None:
        try:
            self._remediator.note_step(step, healthy)
            if self.checkpointer is not None:
                self.checkpointer.note_step(step, healthy)
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
        if self._coordinator is not None:
            self._check_checkpointing_agrees()

    def _check_checkpointing_agrees(self) -> None:
        """Refuse restores (for the whole run) unless every rank checkpoints the same way.

        A restore is broadcast to every rank and, with a Checkpointer that agrees
        across ranks, chooses its step in a collective. With a Checkpointer on
        some ranks only (the common "save on rank 0" pattern), that collective
        would wait forever for the others; restoring one rank alone would make
        the replicas differ. One small all-gather at watch() (a collective
        already, off the step path) finds out; the ladder then escalates past
        the restore rung instead of hanging.
        """
        dist = torch.distributed
        channel = self._coordinator.channel
        world = dist.get_world_size(channel)
        if world < 2:
            return
        checkpointer = self.checkpointer
        if checkpointer is None:
            mine = 0
        else:
            agrees = getattr(checkpointer, "agrees_across_ranks", lambda: False)()
            mine = 2 if agrees else 1
        flags = torch.zeros(world, dtype=torch.int64)
        flags[dist.get_rank(channel)] = mine
        dist.all_reduce(flags, group=channel)  # gloo, CPU: nothing waits on a device
        kinds = flags.tolist()
        if len(set(kinds)) == 1:
            return
        names = {0: "no Checkpointer", 1: "a rank-local Checkpointer", 2: "a Checkpointer that agrees across ranks"}
        shown = "; ".join(f"rank {r}: {names[k]}" for r, k in enumerate(kinds))
        self._remediator.restore_refusal = (
            f"restores need the same checkpointing on every rank ({shown}); pass a Checkpointer to watch() "
            f"on every rank, each saving its own copy")
        if self.rank == 0:
            log.warning("adamwatch: checkpoint restores are disabled for this run: %s",
                        self._remediator.restore_refusal)

    def _setup_cross_rank(self) -> Any:
        """Register the cross-rank reduction first (a collective: every rank calls watch())."""
        dist = torch.distributed
        if self.config.cross_rank == "off" or not (dist.is_available() and dist.is_initialized()):
            return None
        if dist.get_world_size() < 2 and self.config.cross_rank != "on":
            return None
        from adamwatch.cross_rank import CrossRankReduction

        reduction = CrossRankReduction(self.optimizer, local_grads=self.config.local_grads)
        self._extensions.insert(0, reduction)
        return reduction

    def _queue_action(self, kind: str, args: dict[str, Any], reason: str | None, source: str = "local",
                      action_id: str | None = None) -> str:
        if source == "local" and self._coordinator is not None and self.rank != 0:
            # Rank 0 decides and broadcasts (or replicas diverge); an action issued
            # here would be dropped, so refuse it rather than return an id for nothing.
            raise RuntimeError(
                f"adamwatch: monitor.{kind}() on rank {self.rank}: under torch.distributed only rank 0's "
                f"actions are applied (broadcast to every rank); call it on rank 0 only "
                f"(if monitor.rank == 0: ...)")
        action = Action(kind, args, source=source, reason=reason)
        if action_id is not None:
            action.id = action_id
        self._actions.put(action)
        return action.id

    # ------------------------------------------------------------------ configuration and policy
    def _check_config(self) -> None:
        """At a step boundary: did someone other than adamwatch change the optimizer's configuration?

        An identity check of the groups' values (:class:`GroupsSnapshot`), then
        only when something was replaced plain dict reads (:func:`group_signature`);
        only when that differs is the configuration captured again, without
        reading device tensors.
        """
        if self._groups_snapshot.unchanged():
            return
        self._groups_snapshot.take()
        signature = group_signature(self.optimizer)
        if signature == self._opt_signature:
            return
        self._opt_signature = signature
        new = capture_config(self.optimizer, self.scheduler, self._scaler, allow_sync=False)
        new_hash = config_hash(new)
        if new_hash == self._opt_config_hash:
            return
        changed = diff_configs(self._opt_config, new)
        previous = self._opt_config_hash
        self._opt_config, self._opt_config_hash = new, new_hash
        self.config_changes += 1
        log.warning("adamwatch: the optimizer's configuration changed at step %d (not by adamwatch): %s",
                    self.step, "; ".join(changed) or "(no field-level difference)")
        if self._client is not None:
            self._client.send_control(wire.encode_frame(wire.MessageType.CONFIG, {
                "step": int(self.step), "time": time.time(), "config": new, "config_hash": new_hash,
                "previous_hash": previous, "changed": changed}))

    def _await_policy_verdict(self) -> None:
        """Wait (bounded) for the sidecar's verdict on the configuration, when a sidecar answered at all."""
        wait = float(self.config.policy_wait)
        if wait <= 0 or self._client is None or not self._client.connected:
            return
        if not self._verdict_event.wait(wait):
            log.info("adamwatch: no policy verdict from the sidecar within %.2fs; training starts", wait)

    def _agree_on_policy_stop(self) -> None:
        """Under torch.distributed, a policy stop on any rank stops every rank before step 1.

        A rank whose verdict came late (or whose sidecar has no policy) would
        otherwise start training alone and hang in the first gradient all-reduce.
        One blocking all-reduce of a CPU flag over the commands' gloo channel, in
        watch(), never in the step path. Every rank must use the same policy_wait.
        """
        if self._coordinator is None or self.config.policy_wait <= 0:
            return
        import torch.distributed as dist

        flag = torch.tensor([1 if self.stop_requested else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._coordinator.channel)
        if int(flag[0]) and not self.stop_requested:
            log.error("adamwatch: the optimizer policy stops this run: another rank's verdict was stop")
            self._remediator.stop_requested = True
            self.policy_verdict = {"verdict": "stop", "violations": [], "reason": "another rank's verdict was stop"}
            if self._remediator.on_stop is not None:
                try:
                    self._remediator.on_stop()
                except Exception:
                    log.exception("adamwatch: on_stop callback failed")

    def _on_policy_verdict(self, payload: dict[str, Any]) -> None:
        """The sidecar's verdict on the configuration (client thread). "stop" stops before the next step."""
        args = dict(payload.get("args") or {})
        verdict = str(args.get("verdict", "ok"))
        self.policy_verdict = {"verdict": verdict, "violations": list(args.get("violations") or []),
                               "reason": payload.get("reason")}
        if verdict == "stop":
            # Set at once: a verdict that arrives while watch() waits must be
            # visible when it returns, before any step has run.
            log.error("adamwatch: the optimizer policy stops this run: %s", payload.get("reason"))
            first = not self._remediator.stop_requested
            self._remediator.stop_requested = True
            on_stop = self._remediator.on_stop
            if first and on_stop is not None:
                try:
                    on_stop()
                except Exception:
                    log.exception("adamwatch: on_stop callback failed")
            if self._client is not None:
                self._client.send_control(wire.encode_frame(wire.MessageType.ACK, {
                    "id": payload["id"], "action": "policy_verdict", "outcome": "applied", "step": self.step,
                    "detail": "stop requested by the optimizer policy", "lr_scale": float(self.lr_scale)}))
        elif verdict == "warn":
            log.warning("adamwatch: the optimizer configuration violates policy: %s", payload.get("reason"))
        self._verdict_event.set()

    # A sidecar that floods commands must not slow the training loop: at most
    # this many wait for a step boundary (more are refused, acknowledged as
    # such and counted), and at most _MAX_ACTIONS_PER_BOUNDARY of them are
    # applied at one boundary (the rest at the next ones, in order).
    _MAX_PENDING_COMMANDS = 64
    _MAX_ACTIONS_PER_BOUNDARY = 16

    def _on_command(self, payload: dict[str, Any]) -> None:
        """A COMMAND from the sidecar (client thread): queue it for the next step boundary."""
        if payload.get("action") == "policy_verdict":
            self._on_policy_verdict(payload)
            return
        if self._actions.qsize() >= self._MAX_PENDING_COMMANDS:
            self.commands_refused += 1
            self._report_error("command_queue_full")
            refused = Action(str(payload.get("action")), {}, source="sidecar", reason=payload.get("reason"))
            refused.id = payload["id"]
            self._ack(ActionResult(refused, "rejected", None,
                                   f"{self._MAX_PENDING_COMMANDS} commands already wait for a step boundary"))
            return
        if payload.get("action") == "stop":
            log.warning("adamwatch: the sidecar asks this run to stop at the next step boundary: %s",
                        payload.get("reason"))
        trigger = payload.get("step")
        if self.checkpointer is not None and isinstance(trigger, int):
            # The sidecar saw an incident at this step: checkpoints around it
            # must not be trusted as known-good.
            try:
                self.checkpointer.note_incident(trigger)
            except Exception:
                self._report_error("checkpointer_note_incident")
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
        ack["source"] = result.action.source  # "local"/"recovery": counted by the sidecar like its own
        self._client.send_control(wire.encode_frame(wire.MessageType.ACK, ack))

    def _apply_early(self) -> None:
        """Actions queued since the last step take effect before this step's update.

        A learning-rate cut or a stop asked for between steps N and N+1 applies
        to step N+1 itself. A restore waits for the post-step boundary: this
        step's gradients belong to the parameters it would replace.
        """
        try:
            for action in self._take_actions(self._MAX_ACTIONS_PER_BOUNDARY):
                if action.kind == "restore_checkpoint":
                    self._deferred.append(action)
                    continue
                self._ack(self._remediator.apply(self._remediator.resolve(action), self.step))
        except Exception:
            self._report_error("remediation")

    def _take_actions(self, limit: int) -> list[Action]:
        """Up to ``limit`` queued actions, oldest first (the usual step has none: no exception raised)."""
        taken: list[Action] = []
        while len(taken) < limit and not self._actions.empty():
            taken.append(self._actions.get_nowait())
        return taken

    def _apply_actions(self) -> None:
        """Apply pending actions in the post-step hook: between two steps, never inside one.

        Under torch.distributed rank 0 decides: its actions are broadcast and
        every rank applies the same list at the same step, or replicas diverge.
        """
        local, self._deferred = self._deferred, []
        local.extend(self._take_actions(self._MAX_ACTIONS_PER_BOUNDARY))
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
                # Acks come from rank 0, which received or issued every one of them
                # (a local action acked by every rank would be counted once per rank).
                for action in actions:
                    action.source = "broadcast"
        if actions and self._deep_job is not None:
            self._deep_job.wait()  # a restore rewrites the state the deep block is reading
        for action in actions:
            result = self._remediator.apply(action, self.step)
            if result.outcome == "applied" and action.kind == "restore_checkpoint":
                self.step = int(result.data.get("restored_step", self.step))
                self._last_end = None  # the next step's duration would span the restore
                self._arm_scheduler_skip()
            self._ack(result)


class _ClipTap:
    """What adamwatch.grad_clip holds (weakly) for a Monitor: its clip callback, not the Monitor's API."""

    def __init__(self, monitor: Monitor):
        self._monitor = monitor

    def before_clip(self, parameters: list[torch.Tensor], max_norm: float, total_norm: torch.Tensor) -> None:
        self._monitor._before_clip(parameters, max_norm, total_norm)

    def total_norm(self, parameters: list[torch.Tensor]) -> torch.Tensor | None:
        return self._monitor._clip_total_norm(parameters)


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
    """Watch every step of a torch optimizer (Adam/AdamW get Adam's state statistics too).

    Args:
        optimizer: any torch.optim.Optimizer, any implementation (for-loop, foreach, fused).
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
            lr_floor, lr_recovery_steps, command_interval, target (e.g. ``{"eval_loss": 1.6}``),
            model_family, footprint_interval, report_exits, cross_rank, local_grads, fingerprint_every,
            spike_guard, step_encoding, deep_stats_thread).
            ``spike_guard="clip"`` / ``"skip"`` (or an :class:`adamwatch.spike_guard.SpikeGuardConfig`)
            turns on the on-device spike guard; off by default.

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
