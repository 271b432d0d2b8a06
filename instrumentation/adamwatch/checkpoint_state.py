"""What a checkpoint holds, how it is checked against the live objects, and how it is put back all or nothing.

A checkpoint holds three state dicts: ``model.pt`` (the model's), ``optimizer.pt``
(the optimizer's: m, v, step, param groups) and ``trainer.pt``
(``{"scheduler", "scaler", "rng"}``). :func:`check_loaded_state` makes every check
torch's own ``load_state_dict`` calls would make, and more (state tensor shapes,
RNG formats), before anything live is touched; :func:`apply_loaded_state` then puts
the state back in an order that can be undone.

| part | checked before anything changes | undone on a later failure by |
| --- | --- | --- |
| model | same keys, tensors where tensors live, same shapes, same kind of dtype | (applied last) |
| optimizer | same number of groups and params per group; per-param state for known params only, m/v/max shaped like the param | re-installing the old state objects (load_state_dict replaces them, never writes into them) |
| scheduler | a dict; list-valued entries (``base_lrs``, ``lr_lambdas``, ...) as long as the live ones | loading a copy taken before |
| GradScaler | saved when the live one is enabled; a finite scale > 0 | loading its state taken before |
| RNG | each state loads into a scratch generator of its kind | setting the states taken before |
"""

from __future__ import annotations

import copy
import logging
import math
import random
from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["capture_rng", "check_loaded_state", "apply_loaded_state"]

log = logging.getLogger(__name__)

# Adam/AdamW per-parameter state tensors shaped like their parameter.
_PARAM_SHAPED = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _to_lists(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_to_lists(v) for v in value]
    return value


def _to_tuples(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_to_tuples(v) for v in value)
    return value


def capture_rng() -> dict[str, Any]:
    """The RNG states a resumed run needs: torch (CPU, and CUDA once initialised), random, numpy.

    Returns:
        ``{"torch", "python", "cuda"?, "numpy"?}``, loadable with ``weights_only=True``.
    """
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        # tuples -> lists so that weights_only loading accepts them
        "python": _to_lists(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy  # optional: only when the user has it
    except ImportError:
        pass
    else:
        kind, keys, pos, has_gauss, cached = numpy.random.get_state()
        state["numpy"] = [kind, torch.from_numpy(keys.copy()), int(pos), int(has_gauss), float(cached)]
    return state


def _apply_rng(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        try:
            import numpy
        except ImportError:
            log.warning("adamwatch: checkpoint holds a numpy RNG state but numpy is not importable")
        else:
            kind, keys, pos, has_gauss, cached = state["numpy"]
            numpy.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))


def _check_rng(state: Any) -> None:
    if not isinstance(state, Mapping) or "torch" not in state or "python" not in state:
        raise ValueError("trainer.pt: rng must be a dict with 'torch' and 'python' states")
    try:  # scratch generators validate the states without touching the global ones
        torch.Generator().set_state(state["torch"])
        random.Random().setstate(_to_tuples(state["python"]))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"trainer.pt: rng state does not load: {exc}") from None
    cuda = state.get("cuda")
    if cuda is not None:
        if not isinstance(cuda, list) or not all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in cuda):
            raise ValueError("trainer.pt: rng.cuda must be a list of uint8 tensors")
        if torch.cuda.is_available() and len(cuda) > torch.cuda.device_count():
            raise ValueError(f"trainer.pt: rng.cuda holds {len(cuda)} device states, "
                             f"this process sees {torch.cuda.device_count()} devices")
    if "numpy" in state:
        try:
            import numpy
        except ImportError:
            return
        try:
            kind, keys, pos, has_gauss, cached = state["numpy"]
            numpy.random.RandomState().set_state((kind, keys.numpy(), pos, has_gauss, cached))
        except (TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"trainer.pt: rng.numpy state does not load: {exc}") from None


def _dtype_kind(dtype: torch.dtype) -> str:
    return "complex" if dtype.is_complex else "floating" if dtype.is_floating_point else "integer"


