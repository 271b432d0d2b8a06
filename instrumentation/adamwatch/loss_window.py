"""The loss of one optimizer step: the mean over its micro-batches, kept on the device.

With gradient accumulation a step sees several ``observe_loss`` calls; the
exported loss is their mean. Tensors are summed on the device (one add per
micro-batch, no sync); Python numbers are summed on the host. A single call per
step keeps the tensor as given: no extra op on the common path.

A user who backpropagates ``loss / accum_steps`` and passes that scaled value
says so with ``scaled_by=accum_steps``; it is multiplied back, so the exported
number is the loss of a micro-batch, not a fraction of it.
"""

from __future__ import annotations

import torch

__all__ = ["LossWindow"]


class LossWindow:
    """Accumulates the losses observed between two step summaries."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self._tensor: torch.Tensor | None = None
        self._tensors = 0
        self._host = 0.0

    def add(self, loss: torch.Tensor | float, scaled_by: float = 1) -> None:
        """Add one micro-batch's loss.

        Args:
            loss: a tensor (its first element when it has several) or a number.
            scaled_by: the factor the loss was divided by before it was passed
                (e.g. the accumulation steps); it is multiplied back.

        Raises:
            TypeError: naming the type when ``loss`` is neither a tensor nor a number.
            ValueError: when ``scaled_by`` is not a positive finite number.
        """
        if type(scaled_by) is int and scaled_by == 1 and self.count == 0 and type(loss) is torch.Tensor \
                and loss.dim() == 0:
            # The usual call (one unscaled 0-dim loss per step) in as few
            # operations as possible: it runs right after backward, with cold caches.
            self._tensor = loss.detach()
            self._tensors = self.count = 1
            return
        if isinstance(scaled_by, bool) or not isinstance(scaled_by, (int, float)) or not 0 < scaled_by < float("inf"):
            raise ValueError(f"observe_loss: scaled_by must be a positive number, got {scaled_by!r}")
        if isinstance(loss, torch.Tensor):
            value = loss.detach()
            if value.dim() != 0:  # (a 0-dim loss, the usual one, costs no op here)
                value = value.reshape(-1)[0] if value.numel() != 1 else value.reshape(())
            if scaled_by != 1:
                value = value.to(torch.float32) * scaled_by
            if self._tensor is None:
                self._tensor = value
            else:
                self._tensor = self._tensor.to(torch.float32) + value.to(self._tensor.device)
            self._tensors += 1
        elif isinstance(loss, (int, float)) and not isinstance(loss, bool):
            self._host += float(loss) * scaled_by
        else:
            raise TypeError(f"observe_loss: loss must be a tensor or a number, got {type(loss).__name__}")
        self.count += 1

    def mean(self) -> torch.Tensor | float | None:
        """The mean over the micro-batches so far: a tensor if any was a tensor, None if none."""
        if self.count == 0:
            return None
        if self._tensor is None:
            return self._host / self.count
        if self.count == 1:
            return self._tensor
        total = self._tensor.to(torch.float32)
        if self._host:
            total = total + self._host
        return total / self.count
