"""The step-path contract: summarize_step(), step extensions, STEP extras, pre-clip norms, loss windows.

Every test reads back what a real Monitor sent over a real socket and compares it
with values computed here from the same tensors.
"""

from __future__ import annotations

import math

import pytest
import torch

import adamwatch
from adamwatch import grad_clip
from adamwatch.step_extensions import StepContext

from .test_monitor import batch, make_model, make_optimizer
from .test_no_host_sync import HostReadCounter


def true_norms(opt) -> tuple[float, list[float]]:
    grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads).item()
    groups = [torch.nn.utils.get_total_norm([p.grad for p in g["params"]]).item() for g in opt.param_groups]
    return total, groups


def loss_of(model, seed, scale=1.0):
    x, y = batch(seed)
    return torch.nn.functional.mse_loss(model(x), y) * scale


# --------------------------------------------------------------------- summarize_step
@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_summarize_step_inside_the_closure_reports_this_steps_gradients_and_loss(sink, impl):
    """Lightning's automatic optimisation: backward runs inside optimizer.step(closure),
    after the pre-step hook. The adapter's summarize_step() gives this step's numbers."""
    model = make_model()
    opt = make_optimizer(model, "AdamW", impl)
    seen = []
    with adamwatch.watch(opt, endpoint=sink.endpoint, deep_stats_every=0) as monitor:
        for i in range(5):
            def closure(i=i):
                opt.zero_grad()
                loss = loss_of(model, i, scale=float(i + 1))  # norms differ a lot between steps
                loss.backward()
                monitor.observe_loss(loss)
                monitor.summarize_step()  # the adapter's on_before_optimizer_step
                seen.append((loss.item(), *true_norms(opt)))
                return loss

            opt.step(closure)
        assert monitor.errors == 0
    sink.wait_for(lambda: len(sink.steps()) == 5)
    for step, (loss, total, groups) in zip(sink.steps(), seen):
        assert step["loss"] == pytest.approx(loss, rel=1e-6)
        assert step["grad_norm"] == pytest.approx(total, rel=1e-5)
        assert step["group_grad_norms"] == pytest.approx(groups, rel=1e-5)
        assert step["skipped"] is False


def test_the_fused_guard_protects_the_step_summarize_step_flags(sink):
    model = make_model()
    opt = make_optimizer(model, "AdamW", "fused")
    with adamwatch.watch(opt, endpoint=sink.endpoint, deep_stats_every=0) as monitor:
        for i in range(4):
            nan_step = i == 2
            before = [p.detach().clone() for p in model.parameters()]

            def closure(i=i, nan_step=nan_step):
                opt.zero_grad()
                loss = loss_of(model, i, scale=float("nan") if nan_step else 1.0)
                loss.backward()
                monitor.observe_loss(loss)
                monitor.summarize_step()
                return loss

            counter = HostReadCounter()
            with counter.counting():
                opt.step(closure)
            assert counter.calls == []  # summary, guard and update without one host read
            unchanged = all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
            assert unchanged == nan_step, f"step {i + 1}: params {'changed' if not unchanged else 'unchanged'}"
            assert all(torch.isfinite(p).all() for p in model.parameters())
    sink.wait_for(lambda: len(sink.steps()) == 4)
    steps = sink.steps()
    assert [s["skipped"] for s in steps] == [False, False, True, False]
    assert steps[2]["skip_reason"] == "guard" and steps[2]["loss_nonfinite"] is True


class CountingExtension:
    def __init__(self):
        self.steps: list[int] = []

    def on_summary(self, ctx: StepContext) -> None:
        self.steps.append(ctx.step)


