"""A real training process for the status page's browser test (run as a subprocess).

    python _trainer.py ENDPOINT CKPT_DIR OUT_JSON

A small regression model with fused AdamW, deep statistics every 10 steps and a
Checkpointer; two injected incidents: NaN losses at iterations 60-61 (the fused
guard skips both; fewer than the non-finite detector's 3 in a row), and from
iteration 150 targets x30 for 40 iterations, a persisting loss spike the
sidecar repairs (cut the learning rate, then restore a checkpoint). Writes a
JSON record of every iteration: wall time right after its optimizer step, the
monitor's step, whether the update was skipped.
"""

from __future__ import annotations

import json
import sys
import time

import torch

import adamwatch

endpoint, ckpt_dir, out_path = sys.argv[1:4]
torch.manual_seed(0)
torch.set_num_threads(1)
model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
optimizer = torch.optim.AdamW([
    {"params": [p for n, p in model.named_parameters() if n.endswith("weight")], "name": "weights"},
    {"params": [p for n, p in model.named_parameters() if n.endswith("bias")], "name": "biases", "weight_decay": 0.0},
], lr=3e-3, fused=True)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 50))
w_true = torch.randn(8, 1)
ckpt = adamwatch.Checkpointer(ckpt_dir, model=model, optimizer=optimizer, scheduler=scheduler, keep=5, good_window=5)
records = []
# batch_interval=0: every step is streamed at once, as the monitor does by itself for steps of 40 ms or more.
with adamwatch.watch(optimizer, scheduler=scheduler, endpoint=endpoint, job="browser", rank=0, checkpointer=ckpt,
                     deep_stats_every=10, samples_per_step=64, batch_interval=0) as mon:
    for it in range(1, 301):
        x = torch.randn(64, 8)
        y = x @ w_true + 0.5 * torch.randn(64, 1)
        if 150 <= it < 190:
            y = y * 30
        loss = torch.nn.functional.mse_loss(model(x), y)
        if it in (60, 61):
            loss = loss * float("nan")
        loss.backward()
        mon.observe_loss(loss)
        before = model[0].weight.detach().clone()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        records.append({"it": it, "t": time.time(), "step": mon.step,
                        "skipped": bool(torch.equal(before, model[0].weight))})
        if it % 20 == 0:
            ckpt.save(mon.step)
        time.sleep(0.01)  # ~80 steps/s: commands have a step boundary to land on, the page has something to follow
    time.sleep(0.3)  # let the last ACKs leave
json.dump({"records": records}, open(out_path, "w"))
