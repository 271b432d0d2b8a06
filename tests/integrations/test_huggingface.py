"""HF Trainer with ``callbacks=[AdamwatchCallback()]``: /metrics of a real sidecar shows what Trainer logs."""

from __future__ import annotations

import logging

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from adamwatch.integrations.huggingface import AdamwatchCallback  # noqa: E402

pytestmark = pytest.mark.slow


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                      bos_token_id=0, eos_token_id=0))


def synthetic_tokens(n: int = 64, length: int = 16) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 64, (length,), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


class LogRecorder(TrainerCallback):
    """What Trainer itself logs, step by step (logging_steps=1)."""

    def __init__(self) -> None:
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.logs.append(dict(logs, step=state.global_step))


def training_args(tmp_path, **overrides) -> TrainingArguments:
    options = dict(
        output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4,
        gradient_accumulation_steps=3, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
        max_grad_norm=0.05, learning_rate=1e-3, warmup_steps=2, disable_tqdm=True, seed=0,
    )
    options.update(overrides)
    return TrainingArguments(**options)


@pytest.mark.parametrize("max_grad_norm", [0.05, 0.0])
def test_metrics_show_what_trainer_logs(sidecar, tmp_path, max_grad_norm):
    """Window-mean loss, pre-clip grad_norm (clipping at 0.05 acts; 0 = Trainer only measures) and lr."""
    recorder = LogRecorder()
    job = f"hf-{max_grad_norm}"
    callback = AdamwatchCallback(endpoint=sidecar.endpoint, job=job, rank=0, deep_stats_every=0)
    trainer = Trainer(model=tiny_gpt2(), args=training_args(tmp_path, max_grad_norm=max_grad_norm),
                      train_dataset=synthetic_tokens(), callbacks=[callback, recorder])
    trainer.train()

    labels = {"job": job, "rank": "0"}
    sidecar.wait_value("adamwatch_optimizer_step", lambda v: v == 4, **labels)
    assert callback.errors == 0 and callback.monitor is None, "closed on train end, no failure"
    last = recorder.logs[-1]
    assert last["step"] == 4 and len(recorder.logs) == 4
    assert last["grad_norm"] > 0.05 * 2, "the test needs clipping to act when it is on"
    assert sidecar.value("adamwatch_clipped_steps_total", **labels) == (4 if max_grad_norm else 0)
    assert sidecar.value("adamwatch_steps_total", **labels) == 4
    assert sidecar.value("adamwatch_loss", **labels) == pytest.approx(last["loss"], rel=1e-6)
    assert sidecar.value("adamwatch_grad_norm", param_group="all", **labels) == pytest.approx(last["grad_norm"], rel=1e-5)
    assert sidecar.value("adamwatch_learning_rate", param_group="0", **labels) == pytest.approx(
        last["learning_rate"], rel=1e-9)
    assert sidecar.value("adamwatch_trainer_finished", **labels) == 1


