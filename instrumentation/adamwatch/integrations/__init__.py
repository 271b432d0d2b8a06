"""Framework adapters: one line to watch a run in the stack people train with.

One module per framework, each a thin callback on the public Monitor API, and
each imported only when used (the framework is an optional dependency):

| stack | the line |
| --- | --- |
| Hugging Face ``Trainer`` | ``Trainer(..., callbacks=[adamwatch.integrations.huggingface.AdamwatchCallback()])`` |
| PyTorch Lightning | ``L.Trainer(..., callbacks=[adamwatch.integrations.lightning.AdamwatchCallback()])`` |
| Accelerate | ``adamwatch.watch(accelerated_optimizer, scheduler=accelerated_scheduler)`` (unwrapped by :mod:`adamwatch.unwrap`) |
"""

__all__: list[str] = []
