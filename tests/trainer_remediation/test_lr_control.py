"""An LR cut must survive every torch scheduler's step(): lr == factor x uncut, always."""

from __future__ import annotations

import math

import pytest
import torch
from torch.optim import lr_scheduler as S

from adamwatch.lr_control import (
    LR_SCALE_KEY,
    LRRecovery,
    current_lr_scales,
    scale_learning_rate,
    set_learning_rate_scale,
)

TOTAL = 40


def _optimizer() -> torch.optim.Optimizer:
    a = torch.nn.Parameter(torch.zeros(2))
    b = torch.nn.Parameter(torch.zeros(2))
    return torch.optim.AdamW([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.03}])


def _warmup_cosine(step: int) -> float:
    if step < 5:
        return (step + 1) / 5
    return 0.5 * (1 + math.cos(math.pi * (step - 5) / (TOTAL - 5)))


SCHEDULERS = {
    "none": lambda o: None,
    "LambdaLR": lambda o: S.LambdaLR(o, _warmup_cosine),
    "StepLR": lambda o: S.StepLR(o, step_size=4, gamma=0.5),
    "MultiStepLR": lambda o: S.MultiStepLR(o, milestones=[3, 9, 9, 20], gamma=0.3),
    "ExponentialLR": lambda o: S.ExponentialLR(o, gamma=0.9),
    "CosineAnnealingLR": lambda o: S.CosineAnnealingLR(o, T_max=10, eta_min=0.001),
    "CosineAnnealingWarmRestarts": lambda o: S.CosineAnnealingWarmRestarts(o, T_0=5, T_mult=2, eta_min=0.002),
    "OneCycleLR": lambda o: S.OneCycleLR(o, max_lr=[0.2, 0.05], total_steps=TOTAL + 5),
    "OneCycleLR-linear-3phase": lambda o: S.OneCycleLR(
        o, max_lr=0.2, total_steps=TOTAL + 5, anneal_strategy="linear", three_phase=True
    ),
    "LinearLR": lambda o: S.LinearLR(o, start_factor=0.1, end_factor=1.0, total_iters=8),
    "ConstantLR": lambda o: S.ConstantLR(o, factor=0.25, total_iters=6),
    "PolynomialLR": lambda o: S.PolynomialLR(o, total_iters=30, power=2.0),
    "MultiplicativeLR": lambda o: S.MultiplicativeLR(o, lambda e: 0.95),
    "CyclicLR": lambda o: S.CyclicLR(o, base_lr=0.01, max_lr=[0.1, 0.05], step_size_up=4, cycle_momentum=False),
    "SequentialLR": lambda o: S.SequentialLR(
        o,
        [S.LinearLR(o, start_factor=0.1, total_iters=5), S.CosineAnnealingLR(o, T_max=20, eta_min=0.001)],
        milestones=[5],
    ),
    "SequentialLR-3": lambda o: S.SequentialLR(
        o,
        [
            S.ConstantLR(o, factor=0.5, total_iters=3),
            S.ExponentialLR(o, gamma=0.9),
            S.LambdaLR(o, lambda e: 1.0 / (1 + e)),
        ],
        milestones=[4, 12],
    ),
    "ChainedScheduler": lambda o: S.ChainedScheduler(
        [S.ConstantLR(o, factor=0.1, total_iters=6), S.ExponentialLR(o, gamma=0.9)]
    ),
    "ChainedScheduler-cosine": lambda o: S.ChainedScheduler(
        [S.LinearLR(o, start_factor=0.2, total_iters=5), S.CosineAnnealingLR(o, T_max=15, eta_min=0.001)]
    ),
    "ReduceLROnPlateau": lambda o: S.ReduceLROnPlateau(o, factor=0.5, patience=1, min_lr=[0.004, 0.001]),
}

# a loss that improves, then plateaus: ReduceLROnPlateau cuts several times
PLATEAU_METRICS = [1.0, 0.9, 0.8] + [0.8] * 60