def test_summarize_step_before_optimizer_step_is_not_repeated_by_the_pre_step_hook(sink):
    """HF Trainer's on_pre_optimizer_step: summarised before optimizer.step(), once."""
    model = make_model()
    opt = make_optimizer(model, "AdamW", "foreach")
    counter = CountingExtension()
    seen = []
    with adamwatch.watch(opt, endpoint=sink.endpoint, deep_stats_every=0) as monitor:
        monitor.add_step_extension(counter)
        for i in range(3):
            loss = loss_of(model, i)
            loss.backward()
            monitor.observe_loss(loss)
            monitor.summarize_step()
            seen.append(true_norms(opt)[0])
            # what happens after the summary (e.g. a user's in-place edit) is not summarised again
            for p in model.parameters():
                p.grad.mul_(10)
            opt.step()
            opt.zero_grad()
    assert counter.steps == [1, 2, 3]
    sink.wait_for(lambda: len(sink.steps()) == 3)
    assert [s["grad_norm"] for s in sink.steps()] == pytest.approx(seen, rel=1e-5)


def test_a_step_the_adapter_forgot_is_summarised_late_and_counted(sink):
    model = make_model()
    opt = make_optimizer(model, "AdamW", "foreach")
    with adamwatch.watch(opt, endpoint=sink.endpoint, deep_stats_every=0) as monitor:
        loss_of(model, 0).backward()
        monitor.summarize_step()
        opt.step()
        opt.zero_grad()
        loss_of(model, 1).backward()
        expected = true_norms(opt)[0]
        opt.step()  # nobody called summarize_step for this one
        assert monitor.errors_by_where == {"summary_missed": 1}
    sink.wait_for(lambda: len(sink.steps()) == 2)
    assert sink.steps()[1]["grad_norm"] == pytest.approx(expected, rel=1e-5)


# --------------------------------------------------------------------- extensions and extras
class DoublingExtension:
    """Replaces the norms (as a cross-rank reduction would) and sends two extras."""

    def on_summary(self, ctx: StepContext) -> None:
        ctx.group_norm_sq = ctx.group_norm_sq * 4  # every norm x2
        ctx.add_extra("loss_x3", ctx.loss * 3)
        ctx.add_extra("groups", float(len(ctx.grads_by_group)))


def test_extensions_replace_norms_and_send_extras(sink):
    model = make_model()
    opt = make_optimizer(model, "AdamW", "foreach")
    seen = []
    with adamwatch.watch(opt, endpoint=sink.endpoint, deep_stats_every=1) as monitor:
        monitor.add_step_extension(DoublingExtension())
        for i in range(2):
            loss = loss_of(model, i)
            loss.backward()
            monitor.observe_loss(loss)
            seen.append((loss.item(), *true_norms(opt)))
            opt.step()
            opt.zero_grad()
    sink.wait_for(lambda: len(sink.steps()) == 2)
    for step, (loss, total, groups) in zip(sink.steps(), seen):
        assert step["grad_norm"] == pytest.approx(2 * total, rel=1e-5)
        assert step["group_grad_norms"] == pytest.approx([2 * g for g in groups], rel=1e-5)
        assert step["extras"] == pytest.approx({"loss_x3": 3 * loss, "groups": 2.0}, rel=1e-6)
        assert "deep" in step  # the deep block after the extras is still decoded


class SkipAboveExtension:
    def __init__(self, threshold: float):
        self.threshold = threshold

    def on_summary(self, ctx: StepContext) -> None:
        ctx.request_skip(ctx.loss > self.threshold, "loss_above")
        ctx.add_extra("seen_nonfinite", ctx.nonfinite.float())


def test_an_extension_can_skip_a_fused_step_with_its_reason_and_no_host_read(sink):
    model = make_model()
    opt = make_optimizer(model, "AdamW", "fused")
    with adamwatch.watch(opt, endpoint=sink.endpoint, deep_stats_every=0) as monitor:
        monitor.add_step_extension(SkipAboveExtension(threshold=100.0))
        loss = loss_of(model, 0)
        loss.backward()
        monitor.observe_loss(loss)
        opt.step()
        opt.zero_grad()
        before = [p.detach().clone() for p in model.parameters()]
        loss = loss_of(model, 1, scale=1000.0)
        loss.backward()
        monitor.observe_loss(loss)
        counter = HostReadCounter()
        with counter.counting():
            opt.step()
        assert counter.calls == []
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    sink.wait_for(lambda: len(sink.steps()) == 2)
    first, second = sink.steps()
    assert first["skipped"] is False and first["extras"]["seen_nonfinite"] == 0.0
    assert second["skipped"] is True and second["skip_reason"] == "loss_above"


