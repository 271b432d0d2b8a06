"""Remediation actions through the Monitor: in process and as sidecar commands, at step boundaries."""

from __future__ import annotations

import torch

import adamwatch
from adamwatch import wire

from .test_monitor import batch, make_model, make_optimizer


def train(model, opt, sched, monitor, steps, start=0, nan_at=()):
    for i in range(start, start + steps):
        x, y = batch(i)
        loss = torch.nn.functional.mse_loss(model(x), y)
        if i in nan_at:
            loss = loss * float("nan")
        loss.backward()
        monitor.observe_loss(loss)
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad()


def test_reduce_lr_applies_at_the_next_boundary_and_survives_the_scheduler(sink):
    model = make_model()
    opt = make_optimizer(model, "AdamW", "fused")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    ref_model = make_model()
    ref_opt = make_optimizer(ref_model, "AdamW", "fused")
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref_opt, lambda s: min(1.0, (s + 1) / 10))
    with adamwatch.watch(opt, scheduler=sched, endpoint=sink.endpoint) as monitor:
        train(model, opt, sched, monitor, 3)
        action_id = monitor.reduce_lr(0.5)
        assert opt.param_groups[0]["lr"] == ref_sched.get_last_lr()[0] * 0 + sched.get_last_lr()[0]  # not yet
        with adamwatch.watch(ref_opt, scheduler=ref_sched) as ref_monitor:
            train(ref_model, ref_opt, ref_sched, ref_monitor, 3)
            train(model, opt, sched, monitor, 5, start=3)
            train(ref_model, ref_opt, ref_sched, ref_monitor, 5, start=3)
        assert monitor.lr_scale == 0.5
    for g, ref in zip(opt.param_groups, ref_opt.param_groups):
        assert g["lr"] == ref["lr"] * 0.5
    assert isinstance(action_id, str)


def test_sidecar_command_is_acknowledged_with_the_step_it_took_effect(sink):
    model = make_model()
    opt = make_optimizer(model, "Adam", "foreach")
    with adamwatch.watch(opt, endpoint=sink.endpoint) as monitor:
        train(model, opt, None, monitor, 2)
        sink.wait_for(lambda: len(sink.steps()) == 2)
        sink.send_command({"id": "cmd-1", "action": "reduce_lr", "args": {"factor": 0.25}, "reason": "test", "step": 2})
        lr_before = opt.param_groups[0]["lr"]
        deadline_steps = 0
        while not sink.of_type(wire.MessageType.ACK) and deadline_steps < 500:
            train(model, opt, None, monitor, 1, start=2 + deadline_steps)
            deadline_steps += 1
        sink.wait_for(lambda: sink.of_type(wire.MessageType.ACK))
        ack = sink.of_type(wire.MessageType.ACK)[0]
        sink.send_command({"id": "cmd-2", "action": "explode", "args": {}})
        for i in range(2000):  # fast steps: the client batches, so keep stepping until it answers
            if len(sink.of_type(wire.MessageType.ACK)) == 2:
                break
            train(model, opt, None, monitor, 1, start=600 + i)
        sink.wait_for(lambda: len(sink.of_type(wire.MessageType.ACK)) == 2)
    assert ack["id"] == "cmd-1" and ack["action"] == "reduce_lr" and ack["outcome"] == "applied"
    assert ack["step"] >= 2 and ack["lr_scale"] == 0.25
    assert opt.param_groups[0]["lr"] == lr_before * 0.25
    rejected = sink.of_type(wire.MessageType.ACK)[1]
    assert rejected["id"] == "cmd-2" and rejected["outcome"] == "rejected" and "explode" in rejected["detail"]


