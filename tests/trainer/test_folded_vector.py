"""The CPU step path folds on the reader thread: same numbers as the tensor path, and only for plain steps."""

from __future__ import annotations

import math

import pytest
import torch
from torch.overrides import TorchFunctionMode

from adamwatch.folded_vector import FoldedStepVector, append_block
from adamwatch.step_stats import StepStats, decode_step

from .test_step_stats import _trained_optimizer


def _with_grads(groups: int = 3, *, poison: str | None = None) -> torch.optim.Optimizer:
    opt = _trained_optimizer(groups=groups)
    for group in opt.param_groups[:-1]:
        for p in group["params"]:
            p.grad = torch.randn_like(p) * 3
    opt.param_groups[0]["params"][1].grad = None  # a param without a grad this step
    if poison is not None:
        opt.param_groups[1]["params"][0].grad[0, 0] = float(poison)
    return opt


def _both(opt: torch.optim.Optimizer, loss, **kwargs):
    folded, _, folded_layout = StepStats(opt, fold_on_reader=True).per_step(loss, **kwargs)
    tensor, _, tensor_layout = StepStats(opt).per_step(loss, **kwargs)
    return folded, folded_layout, tensor, tensor_layout


@pytest.mark.parametrize("loss", [torch.tensor(2.75), torch.tensor(1.5, dtype=torch.bfloat16),
                                  torch.tensor([0.5], dtype=torch.float64), 3.25, None])
@pytest.mark.parametrize("poison", [None, "nan", "inf"])
def test_the_folded_vector_reads_what_the_tensor_path_computes(loss, poison):
    opt = _with_grads(poison=poison)
    folded, folded_layout, tensor, tensor_layout = _both(opt, loss)
    assert isinstance(folded, FoldedStepVector) and isinstance(tensor, torch.Tensor)
    assert folded.numel() == tensor.numel()
    got, want = folded.tolist(), tensor.tolist()
    assert got == pytest.approx(want, rel=1e-12, nan_ok=True)
    decoded, reference = decode_step(got, folded_layout), decode_step(want, tensor_layout)
    assert decoded.keys() == reference.keys()
    for key, value in reference.items():
        if key == "group_grad_norms":
            assert [v is None for v in decoded[key]] == [v is None for v in value]
            assert [v for v in decoded[key] if v is not None] == pytest.approx(
                [v for v in value if v is not None], rel=1e-12, nan_ok=True)
        else:
            assert decoded[key] == pytest.approx(value, rel=1e-12, nan_ok=True), key
    # The truth, from the gradients themselves (float64).
    groups = opt.param_groups
    expected = [sum(float(p.grad.double().square().sum()) for p in g["params"] if p.grad is not None)
                for g in groups]
    assert got[3:3 + len(groups)] == pytest.approx(expected, rel=1e-6, nan_ok=True)
    if poison is None:
        assert got[1] == pytest.approx(sum(expected), rel=1e-6)
    else:
        assert not math.isfinite(got[1])  # the non-finite flag is derived from it on the host
        # Only the poisoned group's norm is non-finite, in both paths.
        assert [math.isfinite(v) for v in got[3:3 + len(groups)]] == [True, False, True, True]
    assert folded_layout.group_has_grads == tensor_layout.group_has_grads == [True, True, True, False]


def test_tail_blocks_follow_the_step_block_as_in_the_tensor_path():
    opt = _with_grads()
    folded, _, tensor, _ = _both(opt, torch.tensor(1.0))
    deep = torch.arange(5, dtype=torch.float64)
    coefficient = torch.tensor(0.25)
    for block in (deep, coefficient):
        folded = append_block(folded, block)
        tensor = append_block(tensor, block)
    assert folded.tolist() == pytest.approx(tensor.tolist(), rel=1e-12)
    assert folded.numel() == tensor.numel()


class _TorchCalls(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def test_the_reader_makes_no_torch_call_but_tolist():
    """An op (``item``, ``stack``...) releases the GIL on the reader thread and hands it to the
    training thread and back: the fold reads each tensor with ``tolist`` and computes in Python."""
    opt = _with_grads()
    folded, _, _ = StepStats(opt, fold_on_reader=True).per_step(torch.tensor(1.0))
    folded = append_block(folded, torch.ones(3, dtype=torch.float64))
    with _TorchCalls() as calls:
        folded.tolist()
    assert calls.names and set(calls.names) == {"tolist"}, calls.names


def test_the_step_path_runs_one_norm_pass_and_one_stack():
    opt = _with_grads()
    stats = StepStats(opt, fold_on_reader=True)
    loss = torch.tensor(1.0)
    with _TorchCalls() as calls:
        stats.per_step(loss)
    ops = [n for n in calls.names if n not in ("__get__", "dim", "numel")]
    assert ops == ["_foreach_norm", "stack"], calls.names


@pytest.mark.parametrize("case", ["guard", "grad_scale", "found_inf", "tensor_lr", "extension", "cuda_loss_like"])
def test_steps_that_decide_on_the_device_keep_the_tensor_path(case):
    opt = _with_grads()
    stats = StepStats(opt, fold_on_reader=True)
    kwargs = {}
    loss = torch.tensor(1.0)
    if case == "guard":
        kwargs["guard"] = True
    elif case == "grad_scale":
        kwargs["grad_scale"] = torch.tensor(2.0)
    elif case == "found_inf":
        kwargs["found_inf"] = torch.tensor(0.0)
    elif case == "tensor_lr":
        opt.param_groups[0]["lr"] = torch.tensor(1e-3)
    elif case == "extension":
        kwargs["on_context"] = lambda ctx: None
    else:
        loss = torch.tensor([1.0, 2.0])  # not one element: the tensor path takes the first
    vector, _, _ = stats.per_step(loss, **kwargs)
    assert isinstance(vector, torch.Tensor)


def test_only_a_cpu_statistics_device_folds():
    opt = _with_grads()
    assert StepStats(opt, fold_on_reader=True).fold_on_reader
    assert not StepStats(opt).fold_on_reader
    meta = torch.nn.Linear(2, 2, device="meta")
    assert not StepStats(torch.optim.AdamW(meta.parameters()), fold_on_reader=True).fold_on_reader


class _AdamwatchCalls(TorchFunctionMode):
    """torch calls made from adamwatch's own code (not the optimizer's or the model's)."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        import sys

        if "/adamwatch/" in sys._getframe(1).f_code.co_filename:
            self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def test_a_watched_cpu_step_makes_the_two_ops_and_no_more():
    """The whole watched step on the CPU, hooks included: the norm pass and one stack
    (and observe_loss's detach). Any op added to the step path shows up here."""
    import adamwatch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    opt = torch.optim.AdamW([{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 3e-3}])
    monitor = adamwatch.watch(opt, endpoint=None, deep_stats_every=0, check_config_every=1)
    try:
        for step in range(3):
            loss = model(torch.randn(4, 8)).square().mean()
            loss.backward()
            with _AdamwatchCalls() as calls:
                monitor.observe_loss(loss)
                opt.step()
            opt.zero_grad()
            metadata = {"__get__", "dim", "numel"}
            assert [n for n in calls.names if n not in metadata] == ["detach", "_foreach_norm", "stack"], calls.names
        assert monitor.errors == 0
    finally:
        monitor.close()
