"""malora.trainer under DDP (2 CPU ranks, gloo, the way torchrun launches Trainer): the logged balance loss is
the mean of the ranks' and the logged expert shares come from the counts summed over ranks."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from malora import adapter_layers, collect_aux_loss
from malora.trainer import AdapterTrainer
from tests.malora.test_ddp import free_port
from tests.malora.test_trainer import adapted, examples, train_args

WORLD = 2


def worker(rank: int, port: int, out_dir: str, results) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    batches = []

    class Recording(AdapterTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            batches.append({k: v.clone() for k, v in inputs.items()})
            return super().compute_loss(model, inputs, *args, **kwargs)

    args = train_args(out_dir, per_device_train_batch_size=2, max_steps=1, save_strategy="no", ddp_backend="gloo")
    trainer = Recording(model=adapted(balance_coef=0.5), args=args, train_dataset=examples())
    trainer.train()
    assert trainer.args.world_size == WORLD
    logged = next(e for e in trainer.state.log_history if "loss" in e)
    results[rank] = ({k: v for k, v in logged.items() if k == "balance_loss" or k.startswith("routing/")},
                     batches[0])
    torch.distributed.destroy_process_group()


@pytest.mark.slow  # two spawned interpreters importing torch + transformers
@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_logged_balance_loss_and_shares_cover_every_rank(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(worker, args=(free_port(), str(tmp_path), results), nprocs=WORLD, join=True)
    auxes, counts = [], {}
    for rank in range(WORLD):                                          # each rank's batch, run locally
        model = adapted(balance_coef=0.5).train()
        batch = results[rank][1]
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        auxes.append(float(collect_aux_loss(model)))
        for name, layer in adapter_layers(model):
            counts[name] = counts.get(name, 0) + layer.lora_router.expert_counts.double()
    assert not torch.equal(results[0][1]["input_ids"], results[1][1]["input_ids"])   # the ranks' own batches
    for rank in range(WORLD):
        logged = results[rank][0]
        assert logged["balance_loss"] == pytest.approx(sum(auxes) / WORLD, rel=1e-5)
        for name, c in counts.items():
            shares = [logged[f"routing/{name}/e{i}"] for i in range(c.numel())]
            assert shares == pytest.approx((c / c.sum()).tolist(), abs=1e-12)