def test_restore_checkpoint_returns_to_the_known_good_state(sink, tmp_path):
    model = make_model()
    opt = make_optimizer(model, "AdamW", "fused")
    ckpt = adamwatch.Checkpointer(tmp_path / "ckpt", model=model, optimizer=opt, good_window=2)
    with adamwatch.watch(opt, endpoint=sink.endpoint, checkpointer=ckpt, deep_stats_every=0) as monitor:
        train(model, opt, None, monitor, 5)
        ckpt.save(5)
        saved = [p.detach().clone() for p in model.parameters()]
        train(model, opt, None, monitor, 4, start=5)
        sink.wait_for(lambda: any(m.get("event") == "known_good" for m in sink.of_type(wire.MessageType.CHECKPOINT)))
        monitor.restore_checkpoint()
        train(model, opt, None, monitor, 1, start=9)  # the restore happens after this step
        assert monitor.step == 5
        assert all(torch.equal(p, s) for p, s in zip(model.parameters(), saved))
        train(model, opt, None, monitor, 1, start=10)
    sink.wait_for(lambda: sink.of_type(wire.MessageType.GOODBYE))
    assert [s["step"] for s in sink.steps()][-3:] == [9, 10, 6]
    events = [m["event"] for m in sink.of_type(wire.MessageType.CHECKPOINT)]
    assert events[:2] == ["saved", "known_good"] and "restored" in events


def test_stop_command_sets_stop_requested(sink):
    stopped = []
    model = make_model()
    opt = make_optimizer(model)
    with adamwatch.watch(opt, endpoint=sink.endpoint, on_stop=lambda: stopped.append(True)) as monitor:
        train(model, opt, None, monitor, 1)
        sink.wait_for(lambda: sink.connections)
        sink.send_command({"id": "stop-1", "action": "stop", "reason": "ladder exhausted"})
        for i in range(200):
            if monitor.stop_requested:
                break
            train(model, opt, None, monitor, 1, start=i + 1)
        assert monitor.stop_requested and stopped == [True]


def test_restore_keeps_the_schedule_exact(sink, tmp_path):
    """The restored run continues with the lr the original run had after the checkpoint's step."""
    def lambda_schedule(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))

    ref_model = make_model()
    ref_opt = make_optimizer(ref_model, "AdamW", "foreach")
    ref_sched = lambda_schedule(ref_opt)
    lrs = []
    for i in range(8):
        lrs.append([g["lr"] for g in ref_opt.param_groups])
        ref_opt.step()
        ref_sched.step()

    model = make_model()
    opt = make_optimizer(model, "AdamW", "foreach")
    sched = lambda_schedule(opt)
    ckpt = adamwatch.Checkpointer(tmp_path / "ckpt", model=model, optimizer=opt, scheduler=sched, good_window=0)
    with adamwatch.watch(opt, scheduler=sched, endpoint=sink.endpoint, checkpointer=ckpt) as monitor:
        train(model, opt, sched, monitor, 5)
        ckpt.save(monitor.step)
        train(model, opt, sched, monitor, 3, start=5)
        monitor.restore_checkpoint(step=5)
        train(model, opt, sched, monitor, 1, start=8)  # restored after this step's optimizer.step()
        assert monitor.step == 5
        # Iteration 6 of the original run used lrs[5]; the restored run must too.
        assert [g["lr"] for g in opt.param_groups] == lrs[5]
        train(model, opt, sched, monitor, 1, start=9)
        assert [g["lr"] for g in opt.param_groups] == lrs[6]
    assert "step" not in vars(sched)  # the temporary skip is gone


def test_a_checkpoint_saved_right_after_a_restore_still_pickles(sink, tmp_path):
    """With a per-epoch scheduler, the next save can come before the next scheduler.step()."""
    model = make_model()
    opt = make_optimizer(model, "AdamW", "foreach")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
    ckpt = adamwatch.Checkpointer(tmp_path / "ckpt", model=model, optimizer=opt, scheduler=sched, good_window=0)
    with adamwatch.watch(opt, scheduler=sched, endpoint=sink.endpoint, checkpointer=ckpt) as monitor:
        train(model, opt, None, monitor, 3)
        ckpt.save(monitor.step)
        train(model, opt, None, monitor, 2, start=3)
        monitor.restore_checkpoint(step=3)
        train(model, opt, None, monitor, 1, start=5)  # restored; no scheduler.step() this epoch yet
        assert monitor.step == 3
        ckpt.save(10)  # must not fail to pickle the scheduler
        assert type(sched) is not torch.optim.lr_scheduler.StepLR  # the one-shot skip is armed
        train(model, opt, None, monitor, 1, start=6)  # next optimizer step disarms it
        assert type(sched) is torch.optim.lr_scheduler.StepLR
