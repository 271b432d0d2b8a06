"""One rank of the distributed policy-stop test: rank 0 talks to a sidecar whose policy says stop,
rank 1 has no sidecar at all. argv: rank world workdir endpoint. Writes workdir/rank<r>.json."""

from __future__ import annotations

import gc
import json
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import adamwatch

rank, world, workdir, endpoint = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
dist.init_process_group("gloo", init_method=f"file://{workdir}/store", rank=rank, world_size=world,
                        timeout=timedelta(seconds=30))
torch.manual_seed(0)
ddp = DistributedDataParallel(torch.nn.Linear(4, 1))
optimizer = torch.optim.AdamW(ddp.parameters(), lr=0.01)
monitor = adamwatch.watch(optimizer, endpoint=endpoint if rank == 0 else None, job="prod-dist", policy_wait=3.0)
steps = 0
while steps < 20 and not monitor.stop_requested:
    ddp(torch.randn(8, 4)).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    steps += 1
monitor.close()
(workdir / f"rank{rank}.json").write_text(json.dumps({"steps": steps, "stop": monitor.stop_requested,
                                                     "verdict": monitor.policy_verdict}))
dist.destroy_process_group()
del monitor, optimizer, ddp
gc.collect()  # free the cycles holding gloo groups while Python is alive (see the rank workers)
