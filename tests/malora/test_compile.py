"""compile_blocks: every adapter kind traces whole and trains as the eager model does; checkpointing is refused."""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from malora import (HydraLoRAConfig, LoRAConfig, MALoRAConfig, MoLoRAConfig, MoSLDConfig, collect_aux_loss,
                    inject_adapters, routing_stats)
from malora.compile import compile_blocks, decoder_blocks
from malora.config import ConfigError

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
# No dropout here: the compiled model draws each layer's dropout positions as eager code does, but the compiler may
# run two independent draws (q_proj's and v_proj's, of one input) in the other order (see the dropout test below)
CONFIGS = {
    "lora": LoRAConfig(r=8, target_modules=TARGETS, dropout=0.0),
    "molora": MoLoRAConfig(r=4, num_experts=4, top_k=2, target_modules=TARGETS, dropout=0.0),
    "malora": MALoRAConfig(d=16, r_bar=8, num_experts=4, top_k=2, target_modules=TARGETS, dropout=0.0),
    "mosld": MoSLDConfig(r=8, num_experts=4, top_k=2, target_modules=TARGETS, dropout=0.0, dropconnect=0.0),
    "hydra": HydraLoRAConfig(r=8, num_experts=4, target_modules=TARGETS, dropout=0.0),
}


def tiny_model(cfg) -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    inject_adapters(model, cfg)
    with torch.no_grad():                       # B starts at zero: give the adapters an output to compare
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_B" in name:
                p.normal_(0, 0.05)
    return model.train()


def batch(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    L = 10 + 3 * step                           # varying lengths: the compiled blocks take dynamic shapes
    ids = torch.randint(0, 96, (3, L), generator=g)
    mask = torch.ones(3, L, dtype=torch.long)
    mask[0, :4] = 0                             # left padding: routed layers must not count these rows
    mask[2, :1] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def train(model, steps: int = 3, first: int = 0) -> list[tuple[float, float]]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(first, first + steps):
        torch.manual_seed(step)                 # the adapters' dropout positions
        out = model(**batch(step))
        aux = collect_aux_loss(model)
        (out.loss + aux).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append((out.loss.item(), aux.item()))
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_compiled_blocks_train_as_eager(kind):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = tiny_model(CONFIGS[kind])
    compiled = copy.deepcopy(eager)
    assert compile_blocks(compiled) == ["model.layers.0", "model.layers.1"]
    expected, got = train(eager), train(compiled)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    # same dropout positions, same routing, same updates: fp32 Inductor kernels differ from eager only by the
    # order of their sums
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=2e-4, atol=1e-6)
    if kind != "hydra" and kind != "lora":      # Hydra's argmax heads are counted too, but it has no balance loss
        assert all(a > 0 for _, a in got)
    for (name, ref), (_, ours) in zip(routing_stats(eager, counts=True).items(),
                                      routing_stats(compiled, counts=True).items()):
        # 3 forwards x (3 rows of L minus the padding) real tokens, k slots each: padding is not counted
        assert torch.equal(ours, ref), name
    for (name, ref), ours in zip(eager.named_parameters(), compiled.parameters()):
        if ref.requires_grad:
            torch.testing.assert_close(ours, ref, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.slow
def test_compiled_dropout_draws_the_eager_positions_and_is_reproducible():
    torch._dynamo.reset()
    one = tiny_model(MALoRAConfig(d=16, r_bar=8, num_experts=4, target_modules=["up_proj"], dropout=0.1))
    compiled = copy.deepcopy(one)
    compile_blocks(compiled)
    # one draw per block input: the same positions as eager code, so the same training
    torch.testing.assert_close(torch.tensor(train(compiled)), torch.tensor(train(one)), rtol=2e-4, atol=1e-6)
    # two draws from one input (q and v) may run in either order, but always the same one: a seed reproduces a run
    two = tiny_model(MALoRAConfig(d=16, r_bar=8, num_experts=4, target_modules=["q_proj", "v_proj"], dropout=0.1))
    first, second = copy.deepcopy(two), copy.deepcopy(two)
    compile_blocks(first)
    compile_blocks(second)
    assert train(first) == train(second)


@pytest.mark.slow
def test_compiled_routing_counts_only_real_tokens_and_refuses_checkpointing():
    torch._dynamo.reset()
    model = tiny_model(CONFIGS["malora"])
    compile_blocks(model)
    b = batch(0)
    model(**b).loss.backward()
    real = int(b["attention_mask"].sum())
    for name, counts in routing_stats(model, counts=True).items():
        assert int(counts.sum()) == real * 2, name            # top-2: two slots per real token, none for padding
    model.gradient_checkpointing_enable()
    with pytest.raises(RuntimeError, match="gradient checkpointing"):
        model(**b)


def test_compile_blocks_refuses_checkpointing_and_models_without_blocks():
    model = tiny_model(CONFIGS["lora"])
    assert [path for path, _ in decoder_blocks(model)] == ["model.layers.0", "model.layers.1"]
    model.gradient_checkpointing_enable()
    with pytest.raises(ConfigError, match="gradient_checkpointing_disable"):
        compile_blocks(model)
    with pytest.raises(ConfigError, match="no decoder blocks"):
        compile_blocks(torch.nn.Sequential(torch.nn.Linear(4, 4)))


@pytest.mark.slow
def test_the_whole_model_compiled_trains_as_eager_without_recompiling_each_step():
    """``torch.compile(model)`` (transformers' ``torch_compile=True``): the routing hooks run eagerly at the model's
    edges, the layers inside the graph; the forward counter is never a guard, so steps do not recompile."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = tiny_model(CONFIGS["malora"])
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, dynamic=True)
    got, expected = train(compiled, 3), train(eager, 3)
    graphs = counters["stats"]["unique_graphs"]
    got += train(compiled, 3, first=3)                       # three more steps, three new lengths
    expected += train(eager, 3, first=3)
    assert counters["stats"]["unique_graphs"] == graphs      # nothing recompiled: no guard on per-forward state
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=2e-4, atol=1e-6)
    for (name, ref), (_, ours) in zip(routing_stats(eager, counts=True).items(),
                                      routing_stats(model, counts=True).items()):
        assert torch.equal(ours, ref), name
