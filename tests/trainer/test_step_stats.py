"""StepStats internals: the all-groups-at-once paths agree with the group-by-group ones."""

from __future__ import annotations

import pytest
import torch

from adamwatch.step_stats import DEEP_FIELDS_PER_GROUP, TOTAL_INDEX, StepStats


def _trained_optimizer(groups: int = 5, amsgrad: bool = False) -> torch.optim.Optimizer:
    torch.manual_seed(0)
    layers = [torch.nn.Linear(8 + i, 9 + i) for i in range(groups)]
    param_groups = [
        {"params": list(layer.parameters()), "lr": 1e-3 * (i + 1), "eps": 1e-8 * (10 ** (i % 3)),
         "betas": (0.9, 0.99 if i % 2 else 0.999)}
        for i, layer in enumerate(layers)
    ]
    frozen = torch.nn.Linear(3, 3)  # a group that never gets a grad: no Adam state
    param_groups.append({"params": list(frozen.parameters())})
    opt = torch.optim.AdamW(param_groups, lr=1e-3, amsgrad=amsgrad)
    for step in range(3):
        for i, layer in enumerate(layers):
            layer(torch.randn(4, 8 + i)).square().mean().mul(10.0 ** (i - 2)).backward()
        opt.step()
        opt.zero_grad()
    return opt


@pytest.mark.parametrize("amsgrad", [False, True])
def test_the_one_sort_deep_block_equals_the_group_by_group_one(amsgrad):
    opt = _trained_optimizer(amsgrad=amsgrad)
    stats = StepStats(opt, sample_size=100_000)  # the sample covers every coordinate: exact quantiles
    fused, present = stats.deep()
    assert stats._deep_plan is not None  # the all-groups path ran
    stats._single_device = False  # force the general, group-by-group path
    general, present_general = stats.deep()
    assert present == present_general == [True] * 5 + [False]
    assert fused.shape == general.shape == (6 * DEEP_FIELDS_PER_GROUP,)
    torch.testing.assert_close(fused, general, rtol=1e-5, atol=0, equal_nan=True)
    assert torch.isnan(fused[-DEEP_FIELDS_PER_GROUP:]).all()


def test_group_norms_come_from_one_reduction_and_follow_group_changes():
    opt = _trained_optimizer(groups=3)
    stats = StepStats(opt)
    layers = [g["params"] for g in opt.param_groups]
    for group in layers:
        for p in group:
            p.grad = torch.randn_like(p)
    opt.param_groups[-1]["params"][0].grad = None  # a param without grad this step
    vector, _bad, layout = stats.per_step(None)
    expected = [sum(float(p.grad.double().square().sum()) for p in g if p.grad is not None) for g in layers]
    torch.testing.assert_close(vector[3:3 + len(layers)], torch.tensor(expected, dtype=torch.float64))
    assert layout.group_has_grads == [True, True, True, True]
    # A new param group is picked up at the next step.
    extra = torch.nn.Parameter(torch.ones(7))
    extra.grad = torch.full((7,), 2.0)
    opt.add_param_group({"params": [extra]})
    vector, _bad, layout = stats.per_step(None)
    assert layout.num_groups == 5
    assert float(vector[3 + 4]) == pytest.approx(28.0)
    assert float(vector[TOTAL_INDEX]) == pytest.approx(sum(expected) + 28.0)


def test_the_sample_does_not_grow_with_the_number_of_groups():
    stats = StepStats(_trained_optimizer(groups=2), sample_size=4096)
    assert stats.group_sample_size(2) == 4096
    assert stats.group_sample_size(64) * 64 <= 4 * 4096


def test_the_reader_applies_each_groups_lr_float_or_tensor():
    from adamwatch.step_stats import decode_step

    decoded = []
    for lr in (2e-3, torch.tensor(2e-3)):
        opt = _trained_optimizer(groups=2)
        for group in opt.param_groups:
            group["lr"] = lr
        stats = StepStats(opt, sample_size=100_000)
        vector, _bad, layout = stats.per_step(None)
        deep, layout.deep_groups = stats.deep()
        payload = decode_step(torch.cat([vector, deep]).tolist(), layout)
        decoded.append(payload["deep"])
    float_lr, tensor_lr = decoded
    for a, b in zip(float_lr[:2], tensor_lr[:2]):
        assert a["effective_lr"] == pytest.approx(b["effective_lr"], rel=1e-6)
        assert a["update_size"] == pytest.approx(b["update_size"], rel=1e-6)
        assert a["update_norm"] == pytest.approx(b["update_norm"], rel=1e-6)
    # lr / (sqrt(v_hat) + eps) is at most lr / eps
    assert max(float_lr[0]["effective_lr"]) <= 2e-3 / 1e-8
    assert float_lr[0]["effective_lr"][0] > 0


