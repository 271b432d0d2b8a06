"""Child process for the SIGKILL test: save checkpoints in a loop until killed.

Every parameter holds the value of the step it was saved at, so the parent can
check a restored checkpoint's content, not only its checksum.
"""

from __future__ import annotations

import sys

import torch

from adamwatch.checkpoint import Checkpointer, NoUsableCheckpointError


def main(directory: str) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 512), torch.nn.Linear(512, 256))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ckpt = Checkpointer(directory, model=model, optimizer=optimizer, keep=2, good_window=0)
    try:
        step = ckpt.restore()
    except NoUsableCheckpointError:
        step = 0
    print(f"start {step}", flush=True)
    while True:
        step += 1
        with torch.no_grad():
            for p in model.parameters():
                p.grad = torch.ones_like(p)
        optimizer.step()
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(step))
        ckpt.save(step)
        ckpt.note_step(step, True)  # good_window=0: known-good as soon as its own step is healthy
        print(f"good {step}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
