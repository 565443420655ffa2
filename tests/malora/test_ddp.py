"""Routing under DistributedDataParallel (2 CPU ranks, gloo): the attention mask is picked up through the DDP
wrapper and every rank keeps its own routing counts, even with DDP's default buffer broadcasting."""

from __future__ import annotations

import gc
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import LlamaConfig, LlamaForCausalLM

from malora import MALoRAConfig, adapter_layers, collect_aux_loss, inject_adapters, routing_stats

WORLD = 2


def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=50))
    inject_adapters(model, MALoRAConfig(d=8, r_bar=4, num_experts=4, top_k=2, dropout=0.0,
                                        target_modules=("q_proj", "down_proj")))
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


def local_counts(rank: int) -> dict[str, tuple[list[float], list[int]]]:
    """What the rank's own batches give without DDP (the same weights: DDP keeps the replicas equal)."""
    model = tiny_model().train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)  # lr 0: weights stay
    for batch in rank_batches(rank):
        (model(**batch).loss + collect_aux_loss(model)).backward()
        opt.step()
    return stats(model)


def worker(rank: int, port: int, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        model = tiny_model().train()
        ddp = torch.nn.parallel.DistributedDataParallel(model)           # broadcast_buffers=True (default)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
        for batch in rank_batches(rank):
            (ddp(**batch).loss + collect_aux_loss(model)).backward()  # as orchestrator/training/worker.py
            opt.step()
        results[rank] = stats(model)
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
def test_each_rank_counts_its_own_real_tokens_under_ddp():
    results = mp.Manager().dict()
    mp.spawn(worker, args=(free_port(), results), nprocs=WORLD, join=True)
    expected = [local_counts(rank) for rank in range(WORLD)]
    assert [results[rank] for rank in range(WORLD)] == expected      # each rank its own counts
    assert expected[0] != expected[1]
    for rank in range(WORLD):
        real = sum(int(b["attention_mask"].sum()) for b in rank_batches(rank))
        assert all(sum(c) == real * 2 for _, c in expected[rank].values())   # real tokens x k, no padding
