"""Remediator: each action applied, validated, and never raising."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adamwatch.checkpoint import Checkpointer
from adamwatch.lr_control import LRRecovery
from adamwatch.remediation import Action, Remediator

from ._training import make_model, make_optimizer, train_steps


def _setup(tmp_path: Path | None = None, **kwargs):
    model = make_model()
    optimizer = make_optimizer(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 1.0 / (1 + 0.1 * e))
    ckpt = None
    if tmp_path is not None:
        ckpt = Checkpointer(tmp_path, model=model, optimizer=optimizer, scheduler=scheduler, good_window=1)
    return model, optimizer, scheduler, ckpt, Remediator(optimizer, scheduler, ckpt, **kwargs)


def test_reduce_lr_applies_and_persists() -> None:
    model, optimizer, scheduler, _, remediator = _setup()
    train_steps(model, optimizer, scheduler, steps=2)
    before = optimizer.param_groups[0]["lr"]
    result = remediator.apply(Action("reduce_lr", {"factor": 0.5}, reason="spike"), step=2)
    assert (result.outcome, result.step) == ("applied", 2)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(before * 0.5)
    assert remediator.lr_scale == 0.5 and result.data["lr_scales"] == [0.5]
    train_steps(model, optimizer, scheduler, steps=3)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * 1e-2 / (1 + 0.1 * 5))
    remediator.apply(Action("reduce_lr", {"factor": 0.5}), step=5)
    assert remediator.lr_scale == 0.25


@pytest.mark.parametrize(
    "action, field",
    [
        (Action("reduce_lr", {"factor": 0}), "factor"),
        (Action("reduce_lr", {"factor": 1.5}), "factor"),
        (Action("reduce_lr", {"factor": "half"}), "factor"),
        (Action("reduce_lr", {"factor": True}), "factor"),
        (Action("reduce_lr", {"factor": float("nan")}), "factor"),
        (Action("reduce_lr", {}), "factor"),
        (Action("reduce_lr", {"factor": 0.5, "speed": 2}), "speed"),
        (Action("restore_checkpoint", {"step": -3}), "step"),
        (Action("restore_checkpoint", {"step": "latest"}), "step"),
        (Action("restore_checkpoint", {"step": 3, "before_step": 5}), "before_step"),
        (Action("restore_checkpoint", {}), "checkpointer"),
        (Action("stop", {"now": True}), "now"),
        (Action("explode", {}), "kind"),
        (Action("reduce_lr", ["factor", 0.5]), "args"),
    ],
)
def test_bad_actions_are_rejected_naming_the_field(action: Action, field: str) -> None:
    model, optimizer, scheduler, _, remediator = _setup()
    lrs = [g["lr"] for g in optimizer.param_groups]
    result = remediator.apply(action, step=7)
    assert result.outcome == "rejected" and result.step is None
    assert result.detail.startswith(field), result.detail
    assert [g["lr"] for g in optimizer.param_groups] == lrs
    assert not remediator.stop_requested


def test_restore_keeps_the_cut_in_force(tmp_path: Path) -> None:
    model, optimizer, scheduler, ckpt, remediator = _setup(tmp_path)
    for step in range(1, 7):
        train_steps(model, optimizer, scheduler, steps=1)
        if step == 3:
            ckpt.save(3)
            saved = [p.detach().clone() for p in model.parameters()]
        ckpt.note_step(step, True)
    remediator.apply(Action("reduce_lr", {"factor": 0.5}), step=6)
    result = remediator.apply(Action("restore_checkpoint", {"step": None}), step=6)
    assert result.outcome == "applied", result.detail
    assert result.data["restored_step"] == 3
    assert all(torch.equal(p, s) for p, s in zip(model.parameters(), saved))
    # lr of step 3's schedule, still halved
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * 1e-2 / (1 + 0.1 * 3))
    train_steps(model, optimizer, scheduler, steps=2)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * 1e-2 / (1 + 0.1 * 5))
    assert result.to_ack() == {
        "id": result.action.id, "action": "restore_checkpoint", "outcome": "applied", "step": 6,
        "detail": "restored checkpoint of step 3",
    }


def test_restore_can_drop_the_cut(tmp_path: Path) -> None:
    model, optimizer, scheduler, ckpt, remediator = _setup(tmp_path, keep_lr_cut_on_restore=False)
    train_steps(model, optimizer, scheduler, steps=1)
    ckpt.save(1)
    remediator.apply(Action("reduce_lr", {"factor": 0.5}), step=1)
    assert remediator.apply(Action("restore_checkpoint", {"step": 1}), step=1).outcome == "applied"
    assert remediator.lr_scale == 1.0


def test_failed_restore_is_failed_not_raised(tmp_path: Path) -> None:
    _, _, _, _, remediator = _setup(tmp_path)
    result = remediator.apply(Action("restore_checkpoint", {}), step=4)
    assert result.outcome == "failed"
    assert "NoUsableCheckpointError" in result.detail and str(tmp_path) in result.detail


def test_stop_sets_flag_and_calls_on_stop_once() -> None:
    calls = []
    _, _, _, _, remediator = _setup(on_stop=lambda: calls.append(1))
    assert remediator.apply(Action("stop", {}), step=9).outcome == "applied"
    assert remediator.apply(Action("stop"), step=10).outcome == "applied"
    assert remediator.stop_requested and calls == [1]


def test_on_stop_failure_still_stops() -> None:
    def boom() -> None:
        raise RuntimeError("nope")

    _, _, _, _, remediator = _setup(on_stop=boom)
    result = remediator.apply(Action("stop"), step=1)
    assert result.outcome == "applied" and "nope" in result.detail and remediator.stop_requested


def test_lr_floor_applies() -> None:
    _, optimizer, _, _, remediator = _setup(lr_floor=4e-3)
    result = remediator.apply(Action("reduce_lr", {"factor": 0.1}), step=0)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(4e-3)
    assert "floor" in result.detail


def test_recovery_is_off_by_default_and_gradual_when_on() -> None:
    _, _, _, _, plain = _setup()
    plain.apply(Action("reduce_lr", {"factor": 0.25}), step=0)
    for step in range(1000):
        plain.note_step(step, True)
    assert plain.pending_actions() == []

    model, optimizer, scheduler, _, remediator = _setup(lr_recovery=LRRecovery(after_steps=3, growth=2.0))
    remediator.apply(Action("reduce_lr", {"factor": 0.25}), step=0)
    scales = []
    for step in range(1, 12):
        remediator.note_step(step, healthy=step != 2)
        for action in remediator.pending_actions():
            assert action.kind == "recover_lr" and action.source == "recovery"
            assert remediator.apply(action, step).outcome == "applied"
        scales.append(remediator.lr_scale)
    # unhealthy step 2 restarts the count: 0.5 after steps 3-5, 1.0 after 6-8, then nothing to do
    assert scales == [0.25, 0.25, 0.25, 0.25, 0.5, 0.5, 0.5, 1.0, 1.0, 1.0, 1.0]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-2)


def test_action_round_trips_through_dict_and_command() -> None:
    action = Action("reduce_lr", {"factor": 0.5}, reason="loss spike")
    assert Action.from_dict(action.to_dict()) == action
    command = {"id": "c1", "action": "restore_checkpoint", "args": {"step": None}, "reason": "r", "step": 12}
    built = Action.from_command(command)
    assert (built.kind, built.args, built.id, built.source) == ("restore_checkpoint", {"step": None}, "c1", "sidecar")
    assert Action("stop").id != Action("stop").id


def test_resolve_pins_the_restore_step(tmp_path: Path) -> None:
    model, optimizer, scheduler, ckpt, remediator = _setup(tmp_path)
    for step in range(1, 8):
        train_steps(model, optimizer, scheduler, steps=1)
        if step in (2, 4):
            ckpt.save(step)
        ckpt.note_step(step, True)
    pinned = remediator.resolve(Action("restore_checkpoint", {"step": None, "before_step": 4}, id="x"))
    assert pinned.args == {"step": 2} and pinned.id == "x"
    other = Action("reduce_lr", {"factor": 0.5})
    assert remediator.resolve(other) is other


def test_restore_after_scheduler_step_is_exact_and_before_it_is_not(tmp_path: Path) -> None:
    """Restoring between optimizer.step() and scheduler.step() shifts the schedule by one."""
    from adamwatch.remediation import after_scheduler_step

    def run(boundary: str):
        torch.manual_seed(0)
        model, optimizer, scheduler, ckpt, remediator = _setup(tmp_path / boundary)
        queued: list[Action] = []
        step = 0

        def apply_queued() -> None:
            while queued:
                result = remediator.apply(queued.pop(), step)
                assert result.outcome == "applied", result.detail
                nonlocal_step[0] = result.data["restored_step"]

        nonlocal_step = [0]
        hook = after_scheduler_step(scheduler, apply_queued) if boundary == "after_scheduler" else None
        lrs = {}
        for _ in range(10):
            step = nonlocal_step[0] + 1
            nonlocal_step[0] = step
            loss = model(torch.randn(2, 8)).square().mean()
            optimizer.zero_grad(); loss.backward(); optimizer.step()
            if boundary == "after_optimizer":
                apply_queued()
            scheduler.step()
            lrs.setdefault(nonlocal_step[0], []).append(optimizer.param_groups[0]["lr"])
            if nonlocal_step[0] == 3 and not (tmp_path / boundary / "step-000000000003").exists():
                ckpt.save(3)
            if step == 6 and len(lrs[6]) == 1:
                queued.append(Action("restore_checkpoint", {"step": 3}))
        if hook is not None:
            hook.remove()
        return lrs

    exact = run("after_scheduler")
    assert all(len(set(v)) == 1 for v in exact.values()), exact  # every step saw the same lr twice
    shifted = run("after_optimizer")
    assert any(len(set(v)) > 1 for v in shifted.values()), shifted


@pytest.mark.parametrize("kind", ["LambdaLR", "SequentialLR", "ReduceLROnPlateau"])
def test_scheduler_hook_keeps_state_dict_clean_and_removes(kind: str) -> None:
    from adamwatch.remediation import after_scheduler_step

    optimizer = make_optimizer(make_model())
    S = torch.optim.lr_scheduler
    scheduler = {
        "LambdaLR": lambda: S.LambdaLR(optimizer, lambda e: 0.9**e),
        "SequentialLR": lambda: S.SequentialLR(
            optimizer, [S.ConstantLR(optimizer, 0.5, total_iters=2), S.ExponentialLR(optimizer, 0.9)], milestones=[2]
        ),
        "ReduceLROnPlateau": lambda: S.ReduceLROnPlateau(optimizer, patience=0),
    }[kind]()
    keys = set(scheduler.state_dict())
    calls = []
    hook = after_scheduler_step(scheduler, lambda: calls.append(1))
    args = (1.0,) if kind == "ReduceLROnPlateau" else ()
    optimizer.step()
    scheduler.step(*args); scheduler.step(*args)
    assert calls == [1, 1]
    assert set(scheduler.state_dict()) == keys
    assert isinstance(scheduler, S.LRScheduler)
    hook.remove(); hook.remove()
    scheduler.step(*args)
    assert calls == [1, 1]
