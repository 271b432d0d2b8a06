"""Watch a PyTorch Lightning run with one line: ``L.Trainer(callbacks=[AdamwatchCallback()])``.

    import lightning as L
    from adamwatch.integrations.lightning import AdamwatchCallback

    trainer = L.Trainer(max_steps=1000, accumulate_grad_batches=4, gradient_clip_val=1.0,
                        callbacks=[AdamwatchCallback(job="my-run")])
    trainer.fit(module, loader)

Lightning runs forward and backward *inside* ``optimizer.step(closure)``, after
torch's pre-step hooks: a monitor relying on those would summarise the previous
step's gradients, export no loss, and set the fused guard's ``found_inf`` one
step late. This callback drives the moment instead: from
``on_before_optimizer_step`` (after backward and unscaling, before clipping and
before the update) it calls ``monitor.summarize_step()``.

| exported | what it is under Lightning |
| --- | --- |
| ``adamwatch_loss`` | the mean of ``training_step``'s losses over the ``accumulate_grad_batches`` micro-batches of the step (the sum of what Lightning backpropagates), this rank's |
| ``adamwatch_grad_norm{param_group="all"}`` | the norm of the unscaled gradients before ``gradient_clip_val`` clips them (what ``lightning.pytorch.utilities.grad_norm`` gives in ``on_before_optimizer_step``) |
| ``adamwatch_learning_rate`` | the rate each param group steps with |
| skipped steps | with fused Adam/AdamW a non-finite step is skipped by the kernel (``found_inf``), no host sync |

Manual optimization (``self.automatic_optimization = False``) works with the
same callback: ``opt.step()`` of the ``LightningOptimizer`` calls
``on_before_optimizer_step`` too, and the loss is the sum of what you pass to
``self.manual_backward()`` since the previous step, so pass the loss you
backpropagate divided by your number of micro-batches (as accumulation needs
anyway). Clipping with ``self.clip_gradients(...)`` before ``opt.step()``
leaves the exported norm the pre-clip one: adamwatch observes
``clip_grad_norm_`` wherever it runs.

One optimizer is watched: the first one ``configure_optimizers`` returns (or
the one passed as ``optimizer_index``), with its scheduler. The callback takes
:func:`adamwatch.watch`'s options; failures inside adamwatch are counted and
logged once and never stop ``trainer.fit()``.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import Callback

from adamwatch.integrations._adapter import AdapterBase, WindowLoss, guarded

__all__ = ["AdamwatchCallback"]


class AdamwatchCallback(AdapterBase, Callback):
    """A Lightning ``Callback`` that watches one optimizer of the run.

    Args:
        optimizer_index: which of ``trainer.optimizers`` to watch (default the first).
        **watch_options: passed to :func:`adamwatch.watch` (``endpoint``, ``job``,
            ``checkpointer``, ``deep_stats_every``, ``guard``, ...).

    Attributes:
        monitor: the :class:`adamwatch.Monitor` while ``fit`` runs.
        errors: failures inside the callback (each also counted on the monitor).
    """

    framework = "lightning"

    def __init__(self, *, optimizer_index: int = 0, **watch_options: Any):
        AdapterBase.__init__(self, **watch_options)
        self.optimizer_index = optimizer_index
        self._window = WindowLoss()
        self._grad_scaler: Any = None

    # ------------------------------------------------------------------ lifecycle
    @guarded("on_train_start")
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._window.reset()
        optimizers = trainer.optimizers
        if not optimizers:
            raise RuntimeError("AdamwatchCallback: the LightningModule configured no optimizer; nothing to watch")
        optimizer = optimizers[self.optimizer_index]
        scheduler = None
        for config in getattr(trainer, "lr_scheduler_configs", None) or ():
            if getattr(config.scheduler, "optimizer", None) is optimizer:
                scheduler = config.scheduler
                break
        # 16-mixed: Lightning's GradScaler scales what reaches on_before_backward;
        # watch() also reports the steps it skips.
        self._grad_scaler = getattr(trainer.precision_plugin, "scaler", None)
        if self._grad_scaler is not None:
            self.watch_options.setdefault("scaler", self._grad_scaler)
        self._watch(optimizer, scheduler, pl_module)

    @guarded("on_train_end")
    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._close()

    @guarded("on_exception")
    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        # Flush what was measured up to the failure and say goodbye.
        self._close()

    # ------------------------------------------------------------------ each step
    @guarded("on_before_backward")
    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Any) -> None:
        # Automatic optimization passes training_step's loss / accumulate_grad_batches:
        # summed over the window, the window's mean.
        if self.monitor is None:
            return
        scaler = self._grad_scaler
        if scaler is not None and getattr(scaler, "_scale", None) is not None:
            loss = loss.detach() / scaler._scale  # a device tensor: no sync
        self._window.add(loss)

    @guarded("on_before_optimizer_step")
    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        monitor = self.monitor
        if monitor is None or optimizer is not monitor.optimizer:
            return
        loss = self._window.take()
        if loss is not None:
            monitor.observe_loss(loss)
        # This step's gradients, complete, unscaled and not yet clipped; the
        # fused guard's found_inf is set before the kernel reads it.
        monitor.summarize_step()
