"""DDP wraps ResponseLoss: two gloo ranks on different batches end with the mean of their gradients."""
from __future__ import annotations

import gc
import os
import socket

import pytest
import torch

from tests.orchestrator.training.test_loss import batch, llama


def model_and_lora(seed: int = 0) -> torch.nn.Module:
    from malora import LoRAConfig, adapter_layers, inject_adapters

    torch.manual_seed(seed)
    model = llama(False)
    inject_adapters(model, LoRAConfig(r=4, alpha=8.0, dropout=0.0))
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            for p in layer.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.2)  # non-zero B, so every adapter tensor gets a gradient
    return model


def _rank(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from orchestrator.training.loss import ResponseLoss

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = model_and_lora()
        ddp = DistributedDataParallel(ResponseLoss(model), find_unused_parameters=False)
        ddp(**batch(rank)).backward()
        torch.save({n: p.grad for n, p in model.named_parameters() if p.requires_grad}, f"{out}/rank{rank}.pt")
        # Free the DDP wrapper while the group is registered, so the group's last reference goes with
        # destroy_process_group (which releases the GIL). Freed after it, the Reducer's destructor joins the
        # gloo worker thread holding the GIL while that thread may need the GIL to free a finished work item:
        # a deadlock, seen as a rank hanging at exit after its gradients were saved.
        del ddp
        gc.collect()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes, ~15 s
def test_ddp_all_reduces_the_gradients_of_the_wrapped_loss(tmp_path):
    import torch.multiprocessing as mp

    from orchestrator.training.loss import ResponseLoss

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(port, str(tmp_path)), nprocs=2, join=True)
    model = model_and_lora()
    wrapped = ResponseLoss(model)
    ref = {}
    for r in range(2):
        wrapped(**batch(r)).backward()
        for n, p in model.named_parameters():
            if p.requires_grad:
                ref[n] = ref.get(n, 0) + p.grad / 2
        model.zero_grad(set_to_none=True)
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt")
        assert got.keys() == ref.keys() and ref
        for n in ref:
            torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-7, msg=n)
