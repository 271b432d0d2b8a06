"""One DDP rank (gloo, CPU) for the replica-fingerprint test.

argv: rank world_size workdir endpoint perturb_rank
Trains 10 steps with fingerprint_every=5; after step 9 the rank ``perturb_rank``
moves one weight by one ulp (torch.nextafter). Writes workdir/rank<r>.json with
the fingerprints it computed itself after steps 5 and 10 (the truth to compare
the sidecar's /metrics with).
"""

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
from adamwatch.fingerprint import fingerprint


def main() -> None:
    rank, world, workdir, endpoint, perturb_rank = (
        int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], int(sys.argv[5]))
    dist.init_process_group("gloo", init_method=f"file://{workdir / 'store'}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    torch.manual_seed(0)
    model = DistributedDataParallel(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)))
    # No weight decay: w * (1 - lr * wd) may round two neighbouring floats to one.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    truth = {}
    data = torch.Generator().manual_seed(100 + rank)  # each rank its own data, DDP averages the grads
    with adamwatch.watch(opt, endpoint=endpoint, job="ddp-replicas", deep_stats_every=0, fingerprint_every=5,
                         batch_interval=0) as monitor:
        for step in range(1, 11):
            x, y = torch.randn(4, 8, generator=data), torch.randn(4, 4, generator=data)
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            monitor.observe_loss(loss)
            opt.step()
            opt.zero_grad()
            if step in (5, 10):
                truth[step] = int(fingerprint(opt, torch.device("cpu")).item())
            if step == 9 and rank == perturb_rank:
                with torch.no_grad():
                    w = model.module[0].weight
                    w[0, 0] = torch.nextafter(w[0, 0], torch.tensor(float("inf")))
    # Do the replicas really differ (the update after the ulp could round it away)?
    w = model.module[0].weight.detach().clone()
    parts = [torch.empty_like(w) for _ in range(world)]
    dist.all_gather(parts, w)
    truth["weights_equal"] = all(torch.equal(parts[0], p) for p in parts[1:])
    (workdir / f"rank{rank}.json").write_text(json.dumps(truth))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Objects in reference cycles (a DDP model, say) that hold a gloo process group must be
    # freed while Python is alive: freed during interpreter shutdown, a gloo group aborts
    # the process ("terminate called without an active exception", exit -6).
    gc.collect()
