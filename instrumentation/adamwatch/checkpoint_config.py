"""What a checkpoint records about the optimizer's configuration, and how a restore compares it.

``trainer.pt`` of every checkpoint carries two more entries:

| key | what | why |
| --- | --- | --- |
| ``optimizer_config`` | :func:`adamwatch.optimizer_config.capture_config` at save time (``config_hash`` beside it) | a restore refuses a checkpoint saved with other hyperparameters, naming the fields |
| ``lr_scale`` | adamwatch's cumulative learning-rate factor per param group | the scale travels with the rates it describes (also kept in the param groups) |

Checkpoints written before these entries existed restore as before (nothing to compare).
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Mapping

import torch

from .lr_control import current_lr_scales
from .optimizer_config import capture_config, config_hash, diff_configs

__all__ = ["ON_MISMATCH", "saved_config_entries", "config_differences"]

log = logging.getLogger(__name__)

#: what restore() does with a checkpoint saved under another configuration
ON_MISMATCH = ("refuse", "warn")


def _capture(optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any) -> dict[str, Any] | None:
    try:
        return capture_config(optimizer, scheduler, scaler)
    except TypeError:  # not an Adam/AdamW: the Checkpointer still works, without the check
        return None


def saved_config_entries(optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any) -> dict[str, Any]:
    """The entries added to ``trainer.pt`` at save time.

    Args:
        optimizer, scheduler, scaler: the live objects being saved.

    Returns:
        ``{"optimizer_config", "config_hash", "lr_scale"}`` (config None for a non-Adam optimizer).
    """
    config = _capture(optimizer, scheduler, scaler)
    return {"optimizer_config": config, "config_hash": config_hash(config) if config is not None else None,
            "lr_scale": [float(s) for s in current_lr_scales(optimizer)]}


def config_differences(trainer_state: Mapping[str, Any], optimizer: torch.optim.Optimizer, scheduler: Any,
                       scaler: Any) -> list[str]:
    """The fields in which the checkpoint's configuration differs from the live one.

    Args:
        trainer_state: the loaded ``trainer.pt``.
        optimizer, scheduler, scaler: the live objects.

    Returns:
        Lines ``"path: checkpoint -> live"``; empty when equal or when the checkpoint recorded none.
    """
    saved = trainer_state.get("optimizer_config")
    if not isinstance(saved, Mapping):
        return []
    live = _capture(optimizer, scheduler, scaler)
    if live is None:
        return []
    saved = copy.deepcopy(dict(saved))
    for config in (saved, live):
        others = live if config is saved else saved
        for index, group in enumerate(config.get("param_groups") or []):
            other = (others.get("param_groups") or [])[index:index + 1]
            if group.get("peak_lr_source") == "lr" or (other and other[0].get("peak_lr_source") == "lr"):
                # No scheduler holds this group's peak: "peak_lr" is whatever rate was
                # current (ReduceLROnPlateau may have cut it), not a setting to compare.
                group.pop("peak_lr", None)
    return diff_configs(saved, live)

