"""One rank of the cross-rank failure test (issue 9): rank 1's cross-rank payload raises at step 5.

argv: rank world_size workdir mode   (mode: "extension" breaks the cross-rank extension,
"summary" breaks the summary before the extensions run, "deep" breaks rank 1's deep
statistics under FSDP2, whose deep norms are reduced across ranks, "sharded" breaks the
cross-rank extension under FSDP2, whose gradient norms are sums over the ranks' shards)
Each rank writes workdir/rank<R>.json: steps finished, its monitor errors, the failed extra seen.
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
from adamwatch.cross_rank import _DEEP_NORMS

STEPS = 12
FAIL_AT = 5


class Recorder:
    def __init__(self):
        self.failed: list[torch.Tensor] = []

    def on_summary(self, ctx) -> None:
        self.failed.append(torch.as_tensor(dict(ctx.extras).get("cross_rank_failed_ranks", -1.0)).clone())


def main() -> None:
    rank, world, workdir, mode = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", init_method=f"file://{workdir / 'rendezvous'}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=600))  # longer than the test's bound: a hang is a hang
    torch.manual_seed(0)
    if mode in ("deep", "sharded"):
        from torch.distributed.fsdp import fully_shard

        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        fully_shard(model)
    else:
        model = DistributedDataParallel(torch.nn.Linear(4, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    monitor = adamwatch.watch(opt, endpoint=None, job="cross-fail", deep_stats_every=2 if mode == "deep" else 0)
    recorder = Recorder()
    monitor.add_step_extension(recorder)
    assert monitor._cross_rank is not None
    state = {"step": 0}

    def fail_at_step(owner, name: str, what: str) -> None:
        """Make ``owner.name`` raise at step FAIL_AT (rank 1 only)."""
        original = getattr(owner, name)

        def broken(*args, **kwargs):
            if state["step"] == FAIL_AT:
                raise ValueError(f"injected failure in {what}")
            return original(*args, **kwargs)

        setattr(owner, name, broken)

    if rank == 1 and mode in ("extension", "sharded"):
        fail_at_step(monitor._cross_rank, "_loss_nonfinite", "the cross-rank extension")
    if rank == 1 and mode == "summary":
        fail_at_step(monitor._stats, "per_step", "the summary")
    deep_norms: list[list] = []  # per deep step: [monitor step, every reduced norm finite?]
    if mode == "deep":
        if rank == 1:
            fail_at_step(monitor._stats, "deep", "the deep statistics")
        original_reduce = monitor._cross_rank.reduce_deep

        def recording_reduce(deep, present):
            out, reported = original_reduce(deep, present)
            norms = out.reshape(len(reported), -1)[:, _DEEP_NORMS]  # update, weight, m, v: the reduced ones
            deep_norms.append([monitor.step, bool(torch.isfinite(norms).all())])
            return out, reported

        monitor._cross_rank.reduce_deep = recording_reduce
    payloads: list[dict] = []  # what each step's STEP says about the gradients
    original_note = monitor._note_health

    def note(payload):
        payloads.append({"step": payload["step"], "grad_norm": payload["grad_norm"],
                         "group_grad_norms": payload["group_grad_norms"],
                         "grad_nonfinite": payload["grad_nonfinite"],
                         "failed": (payload.get("extras") or {}).get("cross_rank_failed_ranks")})
        original_note(payload)

    monitor._note_health = note
    finished = 0
    for step in range(STEPS):
        state["step"] = step
        x = torch.randn(8, 4)
        loss = model(x).pow(2).mean()
        loss.backward()
        monitor.observe_loss(loss)
        opt.step()
        opt.zero_grad()
        finished += 1
    errors = dict(monitor.errors_by_where)
    monitor.close()
    # No reference to a process group outlives close(): a cycle could keep the Monitor
    # alive until interpreter shutdown, and a gloo group freed then aborts the process.
    released = monitor._cross_rank.group is None and monitor._coordinator._channel is None
    (workdir / f"rank{rank}.json").write_text(json.dumps({
        "finished": finished,
        "failed_extra": [float(f) for f in recorder.failed],
        "failed_steps": monitor._cross_rank.failed_steps,
        "errors": errors,
        "deep_norms": deep_norms,
        "groups_released": released,
        "payloads": payloads,
    }))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Objects in reference cycles (a DDP model, say) that hold a gloo process group must be
    # freed while Python is alive: freed during interpreter shutdown, a gloo group aborts
    # the process ("terminate called without an active exception", exit -6).
    gc.collect()
