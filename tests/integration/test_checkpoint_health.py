"""Checkpoint health end to end (issue 11 item 4): a real Checkpointer, Monitor and sidecar process.

What /metrics shows is compared with the truth: the Checkpointer's own counters,
the sizes in its manifests, and durations and times from injected clocks.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

import adamwatch
from adamwatch.checkpoint import CheckpointSaveError, Checkpointer, NoUsableCheckpointError


class Clock:
    """Wall time the test sets by hand."""

    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


def _train(model, optimizer, monitor, steps: int) -> None:
    for _ in range(steps):
        loss = model(torch.randn(4, 8)).square().mean()
        loss.backward()
        monitor.observe_loss(loss)
        optimizer.step()
        optimizer.zero_grad()


def test_saves_restores_failures_and_corruption_reach_metrics(sidecar, tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    garbage = directory / "step-000000000001"
    garbage.mkdir(parents=True)
    (garbage / "manifest.json").write_text('{"step": Infinity}')  # found by the constructor, before watch()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    clock = Clock(1_700_000_000.0)
    ticks = itertools.count(0.0, 0.25)  # every save and restore takes exactly 0.25 s by this timer
    ckpt = Checkpointer(directory, model=model, optimizer=optimizer, clock=clock, timer=lambda: next(ticks))
    assert ckpt.corrupt_checkpoints == 1

    labels = {"job": "ckpt-health", "rank": "0"}
    with adamwatch.watch(optimizer, endpoint=sidecar.endpoint, job="ckpt-health", rank=0,
                         checkpointer=ckpt, deep_stats_every=0) as monitor:
        _train(model, optimizer, monitor, 3)
        clock.now = 1_700_000_100.0
        folder = ckpt.save(3)
        # the disk goes away for one save: a real ENOENT
        directory.rename(tmp_path / "unmounted")
        clock.now = 1_700_000_200.0
        with pytest.raises(CheckpointSaveError):
            ckpt.save(4)
        (tmp_path / "unmounted").rename(directory)
        with pytest.raises(NoUsableCheckpointError):
            ckpt.restore(step=99)
        assert ckpt.restore(step=3) == 3
        _train(model, optimizer, monitor, 1)

        def total(name: str, outcome: str) -> float:
            return sidecar.wait_value(name, lambda v: v >= 1, outcome=outcome, **labels)

        assert total("adamwatch_checkpoint_restores_total", "success") == 1
        assert total("adamwatch_checkpoint_restores_total", "failed") == 1
        assert total("adamwatch_checkpoint_saves_total", "success") == 1
        assert total("adamwatch_checkpoint_saves_total", "failed") == ckpt.save_failures == 1
        assert sidecar.value("adamwatch_corrupt_checkpoints_total", **labels) == ckpt.corrupt_checkpoints == 1
        size = sum(meta["bytes"] for meta in json.loads((folder / "manifest.json").read_text())["files"].values())
        assert size == sum(p.stat().st_size for p in folder.iterdir() if p.name != "manifest.json")
        assert sidecar.value("adamwatch_checkpoint_size_bytes", **labels) == size
        assert sidecar.value("adamwatch_checkpoint_save_duration_seconds", **labels) == 0.25
        assert sidecar.value("adamwatch_checkpoint_restore_duration_seconds", **labels) == 0.25
        assert sidecar.value("adamwatch_last_checkpoint_timestamp_seconds", **labels) == 1_700_000_100.0
        assert sidecar.value("adamwatch_last_checkpoint_save_failure_timestamp_seconds", **labels) == 1_700_000_200.0
