"""One rank of the "Checkpointer on rank 0 only" run: a restore must be refused, never hang.

argv: rank world workdir
Rank 0 passes a Checkpointer to watch(), the other ranks pass none (the common
"save on rank 0" pattern). After step 6 rank 0 asks for a restore. Writes
workdir/rank<r>.json with the ACK-equivalent outcome, the steps reached and a
parameter checksum (replicas must still agree).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import adamwatch
from adamwatch.checkpoint import Checkpointer


def main() -> None:
    rank, world, workdir = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", init_method=f"file://{workdir / 'rendezvous'}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=600))  # longer than the test's bound: a hang is a hang
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logging.getLogger("adamwatch").addHandler(Keep())
    torch.manual_seed(0)
    model = DistributedDataParallel(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    ckpt = Checkpointer(workdir / "ckpt", model=model, optimizer=optimizer, good_window=1) if rank == 0 else None
    results = []
    with adamwatch.watch(optimizer, checkpointer=ckpt, command_interval=1, deep_stats_every=0) as monitor:
        monitor._ack = lambda result: results.append([result.action.kind, result.outcome, result.detail])
        torch.manual_seed(10 + rank)
        for step in range(1, 13):
            x = torch.randn(16, 8)
            loss = model(x).pow(2).mean()
            loss.backward()
            monitor.observe_loss(loss)
            optimizer.step()
            optimizer.zero_grad()
            if rank == 0 and step == 3:
                ckpt.save(3)
            if rank == 0 and step == 6:
                monitor.restore_checkpoint()
        steps = monitor.step
    checksum = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double().sum()
    sums = [torch.zeros((), dtype=torch.float64) for _ in range(world)]
    dist.all_gather(sums, checksum)
    (workdir / f"rank{rank}.json").write_text(json.dumps({
        "results": results, "steps": steps, "sums": [float(s) for s in sums],
        "warnings": [r for r in records if "restores are disabled" in r],
    }))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Objects in reference cycles (a DDP model, say) that hold a gloo process group must be
    # freed while Python is alive: freed during interpreter shutdown, a gloo group aborts
    # the process ("terminate called without an active exception", exit -6).
    gc.collect()