def _run(name: str, cut_at: int | None, factor: float, *, floor: float = 0.0) -> list[list[float]]:
    optimizer = _optimizer()
    scheduler = SCHEDULERS[name](optimizer)
    lrs = []
    for step in range(TOTAL):
        if step == cut_at:
            scale_learning_rate(optimizer, scheduler, factor, floor=floor)
        lrs.append([float(g["lr"]) for g in optimizer.param_groups])
        optimizer.step()
        if isinstance(scheduler, S.ReduceLROnPlateau):
            scheduler.step(PLATEAU_METRICS[step])
        elif scheduler is not None:
            scheduler.step()
    return lrs


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
@pytest.mark.parametrize("cut_at", [0, 3, 9])
def test_cut_persists_across_scheduler_steps(name: str, cut_at: int) -> None:
    factor = 0.3
    reference = _run(name, None, factor)
    cut = _run(name, cut_at, factor)
    for step in range(TOTAL):
        expected_scale = factor if step >= cut_at else 1.0
        for group, (ref, got) in enumerate(zip(reference[step], cut[step])):
            assert got == pytest.approx(ref * expected_scale, rel=1e-9, abs=1e-15), (
                f"{name}: step {step} group {group}: lr {got} != {expected_scale} x {ref}"
            )


@pytest.mark.parametrize("name", ["LambdaLR", "OneCycleLR", "CosineAnnealingWarmRestarts", "SequentialLR", "StepLR"])
def test_two_cuts_compound(name: str) -> None:
    optimizer_ref, optimizer = _optimizer(), _optimizer()
    sched_ref, sched = SCHEDULERS[name](optimizer_ref), SCHEDULERS[name](optimizer)
    for step in range(TOTAL):
        if step == 4:
            scale_learning_rate(optimizer, sched, 0.5)
        if step == 11:
            scale_learning_rate(optimizer, sched, 0.2)
        scale = 1.0 if step < 4 else 0.5 if step < 11 else 0.1
        for g_ref, g in zip(optimizer_ref.param_groups, optimizer.param_groups):
            assert g["lr"] == pytest.approx(scale * g_ref["lr"], rel=1e-9)
        optimizer_ref.step(); optimizer.step(); sched_ref.step(); sched.step()
    assert current_lr_scales(optimizer) == pytest.approx([0.1, 0.1])


def test_cut_survives_optimizer_and_scheduler_state_dict_round_trip() -> None:
    optimizer = _optimizer()
    scheduler = SCHEDULERS["LambdaLR"](optimizer)
    for _ in range(3):
        optimizer.step(); scheduler.step()
    scale_learning_rate(optimizer, scheduler, 0.5)
    saved_opt, saved_sched = optimizer.state_dict(), scheduler.state_dict()
    fresh = _optimizer()
    fresh_sched = SCHEDULERS["LambdaLR"](fresh)
    fresh.load_state_dict(saved_opt); fresh_sched.load_state_dict(saved_sched)
    reference = _optimizer(); ref_sched = SCHEDULERS["LambdaLR"](reference)
    for _ in range(3):
        reference.step(); ref_sched.step()
    assert current_lr_scales(fresh) == [0.5, 0.5]
    for _ in range(10):
        fresh.step(); fresh_sched.step(); reference.step(); ref_sched.step()
        for g, g_ref in zip(fresh.param_groups, reference.param_groups):
            assert g["lr"] == pytest.approx(0.5 * g_ref["lr"], rel=1e-12)


def test_floor_bounds_the_cut_per_group() -> None:
    optimizer = _optimizer()  # lrs 0.1 and 0.03
    applied = scale_learning_rate(optimizer, None, 0.1, floor=0.02)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.02, 0.02])
    assert applied == pytest.approx([0.2, 0.02 / 0.03])
    # already at the floor: nothing moves
    assert scale_learning_rate(optimizer, None, 0.5, floor=0.02) == [1.0, 1.0]
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.02, 0.02])
    # one floor per group
    optimizer = _optimizer()
    scale_learning_rate(optimizer, None, 0.01, floor=[0.05, 0.0])
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.05, 0.0003])