class BrokenExtension:
    def on_summary(self, ctx: StepContext) -> None:
        raise RuntimeError("boom")


def test_a_failing_extension_is_counted_and_the_step_still_summarised(sink):
    model = make_model()
    opt = make_optimizer(model, "AdamW", "foreach")
    with adamwatch.watch(opt, endpoint=sink.endpoint, deep_stats_every=0) as monitor:
        monitor.add_step_extension(BrokenExtension())
        monitor.add_step_extension(DoublingExtension())  # later extensions still run
        loss_of(model, 0).backward()
        expected = true_norms(opt)[0]
        opt.step()
        assert monitor.errors_by_where == {"extension": 1}
        with pytest.raises(TypeError, match="on_summary"):
            monitor.add_step_extension(object())
    sink.wait_for(lambda: len(sink.steps()) == 1)
    assert sink.steps()[0]["grad_norm"] == pytest.approx(2 * expected, rel=1e-5)


def test_add_extra_refuses_bad_names_and_values():
    ctx = StepContext(None, 1, [], [], torch.zeros(1), torch.zeros(()), has_loss=False)
    with pytest.raises(ValueError, match="name"):
        ctx.add_extra("", torch.ones(()))
    with pytest.raises(ValueError, match="one value"):
        ctx.add_extra("v", torch.ones(3))
    ctx.add_extra("v", 1.0)
    with pytest.raises(ValueError, match="already"):
        ctx.add_extra("v", 2.0)
    with pytest.raises(ValueError, match="reason"):
        ctx.request_skip(torch.ones((), dtype=torch.bool), "")


# --------------------------------------------------------------------- clipping
@pytest.mark.parametrize("impl", ["for-loop", "foreach", "fused"])
def test_clip_grad_norm_does_not_hide_the_true_norm(sink, impl):
    """clip_grad_norm_(0.5) with true norms 2-4: the exported norm is the true one,
    and the clip is reported (max_norm and coefficient)."""
    model = make_model()
    opt = make_optimizer(model, "AdamW", impl)
    seen = []
    with adamwatch.watch(opt, endpoint=sink.endpoint, deep_stats_every=0) as monitor:
        for i in range(4):
            loss = loss_of(model, i)
            loss.backward()
            monitor.observe_loss(loss)
            factor = (2.0 + 0.6 * i) / true_norms(opt)[0]  # true norms 2.0, 2.6, 3.2, 3.8
            for p in model.parameters():
                p.grad.mul_(factor)
            total, groups = true_norms(opt)
            returned = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            assert returned.item() == pytest.approx(total, rel=1e-5)  # clipping itself unchanged
            assert true_norms(opt)[0] == pytest.approx(0.5, rel=1e-4)
            seen.append((total, groups))
            opt.step()
            opt.zero_grad()
        assert monitor.errors == 0
    sink.wait_for(lambda: len(sink.steps()) == 4)
    assert [t for t, _ in seen] == pytest.approx([2.0, 2.6, 3.2, 3.8], rel=1e-5)
    for step, (total, groups) in zip(sink.steps(), seen):
        assert step["grad_norm"] == pytest.approx(total, rel=1e-5)
        assert step["group_grad_norms"] == pytest.approx(groups, rel=1e-5)
        assert step["clip_max_norm"] == 0.5
        assert step["clip_coefficient"] == pytest.approx(0.5 / (total + 1e-6), rel=1e-6)


