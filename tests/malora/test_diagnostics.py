"""malora.diagnostics on cases with known answers: forced and uniform routing, exact-negative and identical
gradients, padding, and the roles of every adapter kind's tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from malora.config import LoRAConfig, MALoRAConfig, MoLoRAConfig, MoSLDConfig
from malora.diagnostics import (conflict_summary, cosine_matrix, default_groups, gradient_cosines, layer_group,
                                per_layer_task_expert, routing_counts_by_task, task_expert_metrics)
from malora.inject import inject_adapters, routing_stats

ATTN = ("q_proj", "k_proj", "v_proj")


def tiny_llama(layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64)
    return LlamaForCausalLM(cfg).eval()


# ------------------------------------------------------------------------------------------ matrices
def test_forced_routing_gives_one_bit_and_zero_entropy():
    # task A -> expert 0, task B -> expert 1; unequal token counts: tasks weigh the same, still 1 bit
    m = task_expert_metrics({"l0": np.array([[30, 0], [0, 10]]), "l1": np.array([[0, 7], [7, 0]])}, ["a", "b"])
    assert m["routing_mi"] == pytest.approx(1.0)
    assert m["routing_mi_norm"] == pytest.approx(1.0)
    assert m["routing_entropy/a"] == pytest.approx(0.0) and m["routing_entropy/b"] == pytest.approx(0.0)
    assert m["routing_max_share"] == pytest.approx(0.5)


def test_uniform_routing_gives_zero_information_and_entropy_one():
    m = task_expert_metrics({"l0": np.full((3, 4), 5)}, ["a", "b", "c"])
    assert m["routing_mi"] == pytest.approx(0.0, abs=1e-12)
    assert m["routing_mi_norm"] == pytest.approx(0.0, abs=1e-12)
    assert all(m[f"routing_entropy/{t}"] == pytest.approx(1.0) for t in "abc")
    assert m["routing_max_share"] == pytest.approx(0.25)


def test_partial_specialisation_matches_hand_computed_values():
    # p(e|A) = (3/4, 1/4), p(e|B) = (1/4, 3/4), p(e) = (1/2, 1/2): I = 1 - H2(1/4) bits
    h = -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75))
    # three tasks on four experts: A on {0, 1}, B on {2, 3}, C on {0} -> p(e) = (1/2, 1/6, 1/6, 1/6)
    # I = H(e) - H(e|t) = H(1/2, 1/6, 1/6, 1/6) - (1 + 1 + 0) / 3
    h_e = -(0.5 * math.log2(0.5) + 3 * (1 / 6) * math.log2(1 / 6))
    x = per_layer_task_expert({"x": np.array([[3, 1], [1, 3]])}, ["a", "b"])["x"]
    y = per_layer_task_expert({"y": np.array([[4, 4, 0, 0], [0, 0, 2, 2], [9, 0, 0, 0]])}, ["a", "b", "c"])["y"]
    assert x["mi"] == pytest.approx(1 - h)
    assert x["entropy"]["a"] == pytest.approx(h)                                # log 2 = log E: already normalised
    assert y["mi"] == pytest.approx(h_e - 2 / 3)
    assert y["mi_norm"] == pytest.approx((h_e - 2 / 3) / math.log2(3))
    assert y["entropy"] == pytest.approx({"a": 0.5, "b": 0.5, "c": 0.0})
    assert y["max_share"] == pytest.approx(0.5)


def test_absent_task_and_single_expert_layer_are_left_out():
    layers = per_layer_task_expert({"one": np.array([[5], [5]]), "two": np.array([[4, 0], [0, 0]])}, ["a", "b"])
    assert list(layers) == ["two"]                              # one expert: no routing choice
    assert layers["two"]["mi"] == 0.0 and layers["two"]["mi_norm"] == 0.0   # only task a present: H(task) = 0
    assert layers["two"]["entropy"] == {"a": 0.0}


# ------------------------------------------------------------------------------------------ through a model
def forced_model() -> LlamaForCausalLM:
    """One decoder layer, MoLoRA top-1 on q/k/v, whose input is RMSNorm(embedding): tokens 0-31 (task a) have
    embedding dim 0 = +1, tokens 32-63 (task b) -1, and each router sends dim 0 > 0 to expert 0, < 0 to 1."""
    model = tiny_llama(layers=1)
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, 0] = torch.where(torch.arange(64) < 32, 1.0, -1.0)
        emb[:, 1:] *= 0.01
    inject_adapters(model, MoLoRAConfig(r=2, num_experts=2, top_k=1, target_modules=ATTN))
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("lora_router"):
                module.weight.zero_()
                module.weight[0, 0], module.weight[1, 0] = 10.0, -10.0
    return model


def test_forced_routing_through_a_model_with_padding():
    model = forced_model()
    g = torch.Generator().manual_seed(0)
    a_rows = torch.randint(0, 32, (2, 6), generator=g)
    b_rows = torch.randint(32, 64, (2, 6), generator=g)
    ids = torch.cat([a_rows, b_rows])
    plain = routing_counts_by_task(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                                   torch.tensor([0, 0, 1, 1]), ["a", "b"])
    # the same rows right-padded with three b-type (32+) tokens on the a rows: padding is not counted
    pad = torch.full((4, 3), 40)
    padded_ids = torch.cat([ids, pad], 1)
    mask = torch.cat([torch.ones_like(ids), torch.zeros_like(pad)], 1)
    padded = routing_counts_by_task(model, {"input_ids": padded_ids, "attention_mask": mask},
                                    torch.tensor([0, 0, 1, 1]), ["a", "b"])
    assert set(plain) == {f"model.layers.0.self_attn.{p}" for p in ATTN}
    for name, c in plain.items():
        np.testing.assert_array_equal(c, [[12, 0], [0, 12]])    # 2 rows x 6 real tokens each, top-1
        np.testing.assert_array_equal(padded[name], c)
    m = task_expert_metrics(padded, ["a", "b"])
    assert m["routing_mi"] == pytest.approx(1.0) and m["routing_entropy/a"] == pytest.approx(0.0)
    # the model's running counts are untouched by the diagnostic
    assert all(int(c.sum()) == 0 for c in routing_stats(model, counts=True).values())


# ------------------------------------------------------------------------------------------ gradients
def lm_batch(seed: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def trained_adapter(cfg) -> LlamaForCausalLM:
    """A tiny LLaMA with ``cfg`` injected and every adapter tensor randomised (B = 0 would zero A's gradient)."""
    model = tiny_llama()
    inject_adapters(model, cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    return model


def signed_loss(model, batch):
    return batch["sign"] * model(**{k: v for k, v in batch.items() if k != "sign"}).loss


def test_exact_negative_and_identical_gradients():
    model = trained_adapter(MALoRAConfig(d=8, r_bar=4, num_experts=3, top_k=2, target_modules=ATTN))
    b = lm_batch(0)
    cos = gradient_cosines(model, {"a": {**b, "sign": 1.0}, "same": {**b, "sign": 1.0}, "neg": {**b, "sign": -1.0}},
                           loss_fn=signed_loss)
    for group, c in cos.items():
        np.testing.assert_allclose(c, [[1, 1, -1], [1, 1, -1], [-1, -1, 1]], atol=1e-9, err_msg=group)
    s = conflict_summary(cos["all"], ["a", "same", "neg"])
    assert s["min"] == pytest.approx(-1.0) and s["pair"] == ("a", "neg")
    assert s["mean"] == pytest.approx(-1 / 3)


def test_cosines_equal_backward_gradients_and_leave_the_model_alone():
    model = trained_adapter(MoLoRAConfig(r=2, num_experts=3, top_k=2, target_modules=ATTN + ("up_proj",)))
    model.train()
    batches = {"a": lm_batch(1), "b": lm_batch(2)}
    model(**lm_batch(3)).loss.backward()                    # a pending training gradient must survive
    before = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    counts = {n: c.clone() for n, c in routing_stats(model, counts=True).items()}
    cos = gradient_cosines(model, batches)
    assert model.training
    assert all(torch.equal(p.grad, before[n]) for n, p in model.named_parameters() if p.requires_grad)
    assert all(torch.equal(c, counts[n]) for n, c in routing_stats(model, counts=True).items())
    # reference: .backward() per task in eval mode, the group's tensors concatenated, numpy's cosine
    groups = default_groups(model)
    model.eval()
    ref = {}
    for task, batch in batches.items():
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        ref[task] = np.concatenate([p.grad.double().flatten().numpy() for n, p in model.named_parameters()
                                    if groups.get(n) == "expert_B/mlp_late"])
    expected = ref["a"] @ ref["b"] / np.linalg.norm(ref["a"]) / np.linalg.norm(ref["b"])
    assert cos["expert_B/mlp_late"][0, 1] == pytest.approx(expected, rel=1e-9)


def test_roles_and_layer_groups_of_each_kind():
    targets = ("q_proj", "down_proj")
    malora = default_groups(trained_adapter(MALoRAConfig(d=8, r_bar=4, num_experts=2, top_k=1,
                                                         target_modules=targets)))
    assert set(malora.values()) == {f"{role}/{g}" for role in ("shared_S_A", "expert_P", "expert_B", "router")
                                    for g in ("attn_early", "attn_late", "mlp_early", "mlp_late")}
    assert malora["model.layers.1.self_attn.q_proj.lora_S_A"] == "shared_S_A/attn_late"
    mosld = set(default_groups(trained_adapter(MoSLDConfig(r=2, num_experts=2, top_k=1,
                                                           target_modules=targets))).values())
    assert {g.split("/")[0] for g in mosld} == {"shared_A", "expert_B", "router"}
    lora = set(default_groups(trained_adapter(LoRAConfig(r=2, target_modules=targets))).values())
    assert {g.split("/")[0] for g in lora} == {"lora_A", "lora_B"}
    assert layer_group("h.3.attn.c_attn", 4) == "attn_late" and layer_group("lm_head", None) == "mlp"


def test_zero_gradient_gives_nan_and_is_left_out_of_the_summary():
    cos = cosine_matrix(np.array([[1.0, 0.0], [0.0, 0.0], [-2.0, 0.0]]))
    assert np.isnan(cos[0, 1]) and np.isnan(cos[1, 1]) and cos[0, 2] == pytest.approx(-1.0)
    s = conflict_summary(cos, ["a", "b", "c"])
    assert s == {"mean": pytest.approx(-1.0), "min": pytest.approx(-1.0), "pair": ("a", "c")}


def test_normalised_entropy_against_scipy():
    """H(p)/log E per row (scipy.stats.entropy as the reference), zeros allowed, both ends of [0, 1] exact."""
    from scipy.stats import entropy

    from malora.diagnostics import normalised_entropy

    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(5), size=4)
    p[0, :2] = [0.0, p[0, 0] + p[0, 1]]
    np.testing.assert_allclose(normalised_entropy(p), entropy(p, axis=1) / np.log(5), rtol=1e-12)
    assert normalised_entropy(np.array([0.0, 1.0, 0.0])) == 0.0
    assert normalised_entropy(np.full(8, 0.125)) == pytest.approx(1.0)
