"""Child process for the full-disk test: save once, then save under a file-size limit (a real EFBIG).

Prints one JSON line describing what the failed save raised and counted.
"""

from __future__ import annotations

import json
import resource
import signal
import sys

import torch

from adamwatch.checkpoint import CheckpointSaveError, Checkpointer


def main(directory: str, limit_bytes: int) -> None:
    # A write past RLIMIT_FSIZE raises SIGXFSZ (which kills) unless ignored; ignored, write() fails with EFBIG.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.Linear(128, 64))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 128)).sum().backward()
    optimizer.step()
    events = []
    ckpt = Checkpointer(directory, model=model, optimizer=optimizer,
                        on_event=lambda kind, step, path, detail: events.append([kind, step, detail]))
    ckpt.save(1)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    try:
        ckpt.save(2)
    except CheckpointSaveError as exc:
        result = {"raised": type(exc).__name__, "is_oserror": isinstance(exc, OSError), "errno": exc.errno,
                  "message": str(exc), "cause": type(exc.__cause__).__name__}
    else:
        result = {"raised": None}
    result.update(save_failures=ckpt.save_failures, events=events)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