@pytest.mark.parametrize("sample_size", [60, 4096])
def test_the_cpu_numpy_sort_equals_torch_sort_bit_for_bit(sample_size):
    # On CPU the deep block orders its sample with numpy's in-place sort; it must
    # give exactly torch.sort's values, NaN in the data included (both put NaN last).
    pytest.importorskip("numpy")
    opt = _trained_optimizer()
    first = opt.param_groups[0]["params"][0]
    opt.state[first]["exp_avg_sq"].view(-1)[:40] = float("nan")
    stats = StepStats(opt, sample_size=sample_size)  # groups of unequal size, sampled or whole
    by_numpy, _ = stats.deep()
    assert stats._deep_plan.numpy_sort, "the CPU path must sort with numpy"
    stats._deep_plan.numpy_sort = False
    by_torch, _ = stats.deep()
    assert torch.equal(by_numpy.nan_to_num(-7.0), by_torch.nan_to_num(-7.0))
    assert by_numpy.isnan().any()


def test_a_nan_in_one_groups_state_stays_in_that_groups_deep_norms():
    """The per-group sums are masked row sums: a product with the one-hot matrix would make
    every group's weight, m, v and update norms NaN (0 x NaN is NaN)."""
    from adamwatch.wire import QUANTILES

    opt = _trained_optimizer(groups=3)
    poisoned = opt.param_groups[1]["params"][0]
    with torch.no_grad():
        poisoned[0, 0] = float("nan")
    opt.state[poisoned]["exp_avg"][0, 0] = float("nan")
    stats = StepStats(opt, sample_size=100_000)
    fused, _ = stats.deep()
    assert stats._deep_plan is not None
    stats._single_device = False
    general, _ = stats.deep()
    nq = len(QUANTILES)
    for block in (fused, general):
        per_group = block.view(-1, DEEP_FIELDS_PER_GROUP)[:3]
        weight_norms, m_norms = per_group[:, 2 * nq + 1], per_group[:, 2 * nq + 2]
        update_norms = per_group[:, 2 * nq]
        assert torch.isfinite(weight_norms).tolist() == [True, False, True]
        assert torch.isfinite(m_norms).tolist() == [True, False, True]
        assert torch.isfinite(update_norms).tolist() == [True, False, True]
    torch.testing.assert_close(fused, general, rtol=1e-5, atol=0, equal_nan=True)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layers", [1, 3])
def test_the_deep_block_never_writes_the_optimizer_state(state_dtype, layers):
    """The statistics read Adam's state and the weights, never write them (a view of
    a float32 state is the state itself). Low-precision state gives the same
    statistics as its float32 values."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(50 + i)) for i in range(layers)]
    opt = torch.optim.Adam(params, lr=1e-3)
    for _ in range(2):
        sum(p.square().sum() for p in params).backward()
        opt.step()
        opt.zero_grad()
    for st in opt.state.values():
        st["exp_avg"], st["exp_avg_sq"] = st["exp_avg"].to(state_dtype), st["exp_avg_sq"].to(state_dtype)
    before = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in params}
    weights = [p.detach().clone() for p in params]
    stats = StepStats(opt, sample_size=100_000)
    deep, _ = stats.deep()
    assert stats._deep_plan is not None
    for p, w in zip(params, weights):
        assert torch.equal(p.detach(), w)
        for k, v in opt.state[p].items():
            assert torch.equal(v, before[id(p)][k]), k
    # The same numbers from the float32 copy of that state, group by group.
    for st in opt.state.values():
        st["exp_avg"], st["exp_avg_sq"] = st["exp_avg"].float(), st["exp_avg_sq"].float()
    stats._single_device = False
    general, _ = stats.deep()
    torch.testing.assert_close(deep, general, rtol=1e-5, atol=0)
