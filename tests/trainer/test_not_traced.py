"""adamwatch.not_traced: a direct call while nothing is compiled, never traced when something is."""

from __future__ import annotations

import pytest
import torch
from torch._C._dynamo.eval_frame import get_eval_frame_callback

from adamwatch import not_traced as not_traced_module


@pytest.fixture
def spied(monkeypatch):
    """not_traced(fn) with torch.compiler.disable's wrapper counted, and what fn saw."""
    through_disable: list[int] = []
    real_disable = torch.compiler.disable

    def counting_disable(fn):
        disabled = real_disable(fn)

        def counted(*args, **kwargs):
            through_disable.append(1)
            return disabled(*args, **kwargs)

        for name, value in vars(disabled).items():
            setattr(counted, name, value)
        return counted

    monkeypatch.setattr(torch.compiler, "disable", counting_disable)
    seen: list[bool] = []  # per call: was dynamo's frame callback set inside the hook?

    def hook(t: torch.Tensor) -> torch.Tensor:
        seen.append(get_eval_frame_callback() is not None)
        return torch.sin(t) * 3  # an op that would land in a graph if the hook were traced

    return not_traced_module.not_traced(hook), through_disable, seen


def test_outside_compiled_code_the_hook_is_called_directly(spied):
    hook, through_disable, seen = spied
    assert torch.equal(hook(torch.ones(2)), torch.sin(torch.ones(2)) * 3)
    assert through_disable == [] and seen == [False]


def test_from_compiled_code_the_hook_runs_untraced(spied):
    hook, through_disable, seen = spied
    graphs: list[torch.fx.GraphModule] = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def region(x: torch.Tensor) -> torch.Tensor:
        y = x * 2
        hook(y)
        return y + 1

    compiled = torch.compile(region, backend=backend)
    for _ in range(3):
        assert torch.equal(compiled(torch.ones(3)), torch.ones(3) * 2 + 1)
    # The hook ran each time, through disable, with dynamo's frame evaluation off inside.
    assert len(through_disable) == 3 and seen == [False] * 3
    # Its op is in no graph: the region's two pieces hold a mul and an add only.
    ops = {node.target for gm in graphs for node in gm.graph.nodes if node.op == "call_function"}
    assert torch.sin not in ops and len(graphs) <= 2


@pytest.mark.skipif(not_traced_module._callback is None, reason="this torch lacks the callback check")
def test_the_hooks_and_clip_wrappers_use_it():
    import adamwatch
    from adamwatch import grad_clip

    for fn in (adamwatch.Monitor.observe_loss, adamwatch.Monitor._pre_step, adamwatch.Monitor._post_step,
               grad_clip.clip_grad_norm_, grad_clip._clip_grads_with_norm_):
        assert fn.__code__ is not_traced_module.not_traced(lambda: None).__code__, fn
        assert fn._torchdynamo_disable is True
