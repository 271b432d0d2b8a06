"""Run one Python process per rank, joined by gloo on 127.0.0.1, with bounded time and cleanup.

    results = run_ranks(tmp_path, 2, WORKER, "exact", "fsdp2", "fused")

Each rank runs ``WORKER rank world workdir *args`` (``init_process_group``
through a file store in ``workdir``) and writes ``workdir/rank<r>.json``; the
list of those documents comes back, ordered by rank. A rank that exits non-zero
fails the test with its output; a hung collective is killed at ``timeout``
instead of hanging CI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 150


def run_ranks(workdir: Path, world: int, worker: Path, *args: str, timeout: float = TIMEOUT_S,
              env: dict[str, str] | None = None) -> list[dict]:
    """Start ``world`` rank processes of ``worker``; return their result documents."""
    environ = dict(os.environ, PYTHONPATH=str(ROOT / "instrumentation"), OMP_NUM_THREADS="1",
                   PYTHONWARNINGS="ignore", **(env or {}))
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), str(rank), str(world), str(workdir), *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environ,
        )
        for rank in range(world)
    ]
    outputs: list[str] = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=timeout)
            outputs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    for rank, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"rank {rank} exited {proc.returncode}:\n{out[-4000:]}"
    return [json.loads((workdir / f"rank{rank}.json").read_text()) for rank in range(world)]