def test_floor_keeps_scheduler_consistent() -> None:
    optimizer_ref, optimizer = _optimizer(), _optimizer()
    sched_ref, sched = S.StepLR(optimizer_ref, 3, 0.5), S.StepLR(optimizer, 3, 0.5)
    applied = scale_learning_rate(optimizer, sched, 0.1, floor=0.02)
    for _ in range(10):
        optimizer_ref.step(); optimizer.step(); sched_ref.step(); sched.step()
        for g, g_ref, f in zip(optimizer.param_groups, optimizer_ref.param_groups, applied):
            assert g["lr"] == pytest.approx(f * g_ref["lr"], rel=1e-12)


@pytest.mark.parametrize("bad", [0, -0.5, 1.5, float("nan"), float("inf")])
def test_factor_out_of_range_is_rejected_naming_factor(bad: float) -> None:
    optimizer = _optimizer()
    with pytest.raises(ValueError, match="factor"):
        scale_learning_rate(optimizer, None, bad)
    assert [g["lr"] for g in optimizer.param_groups] == [0.1, 0.03]


def test_bad_floor_is_rejected_naming_floor() -> None:
    with pytest.raises(ValueError, match="floor"):
        scale_learning_rate(_optimizer(), None, 0.5, floor=[0.1])
    with pytest.raises(ValueError, match="floor"):
        scale_learning_rate(_optimizer(), None, 0.5, floor=-1.0)


def test_tensor_lr_is_scaled_in_place() -> None:
    p = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.Adam([p], lr=torch.tensor(0.01), fused=True)
    lr_tensor = optimizer.param_groups[0]["lr"]
    scheduler = S.ExponentialLR(optimizer, gamma=0.5)
    scale_learning_rate(optimizer, scheduler, 0.5)
    assert optimizer.param_groups[0]["lr"] is lr_tensor
    assert float(lr_tensor) == pytest.approx(0.005)
    optimizer.step(); scheduler.step()
    assert float(optimizer.param_groups[0]["lr"]) == pytest.approx(0.0025)


def test_set_scale_recovers_to_the_uncut_schedule() -> None:
    optimizer_ref, optimizer = _optimizer(), _optimizer()
    sched_ref, sched = SCHEDULERS["OneCycleLR"](optimizer_ref), SCHEDULERS["OneCycleLR"](optimizer)
    scale_learning_rate(optimizer, sched, 0.25)
    for _ in range(5):
        optimizer_ref.step(); optimizer.step(); sched_ref.step(); sched.step()
    set_learning_rate_scale(optimizer, sched, 0.5)
    assert optimizer.param_groups[0][LR_SCALE_KEY] == 0.5
    set_learning_rate_scale(optimizer, sched, 1.0)
    for _ in range(5):
        optimizer_ref.step(); optimizer.step(); sched_ref.step(); sched.step()
        for g, g_ref in zip(optimizer.param_groups, optimizer_ref.param_groups):
            assert g["lr"] == pytest.approx(g_ref["lr"], rel=1e-12)


def test_lr_recovery_needs_consecutive_healthy_steps() -> None:
    recovery = LRRecovery(after_steps=3, growth=2.0)
    for healthy in (True, True, False, True, True):
        recovery.note(healthy)
    assert recovery.next_scale(0.25) is None
    recovery.note(True)
    assert recovery.next_scale(0.25) == 0.5
    assert recovery.next_scale(0.5) is None  # the count started again
    for _ in range(3):
        recovery.note(True)
    assert recovery.next_scale(0.75) == 1.0  # capped at the uncut schedule
    for _ in range(3):
        recovery.note(True)
    assert recovery.next_scale(1.0) is None
    with pytest.raises(ValueError, match="after_steps"):
        LRRecovery(after_steps=0)
    with pytest.raises(ValueError, match="growth"):
        LRRecovery(growth=1.0)
