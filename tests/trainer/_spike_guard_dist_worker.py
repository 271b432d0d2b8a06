"""One rank of the spike guard's gloo test: DDP, different data per rank, spikes injected on one rank.

argv: rank world_size workdir mode
Each rank writes workdir/rank<R>.json: per step the guard's skip flag and the post-guard
global gradient norm, and a checksum of the final parameters.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import adamwatch
from adamwatch.spike_guard import SpikeGuardConfig

STEPS = 60
SPIKES = {30: 50.0, 45: 80.0}  # step -> loss weight, on the last rank only


class Recorder:
    """Registered after the guard: what it decided, as device tensors read after the run."""

    def __init__(self):
        self.skips: list[torch.Tensor] = []
        self.norms: list[torch.Tensor] = []
        self.clips: list[torch.Tensor] = []

    def on_summary(self, ctx) -> None:
        self.skips.append(ctx.skip.clone())
        self.clips.append(torch.as_tensor(dict(ctx.extras).get("spike_guard_clip", 0.0)).clone())
        grads = [g for group in ctx.grads_by_group for g in group]
        self.norms.append(torch.stack(torch._foreach_norm(grads)).norm())


def main() -> None:
    rank, world, workdir, mode = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", init_method=f"file://{workdir / 'rendezvous'}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    torch.manual_seed(0)
    model = DistributedDataParallel(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    cfg = SpikeGuardConfig(mode=mode, warmup=10, window=32)
    monitor = adamwatch.watch(opt, endpoint=None, job="guard-dist", deep_stats_every=0, spike_guard=cfg)
    recorder = Recorder()
    monitor.add_step_extension(recorder)
    data = torch.Generator().manual_seed(100 + rank)  # different batches on every rank
    for step in range(STEPS):
        x = torch.randn(32, 8, generator=data)
        y = x.sum(1, keepdim=True)
        loss = torch.nn.functional.mse_loss(model(x), y)
        if rank == world - 1:
            loss = loss * SPIKES.get(step, 1.0)
        loss.backward()
        monitor.observe_loss(loss)
        opt.step()
        opt.zero_grad()
    monitor.close()
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    (workdir / f"rank{rank}.json").write_text(json.dumps({
        "skips": [bool(s) for s in recorder.skips],
        "norms": [float(n) for n in recorder.norms],
        "clips": [bool(c) for c in recorder.clips],
        "params": params.tolist(),
    }))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Objects in reference cycles (a DDP model, say) that hold a gloo process group must be
    # freed while Python is alive: freed during interpreter shutdown, a gloo group aborts
    # the process ("terminate called without an active exception", exit -6).
    gc.collect()