def _check_model(model: torch.nn.Module, state: Any) -> None:
    if not isinstance(state, Mapping):
        raise ValueError(f"model.pt: expected a state dict, got {type(state).__name__}")
    live = model.state_dict()
    missing, unexpected = sorted(set(live) - set(state)), sorted(set(state) - set(live))
    if missing or unexpected:
        raise ValueError(f"model.pt: keys differ from the live model's (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    for key, live_value in live.items():
        saved = state[key]
        if not isinstance(live_value, torch.Tensor) or torch.nn.parameter.is_lazy(live_value):
            continue
        if not isinstance(saved, torch.Tensor):
            raise ValueError(f"model.pt: {key} is a {type(saved).__name__}, the live model holds a tensor")
        if saved.shape != live_value.shape:
            raise ValueError(f"model.pt: {key} has shape {tuple(saved.shape)}, "
                             f"the live model's {tuple(live_value.shape)}")
        if _dtype_kind(saved.dtype) != _dtype_kind(live_value.dtype):
            raise ValueError(f"model.pt: {key} is {saved.dtype}, the live model's {live_value.dtype}")


def _check_optimizer(optimizer: torch.optim.Optimizer, state: Any) -> None:
    if not isinstance(state, Mapping) or not isinstance(state.get("state"), Mapping) \
            or not isinstance(state.get("param_groups"), list):
        raise ValueError("optimizer.pt: expected an optimizer state dict ({'state': ..., 'param_groups': [...]})")
    groups, live_groups = state["param_groups"], optimizer.param_groups
    if len(groups) != len(live_groups):
        raise ValueError(f"optimizer.pt: {len(groups)} param groups, the live optimizer has {len(live_groups)}")
    params_by_id: dict[Any, torch.Tensor] = {}
    for index, (group, live_group) in enumerate(zip(groups, live_groups)):
        if not isinstance(group, Mapping) or not isinstance(group.get("params"), list):
            raise ValueError(f"optimizer.pt: param group {index} has no 'params' list")
        if len(group["params"]) != len(live_group["params"]):
            raise ValueError(f"optimizer.pt: param group {index} has {len(group['params'])} parameters, "
                             f"the live one {len(live_group['params'])}")
        params_by_id.update(zip(group["params"], live_group["params"]))
    for param_id, param_state in state["state"].items():
        param = params_by_id.get(param_id)
        if param is None:
            raise ValueError(f"optimizer.pt: state for parameter id {param_id!r}, which no param group lists")
        if not isinstance(param_state, Mapping):
            raise ValueError(f"optimizer.pt: state of parameter {param_id!r} is not a dict")
        live_state = optimizer.state.get(param, {})
        for name, value in param_state.items():
            if not isinstance(value, torch.Tensor):
                continue
            expected = live_state.get(name)
            if isinstance(expected, torch.Tensor):
                shape = expected.shape
            elif name in _PARAM_SHAPED:
                shape = param.shape
            else:
                continue
            if value.shape != shape:
                raise ValueError(f"optimizer.pt: {name} of parameter {param_id!r} has shape {tuple(value.shape)}, "
                                 f"expected {tuple(shape)}")


def _check_scheduler(scheduler: Any, state: Any) -> None:
    if scheduler is None:
        return
    if state is None:
        raise ValueError("trainer.pt: holds no scheduler state, but a scheduler was given")
    if not isinstance(state, Mapping):
        raise ValueError(f"trainer.pt: scheduler state must be a dict, got {type(state).__name__}")
    for key, live_value in scheduler.state_dict().items():
        if isinstance(live_value, list) and key in state:
            saved = state[key]
            if not isinstance(saved, list) or len(saved) != len(live_value):
                raise ValueError(f"trainer.pt: scheduler {key} does not match the live scheduler's "
                                 f"({len(live_value)} entries)")


def _check_scaler(scaler: Any, state: Any) -> None:
    if scaler is None or not getattr(scaler, "is_enabled", lambda: True)():
        return
    if not isinstance(state, Mapping) or not state:
        raise ValueError("trainer.pt: holds no GradScaler state, but an enabled GradScaler was given")
    scale = state.get("scale")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"trainer.pt: GradScaler scale must be a finite number > 0, got {scale!r:.80}")


