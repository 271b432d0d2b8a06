"""A real training process for the end-to-end remediation tests (run as a subprocess).

    python _e2e_trainer.py ENDPOINT CKPT_DIR OUT_JSON SCENARIO

SCENARIO "nan": steps 120-122 get a NaN loss (fused AdamW skips them on the device).
SCENARIO "spike": from step 150 the targets are corrupted x30 for 40 iterations,
a persisting loss spike. Prints nothing; writes a JSON record of every iteration.
"""

from __future__ import annotations

import json
import sys
import time

import torch

import adamwatch

endpoint, ckpt_dir, out_path, scenario = sys.argv[1:5]
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=True)
w_true = torch.randn(8, 1)
restores: list[int] = []
ckpt = adamwatch.Checkpointer(ckpt_dir, model=model, optimizer=optimizer, keep=5, good_window=5,
                              on_restore=restores.append)
records = []
# batch_interval=0: stream every step at once, as the monitor does by itself for
# steps of 40 ms or more; these test steps take ~12 ms so that CI stays fast.
with adamwatch.watch(optimizer, endpoint=endpoint, job="e2e", rank=0, checkpointer=ckpt, deep_stats_every=0,
                     batch_interval=0) as mon:
    for it in range(1, 301):
        x = torch.randn(64, 8)
        y = x @ w_true + 0.5 * torch.randn(64, 1)
        if scenario == "spike" and 150 <= it < 190:
            y = y * 30
        loss = torch.nn.functional.mse_loss(model(x), y)
        if scenario == "nan" and 120 <= it < 123:
            loss = loss * float("nan")
        loss.backward()
        mon.observe_loss(loss)
        before = [p.detach().clone() for p in model.parameters()]
        restores_before = len(restores)
        optimizer.step()
        optimizer.zero_grad()
        unchanged = all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        if it % 20 == 0:
            ckpt.save(mon.step)
        records.append({"it": it, "step": mon.step, "loss": float(loss.detach()), "lr": optimizer.param_groups[0]["lr"],
                        "lr_scale": mon.lr_scale, "unchanged": unchanged,
                        # a sidecar restore applied at the end of this very step (its post-step hook)
                        "restored": len(restores) > restores_before,
                        "finite": all(bool(torch.isfinite(p).all()) for p in model.parameters()),
                        "t": time.time()})
        time.sleep(0.01)  # ~100 steps/s: the sidecar's command has a step boundary to land on
    time.sleep(0.3)  # let the last ACKs leave
json.dump({"records": records, "restores": restores}, open(out_path, "w"))
