"""A real trainer process for the optimizer-policy tests.

argv: endpoint job lr steps [change_at]
Trains a small AdamW until ``monitor.stop_requested`` or ``steps``; at step
``change_at`` (if given) it edits betas like a careless script would. Prints
one JSON line on stdout: steps run, stop_requested, the verdict, config hash.
"""

from __future__ import annotations

import json
import logging
import sys
import time

import torch

import adamwatch

logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")


def main() -> None:
    endpoint, job, lr, steps = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
    change_at = int(sys.argv[5]) if len(sys.argv) > 5 else None
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    monitor = adamwatch.watch(optimizer, scheduler=scheduler, endpoint=endpoint, job=job, policy_wait=5.0,
                              deep_stats_every=2)
    ran = 0
    started = time.monotonic()
    while ran < steps and not monitor.stop_requested:
        x = torch.randn(16, 8)
        loss = model(x).pow(2).mean()
        loss.backward()
        monitor.observe_loss(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        ran += 1
        if change_at is not None and ran == change_at:
            optimizer.param_groups[0]["betas"] = (0.5, 0.999)
        time.sleep(0.02)
    out = {"steps": ran, "stop_requested": monitor.stop_requested, "verdict": monitor.policy_verdict,
           "config_hash": monitor.config_hash, "config_changes": monitor.config_changes,
           "seconds": time.monotonic() - started}
    monitor.close()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
