"""One rank of the restore-agreement tests (gloo, CPU).

argv: rank world workdir scenario
scenario "corrupt_newest_on_rank1": checkpoints at 10, 20, 30 (all known-good); rank 1's
copy of 30 is corrupted; every rank restores with step=None.
scenario "none_common": rank 0 keeps only 10, rank 1 only 20 (the other deleted): nothing in common.
scenario "monitor": the same corruption, the restore issued by rank 0's Monitor (the ladder's path).
scenario "fsdp2": the same corruption with an FSDP2 (fully_shard, DTensor) model: each rank's
Checkpointer holds its own shards.
Each rank writes workdir/rank<r>.json.
"""

from __future__ import annotations

import gc
import json
import shutil
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import adamwatch
from adamwatch.checkpoint import Checkpointer, NoUsableCheckpointError


def train_step(ddp, optimizer):
    loss = ddp(torch.randn(8, 4)).pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss


def main() -> None:
    rank, world, workdir, scenario = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
    dist.init_process_group("gloo", init_method=f"file://{workdir}/store", rank=rank, world_size=world,
                            timeout=timedelta(seconds=30))
    torch.manual_seed(0)
    if scenario == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        ddp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
        for layer in ddp:
            fully_shard(layer)
        fully_shard(ddp)
    else:
        ddp = DistributedDataParallel(torch.nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
    ckpt = Checkpointer(workdir / f"rank{rank}", model=ddp, optimizer=optimizer, good_window=0, keep=5)
    torch.manual_seed(100 + rank)  # different data per rank, as under DDP
    for step in range(1, 31):
        train_step(ddp, optimizer)
        if step % 10 == 0:
            ckpt.save(step)
            if step == 20 and scenario == "fsdp2":
                at20 = [p.full_tensor().flatten().tolist() for p in ddp.parameters()]
        ckpt.note_step(step, True)
    for step in range(31, 36):
        train_step(ddp, optimizer)
    out: dict = {"rank": rank}
    if scenario in ("corrupt_newest_on_rank1", "monitor", "fsdp2") and rank == 1:
        (workdir / "rank1" / "step-000000000030" / "model.pt").write_bytes(b"garbage")
    if scenario == "none_common":
        keep = 10 if rank == 0 else 20
        for folder in (workdir / f"rank{rank}").glob("step-*"):
            if not folder.name.endswith(f"{keep:012d}"):
                shutil.rmtree(folder)
    dist.barrier()
    if scenario == "monitor":
        monitor = adamwatch.watch(optimizer, checkpointer=ckpt, endpoint=None, job="agree", policy_wait=0,
                                  deep_stats_every=0)
        if rank == 0:
            monitor.restore_checkpoint(reason="test")
        for _ in range(3):  # the action is broadcast, then applied one step later on every rank
            train_step(ddp, optimizer)
        monitor.close()
        out["restored"] = monitor.step
    else:
        try:
            out["restored"] = ckpt.restore()
        except NoUsableCheckpointError as exc:
            out["error"] = str(exc)
            out["error_type"] = type(exc).__name__
    state = optimizer.state_dict()["state"]
    out["adam_steps"] = [float(state[k]["step"]) for k in sorted(state)]
    if scenario == "fsdp2":  # the whole parameters, gathered from the shards
        out["params"] = [p.full_tensor().flatten().tolist() for p in ddp.parameters()]
        out["params_at_20"] = at20
        out["sharded"] = type(next(ddp.parameters())).__name__
    else:
        out["params"] = [p.detach().flatten().tolist() for p in ddp.parameters()]
    out["corrupt"] = ckpt.corrupt_checkpoints
    (workdir / f"rank{rank}.json").write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Objects in reference cycles (a DDP model, say) that hold a gloo process group must be
    # freed while Python is alive: freed during interpreter shutdown, a gloo group aborts
    # the process ("terminate called without an active exception", exit -6).
    gc.collect()