def test_clipping_with_the_functional_pieces_and_no_clip_are_reported_too(sink):
    model = make_model()
    opt = make_optimizer(model, "AdamW", "foreach")
    seen = []
    with adamwatch.watch(opt, endpoint=sink.endpoint, deep_stats_every=0):
        for i in range(3):
            loss_of(model, i, scale=50.0).backward()
            total, _ = true_norms(opt)
            seen.append(total)
            params = list(model.parameters())
            if i == 0:  # the norm a user computed themselves, then the clip
                norm = torch.nn.utils.get_total_norm([p.grad for p in params])
                torch.nn.utils.clip_grads_with_norm_(params, 1.0, norm)
            elif i == 1:  # a clip that does not bite
                torch.nn.utils.clip_grad_norm_(params, 1e6)
            opt.step()
            opt.zero_grad()
    sink.wait_for(lambda: len(sink.steps()) == 3)
    first, second, third = sink.steps()
    assert [s["grad_norm"] for s in sink.steps()] == pytest.approx(seen, rel=1e-5)
    assert first["clip_coefficient"] == pytest.approx(1.0 / (seen[0] + 1e-6), rel=1e-6)
    assert second["clip_coefficient"] == 1.0 and second["clip_max_norm"] == 1e6
    assert "clip_coefficient" not in third


def test_clipping_other_parameters_is_not_attributed_to_the_monitor(sink):
    model, other = make_model(0), make_model(1)
    opt = make_optimizer(model, "AdamW", "foreach")
    with adamwatch.watch(opt, endpoint=sink.endpoint, deep_stats_every=0):
        loss_of(model, 0, scale=50.0).backward()
        loss_of(other, 0, scale=50.0).backward()
        expected = true_norms(opt)[0]
        torch.nn.utils.clip_grad_norm_(other.parameters(), 0.1)
        opt.step()
    sink.wait_for(lambda: len(sink.steps()) == 1)
    step = sink.steps()[0]
    assert step["grad_norm"] == pytest.approx(expected, rel=1e-5)
    assert "clip_coefficient" not in step


def test_the_clip_wrapper_lives_exactly_as_long_as_a_monitor(sink):
    original = torch.nn.utils.clip_grads_with_norm_
    assert not grad_clip.installed()
    opt = make_optimizer(make_model())
    a = adamwatch.watch(opt, endpoint=sink.endpoint)
    b = adamwatch.watch(make_optimizer(make_model()), endpoint=sink.endpoint)
    assert grad_clip.installed() and torch.nn.utils.clip_grads_with_norm_ is not original
    a.close()
    assert grad_clip.installed()
    b.close()
    assert not grad_clip.installed() and torch.nn.utils.clip_grads_with_norm_ is original
    assert torch.nn.utils.clip_grad_norm_ is torch.nn.utils.clip_grad.clip_grad_norm_ is grad_clip._original_clip_grad_norm_


def test_clipping_and_watching_share_one_pass_over_the_gradients(sink, monkeypatch):
    """clip_grad_norm_ over the optimizer's gradients takes its total norm from the monitor's
    pass: one foreach norm kernel per step, as with clipping alone."""
    model = make_model()
    opt = make_optimizer(model, "AdamW", "fused")
    calls = []
    real = torch._foreach_norm

    def counted(*args, **kwargs):
        calls.append(len(args[0]))
        return real(*args, **kwargs)

    def clipped_step(seed, monitor=None):
        loss = loss_of(model, seed, scale=50.0)
        loss.backward()
        expected = true_norms(opt)[0]
        monkeypatch.setattr(torch, "_foreach_norm", counted)
        calls.clear()
        returned = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        monkeypatch.setattr(torch, "_foreach_norm", real)
        opt.zero_grad()
        assert returned.dtype == torch.float32 and returned.item() == pytest.approx(expected, rel=1e-6)
        return list(calls), expected

    bare, _ = clipped_step(0)
    with adamwatch.watch(opt, endpoint=sink.endpoint, deep_stats_every=0):
        watched, expected = clipped_step(1)
    assert bare == watched == [4]  # one kernel over the 4 gradients
    sink.wait_for(lambda: len(sink.steps()) == 1)
    assert sink.steps()[0]["grad_norm"] == pytest.approx(expected, rel=1e-5)
    assert sink.steps()[0]["clip_coefficient"] == pytest.approx(1.0 / (expected + 1e-6), rel=1e-5)


