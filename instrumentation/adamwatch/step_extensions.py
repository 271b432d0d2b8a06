"""The extension point at the moment a step is summarised: StepContext and StepExtension.

A feature that needs this step's gradients or wants to change the summary (a
cross-rank reduction of the norms, a spike guard, adaptive clipping) registers a
:class:`StepExtension` with ``Monitor.add_step_extension``. At the summary
moment — after the local norms, before the global norm, the guard's decision and
the copy to the host — each extension's ``on_summary`` gets the
:class:`StepContext` of the step, in registration order::

    class LossIsHuge:
        def on_summary(self, ctx):
            huge = ctx.loss > 1e3                      # a device tensor: no sync
            ctx.add_extra("loss_huge", huge.float())   # sent in STEP.extras
            ctx.request_skip(huge, "loss_huge")        # fused: skipped by found_inf

    monitor.add_step_extension(LossIsHuge())

Everything an extension does must stay on the device: no ``.item()``, no
``bool(tensor)``, no Python branch on a device value. An extension that raises
is counted in ``monitor.errors`` (where="extension") and the step is summarised
without it.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

__all__ = ["StepContext", "StepExtension", "MAX_EXTRAS", "MAX_EXTRA_NAME_CHARS"]

# Bounds on STEP.extras, shared with the sidecar's validation (a frame over them is rejected).
MAX_EXTRAS = 64
MAX_EXTRA_NAME_CHARS = 64


class StepContext:
    """One step at its summary moment. Device tensors only; nothing here syncs.

    Attributes:
        optimizer: the watched optimizer.
        step: host-side index of the step being summarised (1-based, the STEP frame's ``step``).
        params_by_group: per param group, the params that have a gradient this step.
        grads_by_group: their gradients, in the same order (pre-clip; still scaled
            when ``grad_scale`` is set, see below).
        group_norm_sq: ``[n_groups]`` per-group sum of squared gradients, pre-clip and
            unscaled, in the statistics dtype (float64; float32 on MPS, where float64
            is missing: an exploding norm of 1e20 squared overflows float32).
            Replace it (same shape) to change every norm the step reports.
        loss: float32 0-dim: the mean loss over the step's micro-batches (NaN when none).
        has_loss: whether ``observe_loss`` was called for this step (host bool).
        grad_scale: GradScaler's scale when the gradients are still scaled (fused
            AMP path), else None. ``group_norm_sq`` is already unscaled.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        step: int,
        params_by_group: list[list[torch.Tensor]],
        grads_by_group: list[list[torch.Tensor]],
        group_norm_sq: torch.Tensor,
        loss: torch.Tensor,
        has_loss: bool,
        grad_scale: torch.Tensor | None = None,
    ):
        self.optimizer = optimizer
        self.step = step
        self.params_by_group = params_by_group
        self.grads_by_group = grads_by_group
        self.group_norm_sq = group_norm_sq
        self.loss = loss
        self.has_loss = has_loss
        self.grad_scale = grad_scale
        self._nonfinite: torch.Tensor | None = None
        self._skip: torch.Tensor | None = None
        self.skip_requests: list[tuple[torch.Tensor, str]] = []
        self.extras: list[tuple[str, torch.Tensor | float]] = []

    # nonfinite and skip are built on first use: a step with no extension reading
    # them pays nothing for them.
    @property
    def nonfinite(self) -> torch.Tensor:
        """bool 0-dim: the loss or the gradients are non-finite on this rank.

        Derived from ``group_norm_sq`` and ``loss`` as they are when first read;
        replace it (e.g. with a cross-rank OR) to change what the guard sees.
        """
        if self._nonfinite is None:
            bad = ~torch.isfinite(self.group_norm_sq.sum())
            if self.has_loss:
                bad = bad | ~torch.isfinite(self.loss)
            self._nonfinite = bad.reshape(())
        return self._nonfinite

    @nonfinite.setter
    def nonfinite(self, value: torch.Tensor) -> None:
        self._nonfinite = value

    @property
    def nonfinite_read(self) -> bool:
        """Whether any extension read or replaced ``nonfinite`` (host bool)."""
        return self._nonfinite is not None

    @property
    def skip(self) -> torch.Tensor:
        """bool 0-dim: OR into it (``ctx.skip |= flag``) to ask that the step be skipped.

        With a fused optimizer the skip costs no sync (``found_inf``); with
        ``guard="sync"`` it costs the documented one sync; otherwise (and with
        ``guard="off"``) a request is not enforced. Prefer :meth:`request_skip`,
        which also names the reason in ``adamwatch_skipped_steps_total``.
        """
        if self._skip is None:
            # A fresh tensor per step: ``|=`` works in place.
            self._skip = torch.zeros((), dtype=torch.bool, device=self.group_norm_sq.device)
        return self._skip

    @skip.setter
    def skip(self, value: torch.Tensor) -> None:
        self._skip = value

    @property
    def skip_requested(self) -> bool:
        """Whether any extension touched ``skip`` (host bool, not the device value)."""
        return self._skip is not None

    def request_skip(self, flag: torch.Tensor, reason: str) -> None:
        """Ask that the step be skipped where ``flag`` (bool device tensor) is true.

        Args:
            flag: 0-dim bool tensor on the statistics device.
            reason: the ``reason`` label of ``adamwatch_skipped_steps_total`` when it is skipped.
        """
        if not isinstance(reason, str) or not reason:
            raise ValueError(f"request_skip: reason must be a non-empty string, got {reason!r}")
        flag = flag.reshape(()).to(torch.bool)
        self.skip = self.skip | flag
        self.skip_requests.append((flag, reason))

    def add_extra(self, name: str, value: torch.Tensor | float) -> None:
        """Send one more number with this step: ``STEP.extras[name]``.

        A device tensor is read back with the summary vector (no sync); the
        sidecar keeps the latest value per trainer for features to export.

        Args:
            name: at most MAX_EXTRA_NAME_CHARS characters, unique within the step.
            value: a 0-dim (or one-element) tensor, or a Python number.

        Raises:
            ValueError: naming the bad name, a duplicate, or too many extras.
        """
        if not isinstance(name, str) or not 0 < len(name) <= MAX_EXTRA_NAME_CHARS:
            raise ValueError(f"add_extra: name must be 1..{MAX_EXTRA_NAME_CHARS} characters, got {name!r}")
        if any(existing == name for existing, _ in self.extras):
            raise ValueError(f"add_extra: {name!r} was already added for this step")
        if len(self.extras) >= MAX_EXTRAS:
            raise ValueError(f"add_extra: at most {MAX_EXTRAS} extras per step")
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f"add_extra({name!r}): expected one value, got a tensor of shape {tuple(value.shape)}")
            value = value.detach()
        elif not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ValueError(f"add_extra({name!r}): value must be a tensor or a number, got {type(value).__name__}")
        self.extras.append((name, value))


@runtime_checkable
class StepExtension(Protocol):
    """Something that takes part in summarising every step (see the module docstring)."""

    def on_summary(self, ctx: StepContext) -> None: ...
