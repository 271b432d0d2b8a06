"""Lightning with ``callbacks=[AdamwatchCallback()]``: /metrics of a real sidecar shows this step's numbers.

Lightning runs backward inside ``optimizer.step(closure)``; these tests fail when
the monitor summarises at torch's pre-step hook (no loss, the previous step's
norm, a NaN step applied by fused AdamW).
"""

from __future__ import annotations

import math

import pytest
import torch

L = pytest.importorskip("lightning")

from lightning.pytorch.utilities import grad_norm  # noqa: E402

from adamwatch.integrations.lightning import AdamwatchCallback  # noqa: E402

pytestmark = pytest.mark.slow


class TinyRegression(L.LightningModule):
    """Records, per optimizer step, what Lightning itself computes: losses, pre-clip norm, lr."""

    def __init__(self, fused: bool = False, nan_at_step: int | None = None, manual: bool = False,
                 accumulate: int = 1, record: bool = True):
        super().__init__()
        self.record = record  # False: no host reads of its own (tests that count them)
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
        self.fused = fused
        self.nan_at_step = nan_at_step
        self.automatic_optimization = not manual
        self.accumulate = accumulate
        self.window: list[float] = []
        self.steps: list[dict] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y) * (1 + batch_idx % 3)  # micro-batches differ
        if self.nan_at_step is not None and self.trainer.global_step == self.nan_at_step:
            loss = loss * float("nan")
        if self.record:
            self.window.append(float(loss))
        if self.automatic_optimization:
            return loss
        opt = self.optimizers()
        self.manual_backward(loss / self.accumulate)
        if (batch_idx + 1) % self.accumulate == 0:
            opt.step()
            opt.zero_grad()
        return None

    def on_before_optimizer_step(self, optimizer):
        if not self.record:
            return
        norms = grad_norm(self, norm_type=2)
        self.steps.append({
            "loss": sum(self.window) / len(self.window),
            "norm": float(norms["grad_2.0_norm_total"]),
            "lr": optimizer.param_groups[0]["lr"],
        })
        self.window = []

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2, fused=self.fused)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def loader(n: int = 48):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 8, generator=g)
    y = torch.randn(n, 1, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)


def total(sidecar, name: str, job: str) -> float:
    """A counter summed over its other labels (reason, source)."""
    return sum(v for (n, lab), v in sidecar.samples().items() if n == name and ("job", job) in lab)


def fit(module, callback, **trainer_options):
    options = dict(max_steps=4, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False)
    options.update(trainer_options)
    L.Trainer(callbacks=[callback] if callback is not None else [], **options).fit(module, loader())


@pytest.mark.parametrize("fused", [False, True])
def test_metrics_show_this_steps_loss_preclip_norm_and_lr(sidecar, fused):
    job = f"pl-{fused}"
    module = TinyRegression(fused=fused)
    callback = AdamwatchCallback(endpoint=sidecar.endpoint, job=job, rank=0, deep_stats_every=0)
    fit(module, callback, accumulate_grad_batches=3, gradient_clip_val=0.05)

    labels = {"job": job, "rank": "0"}
    sidecar.wait_value("adamwatch_optimizer_step", lambda v: v == 4, **labels)
    assert callback.errors == 0 and callback.monitor is None
    last = module.steps[-1]
    assert len(module.steps) == 4 and last["norm"] > 0.1, "clipping at 0.05 must act"
    assert sidecar.value("adamwatch_steps_total", **labels) == 4
    assert sidecar.value("adamwatch_loss", **labels) == pytest.approx(last["loss"], rel=1e-5)
    assert sidecar.value("adamwatch_grad_norm", param_group="all", **labels) == pytest.approx(last["norm"], rel=1e-5)
    assert sidecar.value("adamwatch_learning_rate", param_group="0", **labels) == pytest.approx(last["lr"], rel=1e-9)
    assert total(sidecar, "adamwatch_skipped_steps_total", job) == 0


def test_fused_adamw_skips_the_nan_step_it_flags(sidecar):
    """A NaN loss at step 2: the fused kernel skips exactly that step; parameters stay finite."""
    module = TinyRegression(fused=True, nan_at_step=2)
    callback = AdamwatchCallback(endpoint=sidecar.endpoint, job="pl-nan", rank=0, deep_stats_every=0)
    fit(module, callback, max_steps=6)
    labels = {"job": "pl-nan", "rank": "0"}
    sidecar.wait_value("adamwatch_optimizer_step", lambda v: v == 6, **labels)
    assert all(torch.isfinite(p).all() for p in module.parameters()), "the NaN step was applied"
    assert sidecar.value("adamwatch_nonfinite_steps_total", source="loss", **labels) == 1
    assert total(sidecar, "adamwatch_skipped_steps_total", "pl-nan") == 1, \
        "exactly the flagged step is skipped, not the ones after it"
    assert math.isfinite(sidecar.value("adamwatch_loss", **labels))


def test_manual_optimization(sidecar):
    """self.manual_backward(loss / k) and opt.step() every k batches: same numbers as automatic."""
    module = TinyRegression(manual=True, accumulate=2)
    callback = AdamwatchCallback(endpoint=sidecar.endpoint, job="pl-manual", rank=0, deep_stats_every=0)
    fit(module, callback, max_steps=3)
    labels = {"job": "pl-manual", "rank": "0"}
    sidecar.wait_value("adamwatch_optimizer_step", lambda v: v == 3, **labels)
    last = module.steps[-1]
    assert sidecar.value("adamwatch_loss", **labels) == pytest.approx(last["loss"], rel=1e-5)
    assert sidecar.value("adamwatch_grad_norm", param_group="all", **labels) == pytest.approx(last["norm"], rel=1e-5)


def test_a_monitor_error_does_not_stop_fit():
    module = TinyRegression()
    callback = AdamwatchCallback(endpoint="bogus://x", job="pl-bad", rank=0)
    fit(module, callback, max_steps=2)
    assert len(module.steps) == 2 and callback.errors == 1 and callback.monitor is None


def test_a_failure_inside_the_callback_is_counted_on_metrics_and_fit_goes_on(sidecar):
    """Never silently blind: a callback failure mid-run reaches /metrics under its own `where`."""

    class Faulty(AdamwatchCallback):
        def on_before_backward(self, trainer, pl_module, loss):
            if trainer.global_step == 1:
                loss = "not a loss"  # the adapter's own code fails on this one micro-batch
            return super().on_before_backward(trainer, pl_module, loss)

    module = TinyRegression()
    callback = Faulty(endpoint=sidecar.endpoint, job="pl-faulty", rank=0, deep_stats_every=0)
    fit(module, callback, max_steps=4)
    labels = {"job": "pl-faulty", "rank": "0"}
    sidecar.wait_value("adamwatch_optimizer_step", lambda v: v == 4, **labels)
    assert len(module.steps) == 4 and callback.errors == 1
    sidecar.wait_value("adamwatch_monitor_errors_total", lambda v: v == 1,
                       where="lightning adapter: on_before_backward", **labels)
    assert sidecar.value("adamwatch_loss", **labels) == pytest.approx(module.steps[-1]["loss"], rel=1e-5)
