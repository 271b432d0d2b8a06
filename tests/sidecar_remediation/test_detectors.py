"""Detectors: fire on what they are for, stay quiet on healthy noisy training."""

from __future__ import annotations

import math
import random

from hypothesis import example, given, settings
from hypothesis import strategies as st

from adamwatch_sidecar.remediation.detectors import NonFiniteDetector, RankDetectors, SpikeDetector, StallDetector
from adamwatch_sidecar.remediation.policy import DetectorParams, NonFiniteParams, SpikeParams, StallParams


def healthy_losses(n: int, seed: int = 0) -> list[float]:
    """A decaying loss curve with 3% multiplicative noise, like a real small-model run."""
    rng = random.Random(seed)
    return [(2.0 + 8.0 * math.exp(-i / 400)) * (1 + 0.03 * rng.gauss(0, 1)) for i in range(n)]


def step(i: int, loss: float | None = 1.0, grad_norm: float | None = 1.0, **extra) -> dict:
    payload = {"step": i, "time": float(i), "duration_s": 0.1, "loss": loss, "grad_norm": grad_norm,
               "group_grad_norms": [grad_norm], "grad_nonfinite": False, "lr": [1e-3]}
    payload.update(extra)
    return payload


def test_spike_detector_is_quiet_on_a_healthy_noisy_series():
    d = SpikeDetector("loss_spike", SpikeParams())
    fired = [i for i, v in enumerate(healthy_losses(5000)) if d.observe(v) is not None]
    assert fired == []
    assert d.samples == 128


def test_spike_detector_fires_on_a_spike_with_its_evidence():
    d = SpikeDetector("loss_spike", SpikeParams())
    for v in healthy_losses(300):
        assert d.observe(v) is None
    window = list(d._values)
    mean = sum(window) / len(window)
    std = math.sqrt(sum((x - mean) ** 2 for x in window) / (len(window) - 1))
    ev = d.observe(mean * 2)
    assert ev is not None
    assert math.isclose(ev["mean"], mean) and math.isclose(ev["std"], std)
    assert math.isclose(ev["threshold"], mean + 6 * max(std, 0.01 * mean))
    assert ev["value"] == mean * 2 and ev["k"] == 6.0 and ev["samples"] == 128 and ev["streak"] == 1


def test_spikes_do_not_enter_the_window_so_a_plateau_of_spikes_keeps_firing():
    d = SpikeDetector("loss_spike", SpikeParams(window=64, min_samples=32))
    for v in healthy_losses(100):
        d.observe(v)
    before = list(d._values)
    streaks = [d.observe(50.0)["streak"] for _ in range(200)]
    assert streaks == list(range(1, 201))
    assert list(d._values) == before
    assert d.observe(before[-1]) is None  # a healthy value ends the streak
    assert d.streak == 0


def test_spike_detector_is_not_armed_before_min_samples():
    d = SpikeDetector("loss_spike", SpikeParams(min_samples=32))
    assert all(d.observe(v) is None for v in [1.0] * 31 + [1000.0])
    assert not d.armed or d.samples == 32


def test_a_flat_series_does_not_fire_on_rounding_noise_but_does_on_a_real_jump():
    d = SpikeDetector("loss_spike", SpikeParams(min_std_ratio=0.01))
    for _ in range(64):
        d.observe(3.0)
    assert d.observe(3.0 + 1e-6) is None  # sigma is 0; the floor is 1% of the mean
    assert d.observe(3.0 * 1.07) is not None  # 7% > 6 * 1%


def test_spike_detector_ignores_non_finite_and_missing_values():
    d = SpikeDetector("grad_norm_spike", SpikeParams(min_samples=2))
    for v in (1.0, 1.0, 1.0):
        d.observe(v)
    assert d.observe(float("nan")) is None and d.observe(None) is None and d.observe(float("inf")) is None
    assert d.samples == 3


def test_reset_disarms_the_detector():
    d = SpikeDetector("loss_spike", SpikeParams(min_samples=4))
    for v in (1.0, 1.0, 1.0, 1.0):
        d.observe(v)
    d.reset()
    assert d.samples == 0 and d.observe(100.0) is None