def check_loaded_state(loaded: Mapping[str, Any], *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                       scheduler: Any = None, scaler: Any = None) -> None:
    """Check deserialised checkpoint files against the live objects, changing nothing.

    Args:
        loaded: ``{"model.pt": ..., "optimizer.pt": ..., "trainer.pt": ...}`` as torch.load returned them.
        model: the live model (unwrapped from DDP).
        optimizer: the live optimizer.
        scheduler: the live scheduler or None.
        scaler: the live GradScaler or None.

    Raises:
        ValueError: naming the file and the entry that does not fit.
    """
    _check_model(model, loaded["model.pt"])
    _check_optimizer(optimizer, loaded["optimizer.pt"])
    trainer = loaded["trainer.pt"]
    if not isinstance(trainer, Mapping) or not {"scheduler", "scaler", "rng"} <= set(trainer):
        raise ValueError("trainer.pt: expected a dict with 'scheduler', 'scaler' and 'rng'")
    _check_scheduler(scheduler, trainer["scheduler"])
    _check_scaler(scaler, trainer["scaler"])
    _check_rng(trainer["rng"])


def apply_loaded_state(loaded: Mapping[str, Any], *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                       scheduler: Any = None, scaler: Any = None) -> None:
    """Put checked state into the live objects; if any part fails, undo the parts already applied.

    The model goes last: its ``load_state_dict`` copies into the live tensors,
    which nothing can undo without a second copy of the weights. Every check it
    makes was made by :func:`check_loaded_state`, so only a module's own
    ``_load_from_state_dict`` override raising could leave it partly loaded.

    Args:
        loaded: state that passed :func:`check_loaded_state` with the same objects.
        model: the live model (unwrapped from DDP).
        optimizer: the live optimizer.
        scheduler: the live scheduler or None.
        scaler: the live GradScaler or None.

    Raises:
        Exception: whatever a ``load_state_dict`` raised, after the undo.
    """
    trainer = loaded["trainer.pt"]
    # What the undo needs, taken before anything changes (all small).
    undo: list[Callable[[], None]] = []
    scheduler_before = copy.deepcopy(scheduler.state_dict()) if scheduler is not None else None
    scaler_before = scaler.state_dict() if scaler is not None else None
    rng_before = capture_rng()
    optimizer_before = {"state": optimizer.state, "param_groups": optimizer.param_groups}
    try:
        if scheduler is not None:
            # a copy: LambdaLR.load_state_dict pops entries from the dict it is given
            scheduler.load_state_dict(dict(trainer["scheduler"]))
            undo.append(lambda: scheduler.load_state_dict(scheduler_before))
        if scaler is not None and trainer["scaler"] is not None:
            scaler.load_state_dict(trainer["scaler"])
            undo.append(lambda: scaler.load_state_dict(scaler_before))
        undo.append(lambda: _apply_rng(rng_before))
        _apply_rng(trainer["rng"])
        # load_state_dict builds new state objects and swaps them in: the old ones
        # are intact, and re-installing them is the undo.
        optimizer.load_state_dict(loaded["optimizer.pt"])
        undo.append(lambda: optimizer.__setstate__(optimizer_before))
        try:
            model.load_state_dict(loaded["model.pt"])
        except BaseException:
            log.error("adamwatch: the model's load_state_dict raised after every check passed; "
                      "its weights may be partly loaded (optimizer, scheduler, scaler and RNG are undone)")
            raise
    except BaseException:
        for step in reversed(undo):
            try:
                step()
            except Exception:  # noqa: BLE001 - keep undoing the rest
                log.exception("adamwatch: could not undo part of a failed checkpoint restore")
        raise
