"""Routing under DistributedDataParallel (2 CPU ranks, gloo): the attention mask is picked up through the DDP
wrapper and every rank keeps its own routing counts, even with DDP's default buffer broadcasting; the gradients
are the mean of the ranks' own (with input dropout too: each rank reseeds before each forward, as its local
reference does, so the dropped positions are the same draws)."""

from __future__ import annotations

import gc
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import LlamaForCausalLM

from malora import MALoRAConfig, adapter_layers, collect_aux_loss, inject_adapters, routing_stats
from tests.tiny import small_llama

WORLD = 2


def tiny_model(dropout: float) -> LlamaForCausalLM:
    model = small_llama(num_hidden_layers=1)
    inject_adapters(model, MALoRAConfig(d=8, r_bar=4, num_experts=4, top_k=2, dropout=dropout,
                                        target_modules=("q_proj", "down_proj")))
    with torch.no_grad():  # non-zero B: the adapters (and their dropout) change what down_proj's router sees
        for _, layer in adapter_layers(model):
            layer.lora_B.normal_(0.0, 0.5)
    return model


def rank_batches(rank: int) -> list[dict[str, torch.Tensor]]:
    """Two right-padded batches per rank, different on each rank (so rank 0's counts are not rank 1's)."""
    g = torch.Generator().manual_seed(10 + rank)
    out = []
    for lengths in ((6, 3), (2, 5 - rank)):
        ids = torch.randint(1, 50, (2, 6), generator=g)
        mask = (torch.arange(6)[None] < torch.tensor(lengths)[:, None]).long()
        out.append({"input_ids": ids * mask, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return out


def stats(model) -> dict[str, tuple[list[float], list[int]]]:
    """Per routed layer: (routing_stats fraction, the router's raw token-slot counts)."""
    fractions = routing_stats(model)
    return {name: (fractions[name].tolist(), layer.lora_router.expert_counts.tolist())
            for name, layer in adapter_layers(model)}


def adapter_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def train(model, forward, rank: int) -> dict[str, torch.Tensor]:
    """Both batches with lr 0 (weights stay, so DDP's replicas equal the local model); the first step's grads."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    first = {}
    for i, batch in enumerate(rank_batches(rank)):
        torch.manual_seed(100 + 10 * rank + i)                          # the same dropout draws as the reference
        opt.zero_grad()
        (forward(**batch).loss + collect_aux_loss(model)).backward()   # as orchestrator/training/worker.py
        first = first or adapter_grads(model)
        opt.step()
    return first


def local_run(rank: int, dropout: float):
    """What the rank's own batches give without DDP: its counts and its first-step gradients."""
    model = tiny_model(dropout).train()
    grads = train(model, model, rank)
    return stats(model), grads


def worker(rank: int, port: int, dropout: float, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        model = tiny_model(dropout).train()
        ddp = torch.nn.parallel.DistributedDataParallel(model)           # broadcast_buffers=True (default)
        grads = train(model, ddp, rank)
        results[rank] = (stats(model), grads)
        del ddp  # before destroy_process_group: see tests/orchestrator/training/test_loss_ddp.py
        gc.collect()
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two spawned interpreters importing torch + transformers: ~15 s on an idle 2-core box
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_each_rank_counts_its_own_real_tokens_under_ddp(dropout):
    results = mp.Manager().dict()
    mp.spawn(worker, args=(free_port(), dropout, results), nprocs=WORLD, join=True)
    expected = [local_run(rank, dropout) for rank in range(WORLD)]
    assert [results[rank][0] for rank in range(WORLD)] == [counts for counts, _ in expected]   # own counts
    assert expected[0][0] != expected[1][0]
    for rank in range(WORLD):
        real = sum(int(b["attention_mask"].sum()) for b in rank_batches(rank))
        assert all(sum(c) == real * 2 for _, c in expected[rank][0].values())   # real tokens x k, no padding
        for name, g in expected[0][1].items():                         # DDP's grads: the mean of the ranks'
            mean = (g + expected[1][1][name]) / 2
            torch.testing.assert_close(results[rank][1][name], mean, rtol=1e-5, atol=1e-7, msg=name)
