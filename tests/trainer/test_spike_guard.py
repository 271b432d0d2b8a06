"""The spike guard's decisions against references computed here in plain Python."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from adamwatch.step_extensions import StepContext
from adamwatch.spike_guard import (
    EXTRA_NAMES,
    SpikeGuard,
    SpikeGuardConfig,
    welford_update,
    window_bound,
    window_push,
    zclip_decide,
)

from .test_no_host_sync import HostReadCounter


def Ctx(grads: list[torch.Tensor], loss: float = float("nan")) -> StepContext:
    """The real StepContext of one step, built the way StepStats builds it."""
    sq = torch.stack([sum((g.double() ** 2).sum() for g in grads)])
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    ctx = StepContext(None, 1, [params], [grads], sq, torch.tensor(loss, dtype=torch.float32),
                      has_loss=not math.isnan(loss))
    return ctx


def extras(ctx: StepContext) -> dict[str, torch.Tensor]:
    return dict(ctx.extras)


def grads_with_norm(norm: float) -> list[torch.Tensor]:
    """Two gradients whose global L2 norm is ``norm`` (3-4-5 triangle)."""
    return [torch.tensor([0.6 * norm]), torch.tensor([0.0, 0.8 * norm])]


def zclip_reference(norms, *, warmup, z, alpha, min_std_ratio):
    """ZClip in floats: (clipped?, threshold or None) per step."""
    seen, out = [], []
    mean = var = None
    for i, g in enumerate(norms):
        if i < warmup:
            if math.isfinite(g):
                seen.append(g)
            out.append((False, None))
            if i == warmup - 1:
                mean = statistics.fmean(seen)
                var = statistics.pvariance(seen)
            continue
        std = max(math.sqrt(var), min_std_ratio * abs(mean))
        thr = mean + z * std
        clipped = math.isfinite(g) and g > thr
        out.append((clipped, thr))
        used = thr if clipped else (g if math.isfinite(g) else mean)
        mean = alpha * mean + (1 - alpha) * used
        var = alpha * var + (1 - alpha) * (used - mean) ** 2
    return out


NORMS = [1.0, 1.1, 0.9, 1.05, 0.95, 1.0, 1.02, 0.98,  # warm-up (8)
         1.01, 5.0, 0.97, 1.03, float("inf"), 1.0, 3.0, 2.0, 1.04, 0.99, 40.0, 1.0]


def test_clip_scales_exactly_to_the_threshold_when_expected_and_not_otherwise():
    cfg = SpikeGuardConfig(mode="clip", warmup=8, threshold=2.5, ema=0.9)
    guard = SpikeGuard(cfg)
    expected = zclip_reference(NORMS, warmup=8, z=2.5, alpha=0.9, min_std_ratio=cfg.min_std_ratio)
    clipped_steps = []
    for step, (norm, (should_clip, thr)) in enumerate(zip(NORMS, expected)):
        grads = grads_with_norm(norm)
        before = [g.clone() for g in grads]
        ctx = Ctx(grads)
        guard.on_summary(ctx)
        after = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
        assert bool(extras(ctx)[EXTRA_NAMES["clip"]]) is should_clip, step
        if should_clip:
            clipped_steps.append(step)
            assert after == pytest.approx(thr, rel=1e-5), step
            assert float(extras(ctx)[EXTRA_NAMES["threshold_grad_norm"]]) == pytest.approx(thr, rel=1e-5)
        else:
            for b, g in zip(before, grads):
                assert torch.equal(b, g), step  # bit-identical, infinities included
        assert not bool(ctx.skip)
    assert clipped_steps == [9, 14, 15, 18]  # the reference agrees on which these are


def test_clip_does_nothing_during_warmup_even_for_a_huge_norm():
    guard = SpikeGuard(SpikeGuardConfig(mode="clip", warmup=4))
    for norm in (1.0, 1.0, 1000.0, 1.0):
        grads = grads_with_norm(norm)
        guard.on_summary(Ctx(grads))
        assert float(grads[0][0]) == pytest.approx(0.6 * norm)


def skip_reference(values_n, values_l, *, warmup, k, window, min_std_ratio):
    """OLMo-core style skips in floats: skip when either value exceeds mean + k·std of its window."""
    wn, wl, out = [], [], []

    def over(win, v):
        if len(win) < warmup or not math.isfinite(v):
            return False
        m, s = statistics.fmean(win), statistics.stdev(win)
        return v > m + k * max(s, min_std_ratio * abs(m))

    for n, lo in zip(values_n, values_l):
        skip = over(wn, n) or over(wl, lo)
        out.append(skip)
        if not skip:
            for win, v in ((wn, n), (wl, lo)):
                if math.isfinite(v):
                    win.append(v)
                    del win[:-window]
    return out


def test_skip_skips_exactly_the_steps_over_the_bound():
    gen = torch.Generator().manual_seed(3)
    n_steps = 60
    norms = (1 + 0.05 * torch.randn(n_steps, generator=gen)).tolist()
    losses = (2 + 0.02 * torch.randn(n_steps, generator=gen)).tolist()
    norms[20] = 3.0          # norm spike
    losses[30] = 2.5         # loss spike
    norms[40] = losses[40] = float("nan")  # non-finite: left to the non-finite guard
    norms[45], losses[45] = 10.0, 9.0       # both
    norms[50] = 1.1          # a small excursion under 6 sigma
    cfg = SpikeGuardConfig(mode="skip", warmup=10, window=16)
    expected = skip_reference(norms, losses, warmup=10, k=6.0, window=16, min_std_ratio=0.01)
    guard = SpikeGuard(cfg)
    got = []
    for norm, loss in zip(norms, losses):
        ctx = Ctx(grads_with_norm(norm), loss)
        guard.on_summary(ctx)
        got.append(bool(ctx.skip))
        assert bool(extras(ctx)[EXTRA_NAMES["skip"]]) is got[-1]
    assert got == expected
    assert [i for i, s in enumerate(got) if s] == [20, 30, 45]


def test_skip_ors_into_an_existing_skip_request():
    guard = SpikeGuard(SpikeGuardConfig(mode="skip", warmup=2))
    ctx = Ctx(grads_with_norm(1.0), 1.0)
    ctx.request_skip(torch.tensor(True), "other")
    guard.on_summary(ctx)
    assert bool(ctx.skip)


@pytest.mark.parametrize("mode", ["clip", "skip"])
def test_the_guard_never_reads_the_device_on_the_host(mode):
    guard = SpikeGuard(SpikeGuardConfig(mode=mode, warmup=3))
    counter = HostReadCounter()
    with counter.counting():
        for norm in (1.0, 1.1, 0.9, 1.0, 50.0, 1.0):
            guard.on_summary(Ctx(grads_with_norm(norm), norm))
    assert counter.calls == []


def test_welford_matches_statistics_and_ignores_rejected_values():
    values = [3.0, float("nan"), 5.0, 4.5, float("inf"), 2.0]
    count, mean, m2 = torch.zeros(()), torch.zeros(()), torch.zeros(())
    for v in values:
        t = torch.tensor(v)
        count, mean, m2 = welford_update(t, count, mean, m2, torch.isfinite(t))
    finite = [v for v in values if math.isfinite(v)]
    assert float(count) == 4
    assert float(mean) == pytest.approx(statistics.fmean(finite))
    assert float(m2 / count) == pytest.approx(statistics.pvariance(finite))


def test_window_push_and_bound_follow_the_last_accepted_values():
    buf, count = torch.zeros(4), torch.zeros(())
    accepted = []
    for i, v in enumerate([1.0, 2.0, 7.0, 3.0, 4.0, 5.0, 6.0]):
        accept = i != 2
        window_push(buf, count, torch.tensor(v), torch.tensor(accept))
        if accept:
            accepted.append(v)
    last = accepted[-4:]
    mean, std, bound = window_bound(buf, count, 6.0, 0.0)
    assert float(count) == 6
    assert sorted(buf.tolist()) == sorted(last)
    assert float(mean) == pytest.approx(statistics.fmean(last))
    assert float(std) == pytest.approx(statistics.stdev(last))
    assert float(bound) == pytest.approx(statistics.fmean(last) + 6 * statistics.stdev(last))


def test_zclip_decide_is_inert_when_not_armed():
    out = zclip_decide(torch.tensor(100.0), torch.tensor(1.0), torch.tensor(0.01), z_threshold=2.5, alpha=0.97,
                       min_std_ratio=0.0, armed=False)
    assert not bool(out.activated) and float(out.coefficient) == 1.0


@pytest.mark.parametrize("kwargs, field", [
    ({"mode": "trim"}, "spike_guard.mode"),
    ({"warmup": 1}, "spike_guard.warmup"),
    ({"threshold": -1.0}, "spike_guard.threshold"),
    ({"ema": 1.0}, "spike_guard.ema"),
    ({"window": 1}, "spike_guard.window"),
    ({"mode": "skip", "warmup": 200}, "spike_guard.warmup"),
    ({"min_std_ratio": 2}, "spike_guard.min_std_ratio"),
])
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SpikeGuardConfig(**kwargs)


def test_coerce_accepts_the_short_forms():
    assert SpikeGuardConfig.coerce(None) is None
    assert SpikeGuardConfig.coerce("skip").bound == 6.0
    assert SpikeGuardConfig.coerce({"mode": "clip", "threshold": 3}).bound == 3.0
    with pytest.raises(ValueError, match="unknown field"):
        SpikeGuardConfig.coerce({"z": 3})
    with pytest.raises(TypeError, match="spike_guard must be"):
        SpikeGuardConfig.coerce(3)
