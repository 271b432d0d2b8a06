"""SummaryTransfer on the CPU: bounded, never blocking, oldest first."""

from __future__ import annotations

import torch

from adamwatch.transfer import SummaryTransfer


def test_a_cpu_transfer_holds_a_100_ms_burst_of_fast_steps_then_drops_and_counts():
    # The client collects once per 100 ms pause: steps of 0.1 ms must all fit.
    transfer = SummaryTransfer(torch.device("cpu"), max_length=8, dtype=torch.float32)
    accepted = [transfer.submit(torch.full((3,), float(i)), i) for i in range(1024)]
    assert all(accepted)
    assert transfer.submit(torch.zeros(3), "late") is False
    assert transfer.dropped == 1
    items = transfer.collect(0)
    assert [layout for _, layout in items] == list(range(1024))
    assert items[5][0] == [5.0, 5.0, 5.0]
    assert transfer.submit(torch.zeros(3), "after") is True  # room again once collected