def test_the_window_mean_is_not_the_last_micro_batch(sidecar, tmp_path):
    """With 3 micro-batches of different loss per step, the last one alone is measurably off."""
    seen: list[list[float]] = []

    class MicroLosses(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            seen.append([])

    recorder = LogRecorder()
    callback = AdamwatchCallback(endpoint=sidecar.endpoint, job="hf-ga", rank=0, deep_stats_every=0)
    trainer = Trainer(model=tiny_gpt2(), args=training_args(tmp_path, max_steps=2),
                      train_dataset=synthetic_tokens(), callbacks=[MicroLosses(), callback, recorder])
    original = trainer.training_step

    def training_step(*a, **kw):
        loss = original(*a, **kw)
        seen[-1].append(float(loss))
        return loss

    trainer.training_step = training_step
    trainer.train()
    labels = {"job": "hf-ga", "rank": "0"}
    sidecar.wait_value("adamwatch_optimizer_step", lambda v: v == 2, **labels)
    exported = sidecar.value("adamwatch_loss", **labels)
    assert exported == pytest.approx(recorder.logs[-1]["loss"], rel=1e-6)
    assert exported == pytest.approx(sum(seen[-1]), rel=1e-6)
    assert abs(exported - 3 * seen[-1][-1]) > 1e-4, "the last micro-batch alone would differ"


def test_a_monitor_that_cannot_start_does_not_stop_training(tmp_path, caplog):
    """watch() refusing its arguments is logged and counted; trainer.train() finishes all its steps."""
    callback = AdamwatchCallback(endpoint="bogus://nowhere", job="hf-bad", rank=0)
    trainer = Trainer(model=tiny_gpt2(), args=training_args(tmp_path, max_steps=2), train_dataset=synthetic_tokens(),
                      callbacks=[callback])
    with caplog.at_level(logging.ERROR, logger="adamwatch"):
        result = trainer.train()
    assert result.global_step == 2
    assert callback.errors == 1 and callback.monitor is None
    assert "endpoint" in caplog.text and "training continues" in caplog.text


def test_the_callback_refuses_the_objects_the_trainer_owns():
    with pytest.raises(TypeError, match="optimizer"):
        AdamwatchCallback(optimizer=object())


class NaNAtStep(Trainer):
    """A user's Trainer whose loss turns NaN at one optimizer step (every micro-batch of it)."""

    nan_at_step = 2

    def compute_loss(self, model, inputs, *args, **kwargs):
        loss = super().compute_loss(model, inputs, *args, **kwargs)
        if self.state.global_step == self.nan_at_step:
            loss = loss * float("nan")
        return loss


def total(sidecar, name: str, job: str) -> float:
    return sum(v for (n, lab), v in sidecar.samples().items() if n == name and ("job", job) in lab)


def test_fused_adamw_skips_a_nan_step_without_stopping_training(sidecar, tmp_path):
    callback = AdamwatchCallback(endpoint=sidecar.endpoint, job="hf-nan", rank=0, deep_stats_every=0)
    model = tiny_gpt2()
    trainer = NaNAtStep(model=model, args=training_args(tmp_path, max_steps=5, optim="adamw_torch_fused"),
                        train_dataset=synthetic_tokens(), callbacks=[callback])
    trainer.train()
    labels = {"job": "hf-nan", "rank": "0"}
    sidecar.wait_value("adamwatch_optimizer_step", lambda v: v == 5, **labels)
    assert all(torch.isfinite(p).all() for p in model.parameters()), "the NaN step was applied"
    assert sidecar.value("adamwatch_nonfinite_steps_total", source="loss", **labels) == 1
    assert total(sidecar, "adamwatch_skipped_steps_total", "hf-nan") == 1


def test_an_lr_cut_persists_through_trainers_warmup_schedule(tmp_path):
    """monitor.reduce_lr(0.5) mid-run: every later logged learning_rate is half the uncut linear schedule's."""

    class CutAtStep2(TrainerCallback):
        def __init__(self, adamwatch_callback):
            self.adamwatch_callback = adamwatch_callback

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                self.adamwatch_callback.monitor.reduce_lr(0.5, reason="test")

    def run(cut: bool) -> list[float]:
        recorder = LogRecorder()
        callback = AdamwatchCallback(endpoint=None, job="hf-cut", rank=0, deep_stats_every=0)
        callbacks = [callback, recorder] + ([CutAtStep2(callback)] if cut else [])
        args = training_args(tmp_path, max_steps=8, gradient_accumulation_steps=1, warmup_steps=3,
                             lr_scheduler_type="linear")
        Trainer(model=tiny_gpt2(), args=args, train_dataset=synthetic_tokens(), callbacks=callbacks).train()
        return [log["learning_rate"] for log in recorder.logs]

    uncut, cut = run(False), run(True)
    assert cut[:2] == uncut[:2]
    ratios = [c / u for c, u in zip(cut[4:], uncut[4:]) if u]
    assert len(ratios) >= 3 and ratios == pytest.approx([0.5] * len(ratios), rel=1e-9)


def test_a_checkpointer_factory_gets_the_torch_objects_trainer_built(tmp_path):
    """Trainer builds its optimizer inside train(): checkpointer= may be a factory, called with the torch objects."""
    import adamwatch

    built = {}

    def make_checkpointer(*, model, optimizer, scheduler):
        built.update(model=model, optimizer=optimizer, scheduler=scheduler)
        return adamwatch.Checkpointer(tmp_path / "ckpt", model=model, optimizer=optimizer, scheduler=scheduler)

    class SaveEveryStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            callback.monitor.checkpointer.save(state.global_step)

    callback = AdamwatchCallback(endpoint=None, job="hf-ckpt", rank=0, checkpointer=make_checkpointer)
    model = tiny_gpt2()
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=3), train_dataset=synthetic_tokens(),
                      callbacks=[callback, SaveEveryStep()])
    trainer.train()
    assert callback.errors == 0
    assert built["model"] is model and type(built["optimizer"]) is torch.optim.AdamW
    assert built["optimizer"] is trainer.optimizer.optimizer  # the torch one inside AcceleratedOptimizer
    assert built["scheduler"] is trainer.lr_scheduler
    assert sorted(tmp_path.joinpath("ckpt").iterdir()), "the checkpointer saved"
