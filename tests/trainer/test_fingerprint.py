"""adamwatch.fingerprint: exact, equal for identical replicas, changed by one ulp anywhere."""

from __future__ import annotations

import copy

import pytest
import torch

import adamwatch
from adamwatch import wire
from adamwatch.fingerprint import FINGERPRINT_BITS, fingerprint

CPU = torch.device("cpu")


def _trained_pair(dtype=torch.float32, **adam):
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3)).to(dtype)
    b = copy.deepcopy(a)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, **adam) for m in (a, b)]
    for model, opt in zip((a, b), opts):
        for i in range(3):
            model(torch.ones(2, 6, dtype=dtype) * i).square().sum().backward()
            opt.step()
            opt.zero_grad()
    return (a, b), opts


def _value(opt) -> int:
    value = fingerprint(opt, CPU)
    assert value.dtype == torch.float64 and value.dim() == 0
    as_int = int(value.item())
    assert as_int == value.item() and 0 <= as_int < 2**FINGERPRINT_BITS
    return as_int


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_identical_replicas_agree_and_one_ulp_anywhere_disagrees(dtype):
    (a, b), (opt_a, opt_b) = _trained_pair(dtype, amsgrad=True)
    reference = _value(opt_a)
    assert _value(opt_b) == reference
    up = torch.tensor(float("inf"), dtype=dtype)
    for tensor in (b[1].bias, opt_b.state[b[0].weight]["exp_avg"], opt_b.state[b[0].weight]["exp_avg_sq"],
                   opt_b.state[b[1].weight]["max_exp_avg_sq"]):
        with torch.no_grad():
            original = tensor[0].clone()
            tensor.view(-1)[0] = torch.nextafter(tensor.view(-1)[0], up)
            assert _value(opt_b) != reference
            tensor.view(-1)[0] = original.view(-1)[0]
        assert _value(opt_b) == reference
    opt_b.state[b[1].bias]["step"] += 1  # a replica one step ahead
    assert _value(opt_b) != reference


def test_two_tensors_swapping_contents_are_seen():
    (a, b), (opt_a, opt_b) = _trained_pair()
    reference = _value(opt_a)
    state = opt_b.state[b[0].bias]
    with torch.no_grad():
        m, v = state["exp_avg"].clone(), state["exp_avg_sq"].clone()
        state["exp_avg"].copy_(v)
        state["exp_avg_sq"].copy_(m)
    assert _value(opt_b) != reference


def test_the_monitor_sends_it_every_n_steps(sink):
    (a, _), (opt, _) = _trained_pair()
    with adamwatch.watch(opt, endpoint=sink.endpoint, deep_stats_every=0, fingerprint_every=2) as monitor:
        expected = {}
        for step in range(1, 6):
            a(torch.ones(2, 6)).square().sum().backward()
            monitor.observe_loss(1.0)
            opt.step()
            opt.zero_grad()
            expected[step] = _value(opt)
    sink.wait_for(lambda: sink.of_type(wire.MessageType.GOODBYE))
    got = [(p["step"], p["fingerprint"]) for p in sink.of_type(wire.MessageType.FINGERPRINT)]
    assert got == [(2, expected[2]), (4, expected[4])]


def test_bad_fingerprint_every_is_refused_by_name():
    (a, _), (opt, _) = _trained_pair()
    with pytest.raises(ValueError, match="fingerprint_every"):
        adamwatch.watch(opt, fingerprint_every=-1)
