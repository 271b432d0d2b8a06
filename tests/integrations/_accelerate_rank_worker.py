"""One rank of a 2-process Accelerate run on CPU (MULTI_CPU, gloo), watched by adamwatch.

argv: rank world workdir master_port endpoint
Accelerate initialises the process group itself from the environment, the way
`accelerate launch` does. Gradient accumulation over 2 micro-batches,
``accelerator.clip_grad_norm_`` at 0.05 (it clips), AdamW; writes workdir/rank<r>.json with
what the framework computed at the last step (its total norm, the mean of this
rank's micro-batch losses, the lr) for the test to compare with /metrics.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path

import torch


def main() -> None:
    rank, world, workdir, port, endpoint = (int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4],
                                            sys.argv[5])
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    import adamwatch

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    assert accelerator.distributed_type == DistributedType.MULTI_CPU, accelerator.distributed_type
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, opt = accelerator.prepare(model, opt)
    records = []
    with adamwatch.watch(opt, endpoint=endpoint, job="accel-multi-cpu", deep_stats_every=0) as monitor:
        micro_losses: list[float] = []
        for i in range(12):  # 6 optimizer steps of 2 micro-batches
            g = torch.Generator().manual_seed(100 * rank + i)  # different data on every rank
            x, y = torch.randn(16, 8, generator=g), torch.randn(16, 1, generator=g)
            with accelerator.accumulate(model):
                loss = torch.nn.functional.mse_loss(model(x), y)
                accelerator.backward(loss)
                monitor.observe_loss(loss)
                micro_losses.append(loss.item())
                if accelerator.sync_gradients:
                    norm = accelerator.clip_grad_norm_(model.parameters(), 0.05)  # clips every step
                    records.append({"norm": float(norm), "loss": sum(micro_losses) / len(micro_losses),
                                    "lr": opt.param_groups[0]["lr"]})
                    micro_losses = []
                opt.step()
                opt.zero_grad()
        steps = monitor.step
        errors = monitor.errors
    (workdir / f"rank{rank}.json").write_text(json.dumps({"records": records, "steps": steps, "errors": errors}))
    accelerator.end_training()  # destroys the process group Accelerate created


if __name__ == "__main__":
    main()
    # Objects in reference cycles (a DDP model, say) that hold a gloo process group must be
    # freed while Python is alive: freed during interpreter shutdown, a gloo group aborts
    # the process ("terminate called without an active exception", exit -6).
    gc.collect()