@pytest.mark.parametrize("layout", ["model_order", "groups_reversed", "unused_param"])
def test_a_watched_clip_scales_the_gradients_bit_for_bit_as_torch_does(sink, layout):
    """The shared pass hands clip_grad_norm_ torch's own total norm (float32, from the same
    per-tensor norms, summed in the clip's parameter order even where the optimizer's groups
    list them in another): a watched run is clipped exactly like an unwatched one."""
    clipped = []
    for watched in (False, True):
        model = make_model()
        if layout == "groups_reversed":
            opt = torch.optim.AdamW([{"params": model[2].parameters()},
                                     {"params": list(model[0].parameters())[::-1]}], lr=1e-3)
        else:
            opt = make_optimizer(model)
        monitor = adamwatch.watch(opt, endpoint=sink.endpoint, deep_stats_every=0) if watched else None
        try:
            for seed in range(3):
                loss_of(model, seed, scale=50.0).backward()
                if layout == "unused_param":
                    model[0].bias.grad = None  # a parameter without a gradient this step
                total = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
                grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
                opt.step()
                opt.zero_grad()
            clipped.append((total, grads, [p.detach().clone() for p in model.parameters()]))
        finally:
            if monitor is not None:
                monitor.close()
    (bare_total, bare_grads, bare_params), (total, grads, params) = clipped
    assert torch.equal(bare_total, total)
    assert all(torch.equal(a, b) for a, b in zip(bare_grads, grads))
    assert all(torch.equal(a, b) for a, b in zip(bare_params, params))


def test_a_clipped_step_adds_no_host_reads(sink):
    bare_model, model = make_model(), make_model()
    bare_opt, opt = make_optimizer(bare_model, "AdamW", "fused"), make_optimizer(model, "AdamW", "fused")

    def step(o, m, monitor=None, seed=0):
        loss = loss_of(m, seed, scale=50.0)
        counter = HostReadCounter()
        with counter.counting():
            loss.backward()
            if monitor is not None:
                monitor.observe_loss(loss)
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            o.step()
        o.zero_grad()
        return counter.calls

    step(bare_opt, bare_model)
    with adamwatch.watch(opt, endpoint=sink.endpoint, deep_stats_every=0) as monitor:
        monitor.add_step_extension(SkipAboveExtension(threshold=1e9))
        step(opt, model, monitor)
        for seed in range(1, 3):
            assert step(opt, model, monitor, seed) == step(bare_opt, bare_model, seed=seed)
    sink.wait_for(lambda: len(sink.steps()) == 3)


# --------------------------------------------------------------------- gradient accumulation
def test_the_loss_is_the_mean_over_the_steps_micro_batches(sink):
    model = make_model()
    opt = make_optimizer(model, "AdamW", "foreach")
    accum = 4
    expected = []
    with adamwatch.watch(opt, endpoint=sink.endpoint, deep_stats_every=0) as monitor:
        for step in range(3):
            losses = []
            for micro in range(accum):
                loss = loss_of(model, step * accum + micro)
                losses.append(loss.item())
                if step == 1:  # the scaled loss the user backpropagates, said so
                    scaled = loss / accum
                    scaled.backward()
                    monitor.observe_loss(scaled, scaled_by=accum)
                elif step == 2:  # Python numbers work too
                    (loss / accum).backward()
                    monitor.observe_loss(loss.item())
                else:
                    (loss / accum).backward()
                    monitor.observe_loss(loss)
            expected.append(sum(losses) / accum)
            opt.step()
            opt.zero_grad()
        with pytest.raises(ValueError, match="scaled_by"):
            monitor.observe_loss(1.0, scaled_by=0)
    sink.wait_for(lambda: len(sink.steps()) == 3)
    assert [s["loss"] for s in sink.steps()] == pytest.approx(expected, rel=1e-6)


