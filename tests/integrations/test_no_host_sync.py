"""The adapters add no host read of a tensor to a framework's training loop.

Host reads of device tensors are what stall a GPU; on a CPU machine they are
counted through the Tensor methods that perform them (tests/trainer/test_no_host_sync.py),
on the training thread only. A framework makes reads of its own (HF's NaN
filter, Lightning's bookkeeping); the claim is that a watched run makes exactly
as many as a bare one.
"""

from __future__ import annotations

import pytest
import torch

from ..trainer.test_no_host_sync import HostReadCounter

pytestmark = pytest.mark.slow


def test_hf_trainer_with_the_callback_reads_no_more_than_without(tmp_path):
    pytest.importorskip("transformers")
    from transformers import Trainer

    from adamwatch.integrations.huggingface import AdamwatchCallback

    from .test_huggingface import synthetic_tokens, tiny_gpt2, training_args

    def reads(watched: bool) -> list[str]:
        callbacks = [AdamwatchCallback(endpoint=None, job="hf-sync", rank=0, deep_stats_every=2)] if watched else []
        args = training_args(tmp_path, max_steps=6, optim="adamw_torch_fused", logging_steps=100)
        trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=synthetic_tokens(), callbacks=callbacks)
        counter = HostReadCounter()
        with counter.counting():
            trainer.train()
        return counter.calls

    bare, watched = reads(False), reads(True)
    assert len(bare) > 0, "the counter sees Trainer's own reads"
    assert sorted(watched) == sorted(bare)


def test_lightning_with_the_callback_reads_no_more_than_without():
    pytest.importorskip("lightning")
    from adamwatch.integrations.lightning import AdamwatchCallback

    from .test_lightning import TinyRegression, fit

    def reads(watched: bool) -> list[str]:
        counter = HostReadCounter()
        callback = AdamwatchCallback(endpoint=None, job="pl-sync", rank=0, deep_stats_every=2) if watched else None
        module = TinyRegression(fused=True, record=False)
        with counter.counting():
            fit(module, callback, max_steps=6, accumulate_grad_batches=2, gradient_clip_val=0.5)
        return counter.calls

    bare, watched = reads(False), reads(True)
    assert sorted(watched) == sorted(bare)
