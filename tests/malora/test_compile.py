"""compile_blocks: every adapter kind traces whole and trains as the eager model does; checkpointing is refused; only
the language model's decoder blocks are compiled; Dynamo's process-wide settings are left alone."""

import copy

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration

from malora import (HydraLoRAConfig, LoRAConfig, MALoRAConfig, MoLoRAConfig, MoSLDConfig, collect_aux_loss,
                    adapter_context, inject_adapters, reset_routing_stats, routing_stats)
from malora.compile import compile_blocks, decoder_blocks
from malora.config import ConfigError
from tests.tiny import tiny_llama

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
    model = tiny_llama(vocab_size=96)
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


def counted(model) -> int:
    return sum(int(c.sum()) for c in routing_stats(model, counts=True).values())


@pytest.mark.filterwarnings("ignore::FutureWarning")                # gradient_checkpointing_enable's new name
def test_checkpointing_enabled_after_compile_blocks_is_refused_at_the_first_forward():
    """Enabled between compile_blocks and the first step, checkpointing would recompute the compiled routed layers
    and count their tokens twice: the first forward raises, before a token is counted (so nothing is compiled)."""
    model = tiny_model(CONFIGS["malora"])
    compile_blocks(model)
    model.gradient_checkpointing_enable()
    with pytest.raises(RuntimeError, match=r"gradient checkpointing.*Fix: model.gradient_checkpointing_disable"):
        model(**batch(0))
    assert counted(model) == 0
    later = tiny_llama(vocab_size=96)                                 # compiled first, adapters injected after
    compile_blocks(later)
    inject_adapters(later, CONFIGS["malora"])
    later.gradient_checkpointing_enable()
    with pytest.raises(RuntimeError, match=r"gradient checkpointing"):
        later(**batch(0))
    assert counted(later) == 0
    plain = tiny_model(CONFIGS["lora"])                              # no routed layer: nothing is counted twice
    compile_blocks(plain)
    assert not adapter_context(plain).compiled


@pytest.mark.slow
def test_a_compiled_block_called_directly_counts_every_row_as_eager_does():
    """The padded forward's mask ends with it: a block called on its own afterwards (outside the model's forward)
    routes all B*L rows, compiled as eager, instead of skipping the rows that were padding in the last forward."""
    torch._dynamo.reset()
    eager = tiny_model(CONFIGS["malora"])
    compiled = copy.deepcopy(eager)
    compile_blocks(compiled, backend="eager")     # Dynamo traces the routed layers (row_state's compiled branch)
    b = batch(0)
    B, L = b["input_ids"].shape
    for model in (eager, compiled):
        model(**b)
        assert counted(model) == int(b["attention_mask"].sum()) * 2 * 8      # top-2, 4 targets x 2 blocks
        reset_routing_stats(model)
        with torch.no_grad():
            hidden = model.model.embed_tokens(b["input_ids"])                 # (B, L, 64)
            position = model.model.rotary_emb(hidden, torch.arange(L)[None].expand(B, L))
            model.model.layers[0](hidden, position_embeddings=position)
        assert counted(model) == B * L * 2 * 4, "compiled" if model is compiled else "eager"   # all rows, 4 targets


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).relu()


class Stack(torch.nn.Module):
    """The least that compile_blocks finds blocks in: a module naming its block class in ``_no_split_modules``."""

    _no_split_modules = ["Block"]

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([Block()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[0](x)


def test_compile_blocks_leaves_dynamos_global_recompile_limit_alone():
    """The blocks' own limit (64 entries) lets them compile past Dynamo's default of 8 while every other
    torch.compile in the process keeps the global limit."""
    from torch._dynamo.utils import counters

    config = torch._dynamo.config
    before = (config.recompile_limit, config.accumulated_recompile_limit)
    lengths = range(1, before[0] + 4)                                  # 11 shapes, 3 past the global limit
    for ours in (True, False):
        torch._dynamo.reset()
        counters.clear()
        model = Stack()
        # the eager backend: Dynamo traces and caches as under Inductor, without code generation (this is about
        # the cache); static shapes: each new length is one more cache entry of the block's code
        if ours:
            compile_blocks(model, backend="eager", dynamic=False)
        else:
            model.blocks[0].compile(backend="eager", dynamic=False)
        assert (config.recompile_limit, config.accumulated_recompile_limit) == before
        with torch.no_grad():
            for n in lengths:
                model(torch.randn(n, 4))
        # compile_blocks' block: one graph per shape; a plain compile: the global 8, the rest eager
        assert counters["stats"]["unique_graphs"] == (len(lengths) if ours else before[0])


def test_decoder_blocks_are_the_language_models_outermost_listed_blocks():
    vlm = LlavaForConditionalGeneration(LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=32, patch_size=8),
        text_config=LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=64)))
    # the vision tower's CLIPEncoderLayer blocks are listed in its _no_split_modules too, but are not decoder blocks
    assert [p for p, _ in decoder_blocks(vlm)] == ["model.language_model.layers.0", "model.language_model.layers.1"]
    llama = tiny_llama()
    llama._no_split_modules = ["LlamaDecoderLayer", "LlamaMLP"]        # a listed class inside each listed block
    assert [p for p, _ in decoder_blocks(llama)] == ["model.layers.0", "model.layers.1"]
    wrapped = torch.nn.ModuleDict({"inner": llama})                   # found through a wrapper (DDP's .module)
    assert [p for p, _ in decoder_blocks(wrapped)] == ["inner.model.layers.0", "inner.model.layers.1"]
