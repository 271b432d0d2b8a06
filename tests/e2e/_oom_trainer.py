"""A real CPU training run that dies of torch.OutOfMemoryError (run by the end-to-end test).

    python _oom_trainer.py ENDPOINT JOB STEPS STEPS_PER_SECOND

Trains STEPS steps at STEPS_PER_SECOND, then raises torch.OutOfMemoryError outside
any ``with`` block, as an allocation failure deep in a model would: adamwatch's
chained excepthook reports exit_reason "oom" in the GOODBYE, then Python prints
the traceback and exits 1 as usual.
"""

from __future__ import annotations

import sys
import time

import torch

import adamwatch

endpoint, job, steps, steps_per_second = sys.argv[1:5]
torch.manual_seed(0)
model = torch.nn.Linear(16, 1)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
monitor = adamwatch.watch(optimizer, endpoint=endpoint, job=job, rank=0, model_family="e2e-linear")
next_tick = time.monotonic()
for _ in range(int(steps)):
    loss = model(torch.randn(32, 16)).square().mean()
    loss.backward()
    monitor.observe_loss(loss)
    optimizer.step()
    optimizer.zero_grad()
    next_tick += 1.0 / float(steps_per_second)
    time.sleep(max(0.0, next_tick - time.monotonic()))
raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated by the e2e test)")
