"""On-device fingerprint of a replica's parameters and Adam state.

Data-parallel replicas (DDP) must hold bit-identical parameters and optimizer
state; when they drift apart (a non-deterministic kernel, a rank that skipped
a step or restored another checkpoint, silent data corruption) every later
step trains a different model on each rank. Every N steps each rank computes
one integer from the bit patterns of its parameters and of every tensor of the
optimizer state (Adam: ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq`` with
amsgrad, step counters); the sidecar
and the ``AdamwatchReplicaDivergence`` alert compare them across the ranks of
a job at the same step.

| property | how |
| --- | --- |
| exact | integers only: each element's bit pattern (as int32; 16-bit types widened, 64-bit ones as two int32 words) is multiplied by an odd constant with 32-bit wrap-around, summed into an int64 per tensor |
| position of the tensor | the per-tensor sums are weighted by distinct odd numbers and added with 64-bit wrap-around |
| exported exactly | the low 52 bits, so the value is an integer below 2^52 that a float64 (the wire, Prometheus) holds exactly |
| one changed element is always seen | the element's term changes by a non-zero multiple of the odd constant mod 2^32, so its tensor's sum changes (a single change cannot cancel) |
| cost | three elementwise integer passes per tensor (view, multiply, sum) every N steps; nothing read on the host |

Identical replicas give identical fingerprints whatever the device; different
replicas collide with probability about 2^-52 per comparison (a multiset
hash: two elements of one tensor swapping places are not seen).
"""

from __future__ import annotations

import torch

__all__ = ["fingerprint", "FINGERPRINT_BITS"]

# The exported value keeps this many low bits: < 2^52, exact in a float64.
FINGERPRINT_BITS = 52
_MASK = (1 << FINGERPRINT_BITS) - 1
# Odd multiplier (the 32-bit golden-ratio constant, as a signed int32): a
# bijection mod 2^32 that spreads a one-ulp change over the high bits.
_MIX = 0x9E3779B1 - (1 << 32)


def _words(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns as a flat int32 tensor (a view where possible)."""
    flat = t.detach().reshape(-1)
    size = flat.element_size()
    if flat.is_floating_point() or flat.is_complex():
        if size == 4:
            return flat.view(torch.int32)
        if size == 8:
            return flat.view(torch.int32)  # two words per element
        if size == 2:
            return flat.view(torch.int16).to(torch.int32)
        return flat.view(torch.uint8).to(torch.int32)
    if flat.dtype == torch.bool:
        return flat.to(torch.int32)
    return flat.to(torch.int32) if size <= 4 else flat.view(torch.int32)


def _tensor_sum(t: torch.Tensor) -> torch.Tensor:
    # int32 multiply wraps mod 2^32; the sum of up to 2^31 such terms fits an int64.
    return (_words(t) * _MIX).sum(dtype=torch.int64)


def fingerprint(optimizer: torch.optim.Optimizer, device: torch.device,
                dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The replica fingerprint of ``optimizer``'s parameters and state, on ``device``.

    Args:
        optimizer: a torch Adam/AdamW (any implementation).
        device: where the result lives (the summary vector's device).
        dtype: the summary vector's dtype; float32 (MPS, which has no float64)
            keeps 24 bits instead of 52.

    Returns:
        A 0-dim tensor of ``dtype`` holding an integer in [0, 2^52); nothing is read on the host.
    """
    sums: list[torch.Tensor] = []
    state = optimizer.state
    for group in optimizer.param_groups:
        for p in group["params"]:
            sums.append(_tensor_sum(p))
            st = state.get(p)
            if not st:
                continue
            # Every tensor of the state, in key order (Adam: exp_avg, exp_avg_sq,
            # max_exp_avg_sq, step; other optimizers their own buffers).
            for name in sorted(k for k, v in st.items() if isinstance(v, torch.Tensor)):
                sums.append(_tensor_sum(st[name]))
    if not sums:
        return torch.zeros((), dtype=dtype, device=device)
    stacked = torch.stack([s.to(device, non_blocking=True) for s in sums])
    weights = torch.arange(1, 2 * len(sums), 2, dtype=torch.int64, device=device)
    # int64 multiply and sum wrap mod 2^64; the mask keeps the low 52 bits.
    mask = _MASK if dtype == torch.float64 else (1 << 24) - 1
    total = (stacked * weights).sum() & mask
    return total.to(dtype)