def test_accumulating_the_loss_adds_no_host_reads(sink):
    model = make_model()
    opt = make_optimizer(model, "AdamW", "fused")
    with adamwatch.watch(opt, endpoint=sink.endpoint, deep_stats_every=0) as monitor:
        counter = HostReadCounter()
        with counter.counting():
            for micro in range(3):
                loss = loss_of(model, micro)
                loss.backward()
                monitor.observe_loss(loss, scaled_by=3)
            opt.step()
        assert counter.calls == []
    sink.wait_for(lambda: len(sink.steps()) == 1)
    assert math.isfinite(sink.steps()[0]["loss"])


# --------------------------------------------------------------------- never silently blind
class FailingCheckpointer:
    """note_step runs on the reader thread: a failure there must not go unnoticed."""

    def note_step(self, step, healthy):
        raise RuntimeError("disk gone")


def test_failures_inside_the_monitor_reach_the_sidecar_by_where(sink, caplog):
    model = make_model()
    opt = make_optimizer(model, "AdamW", "foreach")
    with caplog.at_level("ERROR", logger="adamwatch"):
        with adamwatch.watch(opt, endpoint=sink.endpoint, deep_stats_every=0, checkpointer=FailingCheckpointer(),
                             batch_interval=0) as monitor:
            monitor.add_step_extension(BrokenExtension())
            for i in range(3):
                loss_of(model, i).backward()
                opt.step()
                opt.zero_grad()
            sink.wait_for(lambda: any(m["errors"].get("note_step") == 3
                                      for m in sink.of_type(adamwatch.wire.MessageType.MONITOR_ERRORS)))
    sink.wait_for(lambda: sink.of_type(adamwatch.wire.MessageType.GOODBYE))
    last = sink.of_type(adamwatch.wire.MessageType.MONITOR_ERRORS)[-1]["errors"]
    assert last == {"extension": 3, "note_step": 3} == monitor.errors_by_where
    assert len(sink.steps()) == 3  # the summaries still went out
    logged = [r for r in caplog.records if "failed; training continues" in r.getMessage()]
    assert sorted(r.args[0] for r in logged) == ["extension", "note_step"]  # once per kind



# --------------------------------------------------------------------- manual actions
@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_reduce_lr_between_two_steps_applies_to_the_very_next_update(sink, impl):
    model, ref = make_model(), make_model()
    opt, ref_opt = make_optimizer(model, "AdamW", impl), make_optimizer(ref, "AdamW", impl)

    def step(m, o, seed):
        loss_of(m, seed).backward()
        o.step()
        o.zero_grad()

    with adamwatch.watch(opt, endpoint=sink.endpoint, deep_stats_every=0) as monitor:
        for seed in range(2):
            step(model, opt, seed)
            step(ref, ref_opt, seed)
        action_id = monitor.reduce_lr(0.5)  # between steps 2 and 3
        for g in ref_opt.param_groups:
            g["lr"] *= 0.5
        step(model, opt, 2)
        step(ref, ref_opt, 2)
        assert all(torch.equal(p, r) for p, r in zip(model.parameters(), ref.parameters()))
        assert monitor.lr_scale == 0.5
    sink.wait_for(lambda: sink.of_type(adamwatch.wire.MessageType.ACK))
    [ack] = sink.of_type(adamwatch.wire.MessageType.ACK)
    assert ack["id"] == action_id and ack["outcome"] == "applied" and ack["source"] == "local"
    assert ack["step"] == 2  # the boundary before step 3
    sink.wait_for(lambda: len(sink.steps()) == 3)
    assert sink.steps()[2]["lr"] == pytest.approx([g["lr"] for g in ref_opt.param_groups])


