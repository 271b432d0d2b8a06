"""Watch a Hugging Face ``Trainer`` run with one line: ``callbacks=[AdamwatchCallback()]``.

    from transformers import Trainer
    from adamwatch.integrations.huggingface import AdamwatchCallback

    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[AdamwatchCallback(job="gpt2-ft")])
    trainer.train()

| exported | what it is under ``Trainer`` | the number Trainer logs |
| --- | --- | --- |
| ``adamwatch_loss`` | the sum of ``training_step``'s returns over the step's micro-batches: the mean loss of the accumulation window (token-weighted when the model takes ``num_items_in_batch``), this rank's, NaN included | ``loss`` with ``logging_steps=1`` (Trainer averages over ranks and replaces a NaN micro-batch by the running mean) |
| ``adamwatch_grad_norm{param_group="all"}`` | the norm of the unscaled gradients before clipping (``max_grad_norm``) | ``grad_norm`` |
| ``adamwatch_learning_rate`` | the rate each param group stepped with | ``learning_rate`` |

The callback takes :func:`adamwatch.watch`'s options (``endpoint``, ``job``,
``checkpointer``, ``deep_stats_every``, ``guard``, ...). It unwraps Trainer's
``AcceleratedOptimizer`` and scheduler wrapper, so learning-rate cuts persist
through HF's ``LambdaLR`` warmup schedules, and closes the monitor when
training ends. A failure inside adamwatch is counted and logged once; it never
stops ``trainer.train()``.
"""

from __future__ import annotations

import sys
from typing import Any

from transformers import Trainer, TrainerCallback

from adamwatch.integrations._adapter import AdapterBase, WindowLoss, guarded

__all__ = ["AdamwatchCallback"]

# on_train_begin runs a few frames below Trainer's training loop; deeper means
# someone else called the callback and there is no Trainer to read the loss from.
_MAX_FRAMES = 12


def _calling_trainer() -> Trainer | None:
    """The Trainer whose loop is calling us (callbacks are given no reference to it)."""
    frame = sys._getframe(1)
    for _ in range(_MAX_FRAMES):
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer):
            return candidate
        frame = frame.f_back
    return None


class AdamwatchCallback(AdapterBase, TrainerCallback):
    """A ``TrainerCallback`` that watches the optimizer Trainer builds.

    Args:
        **watch_options: passed to :func:`adamwatch.watch` (not ``optimizer`` or
            ``scheduler``: they come from the Trainer).

    Attributes:
        monitor: the :class:`adamwatch.Monitor` while training runs (None before,
            after, and when ``watch()`` refused the optimizer).
        errors: failures inside the callback itself (each also counted on the monitor).
    """

    framework = "huggingface"

    def __init__(self, **watch_options: Any):
        AdapterBase.__init__(self, **watch_options)
        self._window = WindowLoss()
        self._trainer: Trainer | None = None

    # ------------------------------------------------------------------ Trainer events
    @guarded("on_train_begin")
    def on_train_begin(self, args: Any, state: Any, control: Any, *, model: Any = None, optimizer: Any = None,
                       lr_scheduler: Any = None, **kwargs: Any) -> None:
        self._window.reset()
        self._watch(optimizer, lr_scheduler, model)
        self._hook_loss(_calling_trainer())

    @guarded("on_pre_optimizer_step")
    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # Between clipping and optimizer.step(): the window's loss is complete.
        loss = self._window.take()
        if self.monitor is not None and loss is not None:
            self.monitor.observe_loss(loss)

    @guarded("on_train_end")
    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._unhook_loss()
        self._close()

    # ------------------------------------------------------------------ the loss
    def _hook_loss(self, trainer: Trainer | None) -> None:
        """Sum what ``training_step`` returns: the loss Trainer backpropagates, already
        divided by the number of micro-batches (or normalised by the window's tokens)."""
        self._unhook_loss()
        if trainer is None:
            raise RuntimeError("AdamwatchCallback: no transformers.Trainer found calling on_train_begin; "
                               "the loss is not exported (norms and learning rates are)")
        original = trainer.training_step
        window = self._window

        def training_step(*args: Any, **kwargs: Any) -> Any:
            loss = original(*args, **kwargs)
            try:
                window.add(loss)
            except Exception:
                self._report_error("loss of a micro-batch")
            return loss

        training_step.adamwatch_original = original  # type: ignore[attr-defined]
        trainer.training_step = training_step  # type: ignore[method-assign]
        self._trainer = trainer

    def _unhook_loss(self) -> None:
        trainer, self._trainer = self._trainer, None
        if trainer is not None and hasattr(trainer.__dict__.get("training_step"), "adamwatch_original"):
            del trainer.training_step  # back to the class's method