def test_non_finite_needs_consecutive_steps_and_reports_sources():
    d = NonFiniteDetector(NonFiniteParams(consecutive_steps=3))
    assert d.observe(step(1, loss=float("nan"), loss_nonfinite=True)) is None
    assert d.observe(step(2, grad_norm=None, grad_nonfinite=True)) is None
    ev = d.observe(step(3, loss=float("inf"), grad_norm=None, loss_nonfinite=True, grad_nonfinite=True))
    assert ev["streak"] == 3 and ev["sources"] == ["loss", "grad"] and ev["loss"] == "inf"
    assert d.observe(step(4, loss=float("nan"), loss_nonfinite=True))["streak"] == 4
    assert d.observe(step(5)) is None and d.streak == 0


def test_non_finite_is_quiet_on_finite_steps_and_on_grad_scaler_overflows():
    d = NonFiniteDetector(NonFiniteParams(consecutive_steps=1))
    assert all(d.observe(step(i, loss=v)) is None for i, v in enumerate(healthy_losses(500)))
    overflow = step(1, grad_norm=None, grad_nonfinite=True, skipped=True, skip_reason="grad_scaler")
    assert all(d.observe(overflow) is None for _ in range(10))
    strict = NonFiniteDetector(NonFiniteParams(consecutive_steps=1, ignore_grad_scaler_skips=False))
    assert strict.observe(overflow) is not None


def test_stall_fires_once_after_the_timeout_and_rearms_on_the_next_step():
    d = StallDetector(StallParams(timeout_seconds=300))
    assert d.check(10_000.0) is None  # never stepped: startup can be slow (compile, data)
    d.step_seen(7, now=1000.0)
    assert d.check(1299.0) is None
    ev = d.check(1300.0)
    assert ev == {"seconds_since_last_step": 300.0, "last_step": 7, "timeout_seconds": 300}
    assert d.check(1400.0) is None  # fires once per stall
    d.step_seen(8, now=1500.0)
    assert d.check(1800.0) is not None


def test_stall_is_quiet_while_disconnected():
    d = StallDetector(StallParams(timeout_seconds=5))
    d.step_seen(1, now=0.0)
    d.connected = False
    assert d.check(100.0) is None


def test_rank_detectors_mark_the_first_step_of_a_streak_as_new():
    params = DetectorParams(loss_spike=SpikeParams(min_samples=8, window=16),
                            grad_norm_spike=SpikeParams(enabled=False))
    rd = RankDetectors("gpt", 3, params)
    for i in range(20):
        assert rd.observe_step(step(i, loss=2.0 + 0.01 * (i % 3)), now=float(i)) == []
    first = rd.observe_step(step(20, loss=9.0), now=20.0)
    again = rd.observe_step(step(21, loss=9.0), now=21.0)
    assert [(x.detector, x.job, x.rank, x.step, x.new, x.streak) for x in first] == [
        ("loss_spike", "gpt", 3, 20, True, 1)]
    assert [(x.new, x.streak) for x in again] == [(False, 2)]
    assert rd.check_stall(21.0 + 299) is None and rd.check_stall(21.0 + 300).detector == "stall"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(min_value=-1e6, max_value=1e6, allow_nan=False), min_size=40, max_size=400),
       st.floats(min_value=0, max_value=1e9), st.integers(min_value=2, max_value=64))
# Equal values far from 0: the detector's std is exactly 0, while the direct
# formula's mean rounds to the neighbouring float and gives ~1 ulp of "std".
@example(values=[0.0] * 40, offset=715827883.3681843, window=3)
def test_running_statistics_match_the_direct_formulas(values, offset, window):
    """The O(1) running sums agree with mean/std computed from the window itself."""
    d = SpikeDetector("loss_spike", SpikeParams(k=1e12, window=window, min_samples=2, min_std_ratio=0))
    for v in values:
        d.observe(offset + v)
        window_values = list(d._values)
        if len(window_values) < 2:
            continue
        mean = math.fsum(window_values) / len(window_values)
        std = math.sqrt(math.fsum((x - mean) ** 2 for x in window_values) / (len(window_values) - 1))
        got_mean, got_std = d.stats()
        assert math.isclose(got_mean, mean, rel_tol=1e-9, abs_tol=1e-6)
        # Rounding error grows with the distance between the data and the running
        # sums' shift, which is re-centred at least every `window` values.
        scale = max([1.0, abs(d._shift - mean)] + [abs(x - mean) for x in window_values])
        # The direct formula is itself off by up to ~sqrt(2) ulp of the data: its
        # mean is rounded to a float, and every (x - mean) carries that error.
        granularity = 2 * math.ulp(max(abs(x) for x in window_values))
        assert math.isclose(got_std, std, rel_tol=1e-6, abs_tol=1e-7 * scale + granularity)
