"""A real CPU training run for the end-to-end alerting test (run as a subprocess).

    python _trainer.py ENDPOINT JOB STEPS STEPS_PER_SECOND NAN_FROM CKPT_DIR OUT_JSON

A small MLP regression with fused AdamW and adamwatch's Checkpointer. From step
NAN_FROM on (0: never) the loss is multiplied by NaN, so loss and gradients are
non-finite; the fused guard skips those updates. Writes the wall time of the
first non-finite step (before it is reported) to OUT_JSON.nan at once, and a
summary to OUT_JSON at the end.
"""

from __future__ import annotations

import json
import sys
import time

import torch

import adamwatch

endpoint, job, steps, steps_per_second, nan_from, ckpt_dir, out_path = sys.argv[1:8]
steps, nan_from, period = int(steps), int(nan_from), 1.0 / float(steps_per_second)

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
decay = [p for p in model.parameters() if p.dim() >= 2]
no_decay = [p for p in model.parameters() if p.dim() < 2]
optimizer = torch.optim.AdamW(
    [{"params": decay, "name": "decay", "weight_decay": 0.1}, {"params": no_decay, "name": "no_decay", "weight_decay": 0.0}],
    lr=1e-3, fused=True,
)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 20))
checkpointer = adamwatch.Checkpointer(ckpt_dir, model=model, optimizer=optimizer, scheduler=scheduler, keep=4, good_window=5)
w_true = torch.randn(16, 1)
first_nan_time = None
batch = 32
next_tick = time.monotonic()
with adamwatch.watch(optimizer, scheduler=scheduler, endpoint=endpoint, job=job, rank=0, checkpointer=checkpointer,
                     deep_stats_every=5, samples_per_step=batch, tokens_per_step=batch * 16) as monitor:
    for it in range(1, steps + 1):
        x = torch.randn(batch, 16)
        y = x @ w_true + 0.1 * torch.randn(batch, 1)
        loss = torch.nn.functional.mse_loss(model(x), y)
        if nan_from and it >= nan_from:
            if first_nan_time is None:
                first_nan_time = time.time()
                # Written at once: the test measures from here to the PagerDuty event.
                with open(out_path + ".nan", "w") as marker:
                    marker.write(repr(first_nan_time))
            loss = loss * float("nan")
        loss.backward()
        monitor.observe_loss(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        if it % 25 == 0:
            checkpointer.save(monitor.step)
        next_tick += period
        time.sleep(max(0.0, next_tick - time.monotonic()))
with open(out_path, "w") as out:
    json.dump({"first_nan_time": first_nan_time, "steps": steps}, out)