def test_a_restore_asked_between_steps_waits_for_the_step_boundary(sink, tmp_path):
    model = make_model()
    opt = make_optimizer(model, "AdamW", "foreach")
    ckpt = adamwatch.Checkpointer(str(tmp_path), model=model, optimizer=opt)
    with adamwatch.watch(opt, endpoint=sink.endpoint, deep_stats_every=0, checkpointer=ckpt) as monitor:
        loss_of(model, 0).backward()
        opt.step()
        opt.zero_grad()
        ckpt.save(monitor.step)
        saved = [p.detach().clone() for p in model.parameters()]
        loss_of(model, 1).backward()
        monitor.restore_checkpoint(step=1)
        opt.step()  # this step's gradients belong to the parameters it replaces: restored after it
        assert monitor.step == 1
        assert all(torch.equal(p, s) for p, s in zip(model.parameters(), saved))


# --------------------------------------------------------------------- any torch optimizer
OTHER_OPTIMIZERS = {
    "SGD": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
    "NAdam": lambda params: torch.optim.NAdam(params, lr=1e-3),
    "RAdam": lambda params: torch.optim.RAdam(params, lr=1e-3),
    "Adamax": lambda params: torch.optim.Adamax(params, lr=1e-3),
    "Adagrad": lambda params: torch.optim.Adagrad(params, lr=1e-2),
    "RMSprop": lambda params: torch.optim.RMSprop(params, lr=1e-3),
}
ADAM_STATE = {"NAdam", "RAdam"}  # state holds exp_avg and exp_avg_sq: deep statistics


@pytest.mark.parametrize("name", OTHER_OPTIMIZERS)
def test_any_torch_optimizer_gets_its_per_step_metrics(sink, name):
    model = make_model()
    opt = OTHER_OPTIMIZERS[name]([
        {"params": model[0].parameters(), "name": "encoder"},
        {"params": model[2].parameters()},
    ])
    seen = []
    with adamwatch.watch(opt, endpoint=sink.endpoint, deep_stats_every=2) as monitor:
        for i in range(4):
            loss = loss_of(model, i)
            loss.backward()
            monitor.observe_loss(loss)
            seen.append((loss.item(), *true_norms(opt)))
            opt.step()
            opt.zero_grad()
        assert monitor.errors == 0
    sink.wait_for(lambda: sink.of_type(adamwatch.wire.MessageType.GOODBYE))
    hello = sink.of_type(adamwatch.wire.MessageType.HELLO)[0]
    assert hello["optimizer"]["kind"] == name
    assert ("betas" in hello["optimizer"]) == (name in ADAM_STATE | {"Adamax"})
    steps = sink.steps()
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    for s, (loss, total, groups) in zip(steps, seen):
        assert s["loss"] == pytest.approx(loss, rel=1e-6)
        assert s["grad_norm"] == pytest.approx(total, rel=1e-5)
        assert s["group_grad_norms"] == pytest.approx(groups, rel=1e-5)
        assert s["lr"] == pytest.approx([g["lr"] for g in opt.param_groups])
    deep = steps[1].get("deep")
    if name in ADAM_STATE:
        assert deep[0]["exp_avg_norm"] > 0 and deep[0]["update_to_weight"] > 0
    else:
        assert deep is None or all(d == {} for d in deep)


