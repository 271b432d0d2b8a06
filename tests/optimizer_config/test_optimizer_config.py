"""The configuration fingerprint: stable, blind to schedules and adamwatch's cuts, sharp on edits."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from adamwatch.checkpoint_config import config_differences
from adamwatch.lr_control import scale_learning_rate
from adamwatch.optimizer_config import (GroupsSnapshot, capture_config, config_hash, diff_configs, group_signature,
                                        write_config_file)

SNIPPET = """
import torch, json
from adamwatch.optimizer_config import capture_config, config_hash
torch.manual_seed({seed})
m = torch.nn.Linear(4, 2)
opt = torch.optim.AdamW([{{"params": [m.weight], "name": "w"}}, {{"params": [m.bias], "weight_decay": 0.0}}],
                        lr=1e-3, betas=(0.9, 0.95), fused=True)
sch = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=100)
print(config_hash(capture_config(opt, sch, torch.amp.GradScaler("cpu"))))
"""


def build(**overrides):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    kwargs = dict(lr=1e-3, betas=(0.9, 0.95), fused=True)
    kwargs.update(overrides)
    optimizer = torch.optim.AdamW([{"params": [model.weight], "name": "w"},
                                   {"params": [model.bias], "weight_decay": 0.0}], **kwargs)
    return model, optimizer


def train(model, optimizer, scheduler, steps):
    for _ in range(steps):
        model(torch.randn(3, 4)).sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def test_the_hash_is_the_same_in_other_processes_with_other_weights():
    hashes = {subprocess.run([sys.executable, "-c", SNIPPET.format(seed=seed)], capture_output=True, text=True,
                             check=True).stdout.strip() for seed in (0, 1)}
    model, optimizer = build()
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=100)
    assert hashes == {config_hash(capture_config(optimizer, scheduler, torch.amp.GradScaler("cpu")))}


def test_scheduler_progress_and_adamwatch_cuts_leave_the_fingerprint_alone():
    model, optimizer = build()
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=100)
    before, signature = capture_config(optimizer, scheduler), group_signature(optimizer)
    train(model, optimizer, scheduler, 5)
    scale_learning_rate(optimizer, scheduler, 0.3)
    train(model, optimizer, scheduler, 5)
    assert optimizer.param_groups[0]["lr"] != pytest.approx(1e-3 / 25)  # the rate did move
    assert group_signature(optimizer) == signature
    assert config_hash(capture_config(optimizer, scheduler)) == config_hash(before)


@pytest.mark.parametrize("edit, expected", [
    (lambda opt: opt.param_groups[0].__setitem__("betas", (0.8, 0.95)),
     ["param_groups[0].betas: [0.9, 0.95] -> [0.8, 0.95]"]),
    (lambda opt: opt.param_groups[1].__setitem__("eps", 1e-6), ["param_groups[1].eps: 1e-08 -> 1e-06"]),
    (lambda opt: opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))], "name": "extra"}),
     None),
])
def test_a_user_edit_changes_the_signature_and_the_diff_names_the_field(edit, expected):
    model, optimizer = build()
    before, signature = capture_config(optimizer), group_signature(optimizer)
    snapshot = GroupsSnapshot(optimizer)
    assert snapshot.unchanged()
    edit(optimizer)
    assert not snapshot.unchanged()  # the every-step fast check sees it too
    assert group_signature(optimizer) != signature
    after = capture_config(optimizer)
    assert config_hash(after) != config_hash(before)
    changed = diff_configs(before, after)
    if expected is not None:
        assert changed == expected
    else:
        assert "param_groups.length: 2 -> 3" in changed
        assert "param_groups[2].name: (absent) -> \"extra\"" in changed


def test_group_signature_never_reads_a_tensor_value():
    model, optimizer = build(lr=torch.tensor(1e-3))

    class Trap(torch.Tensor):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            raise AssertionError(f"read {func}")

    optimizer.param_groups[0]["weight_decay"] = torch.tensor(0.1).as_subclass(Trap)
    first = group_signature(optimizer)
    assert group_signature(optimizer) == first


def test_write_config_file_writes_what_policy_check_reads(tmp_path):
    model, optimizer = build()
    path = tmp_path / "c.json"
    data = write_config_file(str(path), optimizer, job="prod-x", features={"guard": True})
    loaded = json.loads(path.read_text())
    assert loaded == data and loaded["config_hash"] == config_hash(capture_config(optimizer))


@pytest.mark.parametrize("make_scheduler", [
    lambda opt: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=2, T_mult=2),
    lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0),
    lambda opt: torch.optim.lr_scheduler.CyclicLR(opt, base_lr=1e-4, max_lr=1e-3, step_size_up=2),
    lambda opt: torch.optim.lr_scheduler.SequentialLR(opt, [torch.optim.lr_scheduler.LinearLR(opt, total_iters=2),
                                                             torch.optim.lr_scheduler.StepLR(opt, 3)], [2]),
])
def test_a_scheduler_stepping_through_its_cycles_keeps_the_fingerprint(make_scheduler):
    model, optimizer = build(fused=False)
    scheduler = make_scheduler(optimizer)
    first = capture_config(optimizer, scheduler)
    for i in range(9):
        model(torch.randn(3, 4)).sum().backward()
        optimizer.step()
        scheduler.step(float(i)) if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) \
            else scheduler.step()
        optimizer.zero_grad()
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        # it keeps no peak: the rate it cut is reported, and a restore does not compare it
        assert diff_configs(first, capture_config(optimizer, scheduler)) == [
            f"param_groups[{i}].peak_lr: 0.001 -> 1e-08" for i in range(2)]
        assert config_differences({"optimizer_config": first}, optimizer, scheduler, None) == []
    else:
        assert diff_configs(first, capture_config(optimizer, scheduler)) == []


def test_the_snapshot_check_ignores_the_schedule_and_sees_in_place_list_edits():
    model, optimizer = build()
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    snapshot = GroupsSnapshot(optimizer)
    train(model, optimizer, scheduler, 3)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 / 8)
    assert snapshot.unchanged()  # only lr moved: no signature to compute
    signature = group_signature(optimizer)
    optimizer.param_groups[1]["params"].append(torch.nn.Parameter(torch.zeros(2)))  # in place
    assert not snapshot.unchanged()
    assert group_signature(optimizer) != signature
    snapshot.take()
    assert snapshot.unchanged()
    signature = group_signature(optimizer)
    optimizer.param_groups[0]["weight_decay"] = float("0.01")  # the same value, a new object
    assert not snapshot.unchanged()  # so the signature is computed, and it says: no change
    assert group_signature(optimizer) == signature
