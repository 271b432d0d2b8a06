"""Checkpoints record the optimizer's configuration and adamwatch's LR scale; restores compare them."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from adamwatch.checkpoint import CheckpointConfigMismatchError, Checkpointer, NoUsableCheckpointError
from adamwatch.lr_control import current_lr_scales, scale_learning_rate

from .test_policy_process import sidecar, value  # noqa: F401 - the fixture

HERE = Path(__file__).resolve().parent


def make(tmp_path, betas=(0.9, 0.999), lr=1e-3, **kwargs):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=betas)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.5)
    ckpt = Checkpointer(tmp_path / "ckpt", model=model, optimizer=optimizer, scheduler=scheduler, **kwargs)
    return model, optimizer, scheduler, ckpt


def train(model, optimizer, scheduler, steps):
    for _ in range(steps):
        model(torch.randn(3, 4)).sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def saved_run(tmp_path, **kwargs):
    model, optimizer, scheduler, ckpt = make(tmp_path, **kwargs)
    train(model, optimizer, scheduler, 3)
    ckpt.save(3)
    return model


def test_a_checkpoint_saved_with_other_hyperparameters_is_refused_naming_the_fields(tmp_path):
    saved_run(tmp_path)
    model, optimizer, scheduler, ckpt = make(tmp_path, betas=(0.9, 0.95), lr=3e-4)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(CheckpointConfigMismatchError) as caught:
        ckpt.restore(3)
    assert isinstance(caught.value, NoUsableCheckpointError)  # the ladder escalates as for any failed restore
    message = str(caught.value)
    assert "param_groups[0].betas: [0.9, 0.999] -> [0.9, 0.95]" in message
    assert "param_groups[0].peak_lr: 0.001 -> 0.0003" in message
    assert caught.value.differences[3] == ["param_groups[0].betas: [0.9, 0.999] -> [0.9, 0.95]",
                                           "param_groups[0].peak_lr: 0.001 -> 0.0003"]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # nothing changed
    assert ckpt.corrupt_checkpoints == 0  # a mismatch is not corruption


def test_on_mismatch_warn_restores_and_logs_the_differences(tmp_path, caplog):
    saved = saved_run(tmp_path)
    model, optimizer, scheduler, ckpt = make(tmp_path, betas=(0.9, 0.95), on_mismatch="warn")
    assert ckpt.restore(3) == 3
    assert all(torch.equal(a, b) for a, b in zip(saved.parameters(), model.parameters()))
    assert "param_groups[0].betas: [0.9, 0.999] -> [0.9, 0.95]" in caplog.text
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.999)  # the checkpoint's hyperparameters are in force


def test_a_matching_checkpoint_restores_after_adamwatch_cut_its_learning_rate(tmp_path):
    model, optimizer, scheduler, ckpt = make(tmp_path)
    train(model, optimizer, scheduler, 2)
    scale_learning_rate(optimizer, scheduler, 0.5)  # adamwatch's own cut is not a configuration change
    train(model, optimizer, scheduler, 1)
    ckpt.save(3)
    events = []
    model2, optimizer2, scheduler2, ckpt2 = make(tmp_path)
    ckpt2.add_listener(events.append)
    assert ckpt2.restore(3) == 3
    assert current_lr_scales(optimizer2) == [0.5]  # the scale came back with the rates it describes
    restored = [e for e in events if e.kind == "restored"]
    assert restored[-1].as_payload()["lr_scale"] == 0.5


TRAINER = """
import sys, torch, adamwatch
from adamwatch.checkpoint import Checkpointer
from adamwatch.lr_control import scale_learning_rate
endpoint, directory, phase = sys.argv[1], sys.argv[2], sys.argv[3]
torch.manual_seed(0)
model = torch.nn.Linear(4, 2)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
ckpt = Checkpointer(directory, model=model, optimizer=optimizer)
if phase == "save":
    scale_learning_rate(optimizer, None, 0.25)
    model(torch.randn(2, 4)).sum().backward(); optimizer.step()
    ckpt.save(1)
else:
    ckpt.restore(1)   # at start-up, before watch(): the checkpoint's cut is in force again
    monitor = adamwatch.watch(optimizer, checkpointer=ckpt, endpoint=endpoint, job="resumed")
    model(torch.randn(2, 4)).sum().backward(); optimizer.step()
    monitor.close()
"""


@pytest.mark.slow
def test_the_sidecar_learning_rate_scale_follows_a_restore(sidecar, tmp_path):  # noqa: F811
    for phase in ("save", "restore"):
        subprocess.run([sys.executable, "-c", TRAINER, sidecar["endpoint"], str(tmp_path / "c"), phase],
                       check=True, timeout=60, capture_output=True)
    deadline = time.monotonic() + 5
    while value(sidecar["metrics"], "adamwatch_learning_rate_scale", job="resumed") != 0.25:
        assert time.monotonic() < deadline, value(sidecar["metrics"], "adamwatch_learning_rate_scale", job="resumed")
        time.sleep(0.05)


def test_agreement_options_are_checked_and_a_single_process_restores_alone(tmp_path):
    with pytest.raises(ValueError, match="agree_across_ranks"):
        make(tmp_path, agree_across_ranks="sometimes")
    with pytest.raises(ValueError, match="on_mismatch"):
        make(tmp_path, on_mismatch="ignore")
    saved_run(tmp_path)
    _, _, _, ckpt = make(tmp_path)
    assert ckpt.agrees_across_ranks() is False  # no process group: nothing to agree with
    assert ckpt.restore(3) == 3
    _, _, _, forced = make(tmp_path, agree_across_ranks=True)
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        forced.restore(3)