@pytest.mark.parametrize("name", ["SGD", "Adagrad"])
def test_the_fused_guard_skips_for_any_optimizer_taking_found_inf(sink, name):
    model = make_model()
    opt = (torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, fused=True) if name == "SGD"
           else torch.optim.Adagrad(model.parameters(), lr=1e-2, fused=True))
    with adamwatch.watch(opt, endpoint=sink.endpoint, deep_stats_every=0) as monitor:
        loss_of(model, 0).backward()
        opt.step()
        opt.zero_grad()
        before = [p.detach().clone() for p in model.parameters()]
        loss = loss_of(model, 1, scale=float("nan"))
        loss.backward()
        monitor.observe_loss(loss)
        counter = HostReadCounter()
        with counter.counting():
            opt.step()
        assert counter.calls == []
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    sink.wait_for(lambda: len(sink.steps()) == 2)
    hello = sink.of_type(adamwatch.wire.MessageType.HELLO)[0]
    assert hello["optimizer"]["kind"] == name and hello["optimizer"]["implementation"] == "fused"
    assert sink.steps()[1]["skipped"] is True and sink.steps()[1]["skip_reason"] == "guard"


# --------------------------------------------------------------------- torch.compile
def _compiled_run(sink, watch: bool, steps: int = 8):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    graphs = []

    def backend(gm, example_inputs):  # counts the graphs dynamo hands over; runs them as they are
        graphs.append(gm)
        return gm.forward

    model = make_model()
    # a tensor lr, as torch's compiled-optimizer recipe recommends (no recompile per lr value)
    opt = torch.optim.AdamW(model.parameters(), lr=torch.tensor(1e-3))
    monitor = adamwatch.watch(opt, endpoint=sink.endpoint, deep_stats_every=4) if watch else None
    compiled_step = torch.compile(opt.step, backend=backend)
    expected = []
    for i in range(steps):
        loss = loss_of(model, i)
        loss.backward()
        if monitor is not None:
            monitor.observe_loss(loss)
            expected.append((loss.item(), true_norms(opt)[0]))
        compiled_step()
        opt.zero_grad()
    if monitor is not None:
        monitor.close()
    stats = {"graphs": len(graphs), "breaks": sum(counters["graph_break"].values()),
             "recompile_limit": sum(v for k, v in counters["recompiles"].items() if "limit" in str(k))}
    return model, stats, expected


def test_a_compiled_optimizer_step_keeps_its_graphs_and_exports_correct_values(sink):
    bare_model, bare, _ = _compiled_run(sink, watch=False)
    model, watched, expected = _compiled_run(sink, watch=True)
    assert watched["graphs"] <= bare["graphs"] + 2, (bare, watched)
    assert watched["breaks"] <= bare["breaks"] + 2, (bare, watched)
    assert watched["recompile_limit"] == 0
    # the update itself is unchanged by watching it
    assert all(torch.allclose(p, q, rtol=1e-6, atol=1e-7) for p, q in zip(model.parameters(), bare_model.parameters()))
    sink.wait_for(lambda: len(sink.steps()) == 8)
    steps = sink.steps()
    assert [s["loss"] for s in steps] == pytest.approx([e[0] for e in expected], rel=1e-6)
    assert [s["grad_norm"] for s in steps] == pytest.approx([e[1] for e in expected], rel=1e-5)
    assert [s["lr"] for s in steps] == [pytest.approx([1e-3])] * 8
    assert "deep" in steps[3] and steps[3]["deep"][0]["exp_avg_norm"] > 0


def test_the_sync_guard_skips_an_extensions_request_with_its_reason(sink):
    model = make_model()
    opt = make_optimizer(model, "Adam", "foreach")
    with adamwatch.watch(opt, endpoint=sink.endpoint, deep_stats_every=0, guard="sync") as monitor:
        monitor.add_step_extension(SkipAboveExtension(threshold=100.0))
        for i, scale in enumerate((1.0, 1000.0, float("nan"))):
            before = [p.detach().clone() for p in model.parameters()]
            loss = loss_of(model, i, scale=scale)
            loss.backward()
            monitor.observe_loss(loss)
            opt.step()
            opt.zero_grad()
            assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before)) == (i > 0)
    sink.wait_for(lambda: len(sink.steps()) == 3)
    assert [(s["skipped"], s["skip_reason"]) for s in sink.steps()] == [
        (False, None), (True, "loss_above"), (True, "guard")]
