"""The client thread's fast path for the usual step: the same STEP_PACKED bytes, the same health verdict."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import adamwatch
from adamwatch import wire
from adamwatch.checkpoint import Checkpointer
from adamwatch.monitor import Monitor
from adamwatch.step_stats import DEEP_FIELDS_PER_GROUP, StepLayout, plain_step

floats = st.floats(allow_nan=True, allow_infinity=True)
# what the health verdict turns on, drawn often
specials = st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0])
losses = specials | floats
int64 = st.integers(-(2**63), 2**63 - 1)


@st.composite
def summaries(draw):
    """A summary vector as the reader collects it, and its layout: usual steps and others."""
    g = draw(st.integers(0, 9))
    has_grads = draw(st.lists(st.booleans(), min_size=g, max_size=g))
    layout = StepLayout(
        num_groups=g,
        has_loss=draw(st.booleans()),
        host_loss=draw(st.none() | losses),
        group_has_grads=has_grads,
        host_lrs=draw(st.lists(st.floats(0, 1), min_size=g, max_size=g)),
        tensor_lr_groups=[],
    )
    # squared norms are >= 0 or NaN/inf; the skip code is 0 for an applied step
    squares = draw(st.lists(st.floats(0, 1e300) | st.just(math.nan) | st.just(math.inf), min_size=g, max_size=g))
    values = [draw(losses), sum(squares) if squares else 0.0, draw(st.sampled_from([0.0, 0.0, 1.0, 2.0])), *squares]
    kind = draw(st.sampled_from(["usual", "usual", "usual", "deep", "fingerprint", "extras", "meta skip"]))
    if kind == "deep":
        layout.deep_groups = [True] * g
        values += [1.0] * (g * DEEP_FIELDS_PER_GROUP)
    elif kind == "fingerprint":
        layout.fingerprint = True
        values.append(12345.0)
    elif kind == "extras":
        layout.host_extras = {"x": 1.0}
    layout.meta.update(step=draw(int64), time=draw(st.floats(allow_nan=False)),
                       duration_s=draw(st.none() | st.floats(0, 1e6)), samples=draw(st.none() | int64),
                       tokens=draw(st.none() | int64))
    if kind == "meta skip":
        layout.meta["skip_reason"] = "grad_scaler"
    return values, layout, kind


@settings(max_examples=400, deadline=None)
@given(summary=summaries())
def test_the_fast_path_gives_the_bytes_of_the_general_encoder(summary):
    values, layout, kind = summary
    fields = plain_step(values, layout)
    usual = kind in ("usual", "meta skip") and values[2] == 0
    assert (fields is not None) == usual
    if kind == "meta skip":  # a skip reason from the host: the general path
        assert Monitor._usual_step_frame(values, layout) is None
        return
    if fields is None:
        return
    frame, healthy = Monitor._usual_step_frame(values, layout)
    payload = Monitor._payload(values, layout)
    assert frame == wire.encode_step_packed(payload)
    # and the health the fast path derives is the general path's
    assert healthy == (not (payload.get("loss_nonfinite") or payload["grad_nonfinite"] or payload["skipped"]))


def test_values_the_layout_cannot_hold_as_given_fall_back_to_the_general_encoder():
    base = dict(step=3, time=1.5, duration_s=0.1, loss=2.0, grad_norm=1.0, group_grad_norms=[1.0],
                grad_nonfinite=False, lr=[1e-3], samples=None, tokens=None)
    assert wire.encode_plain_step_packed(**base) is not None
    for change in ({"lr": [1]}, {"time": 2}, {"duration_s": 1}, {"loss": 1}, {"grad_norm": 1},
                   {"group_grad_norms": [1]}, {"samples": 2**63}, {"tokens": 1.5}, {"step": 2**63}):
        assert wire.encode_plain_step_packed(**{**base, **change}) is None, change


def test_a_host_loss_that_is_not_finite_makes_the_step_unhealthy_for_the_checkpointer(sink, tmp_path):
    """The fast path's health verdict reaches the known-good tracking (the gradients are finite)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    checkpointer = Checkpointer(tmp_path / "ckpt", model=model, optimizer=opt)
    with adamwatch.watch(opt, endpoint=sink.endpoint, checkpointer=checkpointer, deep_stats_every=0) as monitor:
        for i in range(6):
            loss = model(torch.randn(4, 8)).square().mean()
            loss.backward()
            monitor.observe_loss(float("nan") if i == 3 else loss.item())
            opt.step()
            opt.zero_grad()
    sink.wait_for(lambda: len(sink.steps()) == 6)
    steps = sink.steps()
    assert [s["loss_nonfinite"] for s in steps] == [False, False, False, True, False, False]
    assert all(s["grad_nonfinite"] is False for s in steps)
    assert checkpointer._unhealthy == {4}
