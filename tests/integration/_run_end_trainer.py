"""A tiny real trainer that ends in the way its first argument says (run by test_run_ends.py).

    python _run_end_trainer.py MODE ENDPOINT JOB
    MODE: clean | no-close | exception | oom | sigterm | sigterm-handled | sigkill | eval
"""

from __future__ import annotations

import os
import signal
import sys

import torch

import adamwatch


def main() -> None:
    mode, endpoint, job = sys.argv[1:4]
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    target = {"eval_loss": 0.5} if mode == "eval" else None
    stopping = []
    if mode == "sigterm-handled":
        # The script's own handler, installed before watch(): finish the epoch, then exit 0.
        signal.signal(signal.SIGTERM, lambda signum, frame: stopping.append(signum))
    monitor = adamwatch.watch(optimizer, endpoint=endpoint, job=job, target=target, model_family="linear",
                              footprint_interval=0.05)

    def step() -> None:
        loss = model(torch.randn(16, 8)).square().mean()
        loss.backward()
        monitor.observe_loss(loss)
        optimizer.step()
        optimizer.zero_grad()

    if mode == "exception":
        with monitor:
            for _ in range(5):
                step()
            raise ValueError("bad batch")
    for i in range(5):
        step()
    if mode == "eval":
        # validation loss falls to the target: 1.0, 0.8, 0.6, 0.4
        for k, val in enumerate([1.0, 0.8, 0.6, 0.4]):
            step()
            monitor.observe_eval(loss=torch.tensor(val), accuracy=0.5 + 0.1 * k)
        print("READY", flush=True)
        sys.stdin.readline()  # the test reads /metrics, then lets us finish
        monitor.close()
    elif mode == "clean":
        monitor.close()
    elif mode == "no-close":
        pass  # the script just ends: the atexit hook says goodbye
    elif mode == "oom":
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")  # uncaught: excepthook
    elif mode == "sigterm":
        os.kill(os.getpid(), signal.SIGTERM)
    elif mode == "sigterm-handled":
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(5):  # training goes on after the goodbye: the hooks are still there
            step()
        assert stopping == [signal.SIGTERM] and monitor.step == 10, (stopping, monitor.step)
        monitor.close()
    elif mode == "sigkill":
        print("READY", flush=True)
        sys.stdin.readline()
        os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    main()
