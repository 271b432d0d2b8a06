"""A CPU step's summary vector, folded together by the reader thread.

On a GPU the step path only launches kernels: the device reduces the
gradients while the host runs ahead, and the reader thread reads the result.
On a CPU there is no device to run ahead: every op of the reduction runs on
the training thread, and after backward each dispatch costs 10-90 µs of cold
caches. So on the CPU the step path does the one op that must see this step's
gradients (the fused norm pass, ``torch._foreach_norm``, its norms stacked into
one tensor) and hands that and the loss to the reader thread, which folds the
per-tensor norms into the per-group sums of squares and the global one in
Python, off the training thread. The reader's share is one ``tolist`` of CPU
memory per tensor (the clip's norm pass, adamwatch.grad_clip, is the same
stacked tensor): it holds the GIL for microseconds, and every microsecond it
holds it is one the training thread may wait for.

Nothing here can see a changed value: the norms are new tensors nobody else
holds, the loss is the detached tensor ``observe_loss`` kept, and the tail
blocks (deep statistics, clip coefficient, fingerprint) are final when they
are appended. The values are those of the tensor path: float32 norms squared
in float64 and summed per group in the order of the norms.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["FoldedStepVector"]


class FoldedStepVector:
    """The per-step vector ``[loss, total_sq, skip, group_sq × G]`` (then any tail
    blocks) of ``StepStats.per_step``, kept as its parts until ``tolist``.

    Args:
        loss: the step's loss (a 0-dim CPU tensor), or None (the vector holds NaN).
        norms: the float32 per-tensor gradient norms (one fused pass) stacked
            into one tensor, or None when no parameter has a gradient.
        owners: the param group of each norm.
        num_groups: param groups in the vector.
    """

    __slots__ = ("loss", "norms", "owners", "num_groups", "tail")

    def __init__(self, loss: torch.Tensor | None, norms: torch.Tensor | None, owners: list[int], num_groups: int):
        self.loss = loss
        self.norms = norms
        self.owners = owners
        self.num_groups = num_groups
        self.tail: list[torch.Tensor] = []

    def extended(self, block: torch.Tensor) -> "FoldedStepVector":
        """Append a block computed on the step path (deep statistics, clip coefficient, fingerprint)."""
        self.tail.append(block)
        return self

    def numel(self) -> int:
        return 3 + self.num_groups + sum(t.numel() for t in self.tail)

    def tolist(self) -> list[float]:
        """The vector's values (reader thread).

        One ``tolist`` per tensor and no other torch call: ``tolist`` keeps the
        GIL, where an op would release it and hand it to the training thread
        and back (each hand-off costs both threads).
        """
        loss = float("nan") if self.loss is None else self.loss.tolist()  # a 0-dim tensor: a float
        sq = [0.0] * self.num_groups
        if self.norms is not None:
            for owner, norm in zip(self.owners, self.norms.tolist()):
                sq[owner] += norm * norm
        total = 0.0
        for value in sq:
            total += value
        out: list[Any] = [loss, total, 0.0, *sq]
        for block in self.tail:
            block_values = block.tolist()
            if isinstance(block_values, list):
                out.extend(block_values)
            else:
                out.append(block_values)
        return out


def append_block(vector: torch.Tensor | FoldedStepVector, block: torch.Tensor) -> torch.Tensor | FoldedStepVector:
    """``vector`` followed by ``block``, whichever kind of vector it is."""
    if isinstance(vector, FoldedStepVector):
        return vector.extended(block)
    return torch.cat([vector, block.reshape(-1).to(vector.dtype)])
