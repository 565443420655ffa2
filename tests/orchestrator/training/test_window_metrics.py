"""Speed and memory of a reporting window: the slowest rank's time and the largest rank's peak are reported, and
on CUDA each window's peak starts from zero (timers read after a device synchronisation)."""

from __future__ import annotations

import pytest
import torch

from orchestrator.training import step, worker


def test_max_over_ranks_takes_the_largest_rank(monkeypatch):
    cpu = torch.device("cpu")
    others = [0.0, 7.5, 2.0]  # what ranks 1 and 2 put in their own slots

    def all_reduce(values, device):  # rank 0's vector summed with the other ranks' vectors
        return [v + o for v, o in zip(values, others)]
    monkeypatch.setattr(step, "reduce_sum", all_reduce)
    assert worker.max_over_ranks(3.0, 0, 3, cpu) == 7.5
    others[1] = 1.0
    assert worker.max_over_ranks(3.0, 0, 3, cpu) == 3.0
    assert worker.max_over_ranks(4.0, 0, 1, cpu) == 4.0  # one rank: no collective


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_each_window_reports_its_own_cuda_peak():
    device = torch.device("cuda")
    big = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)  # 256 MiB
    del big
    assert worker.peak_memory_mb(device) >= 256
    worker.new_window(device)
    small = torch.empty(2**20, dtype=torch.uint8, device=device)
    assert worker.peak_memory_mb(device) < 64
    del small
