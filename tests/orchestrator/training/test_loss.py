"""ResponseLoss: the head at response positions only gives HF's own loss and gradients (float64), for any split."""
from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from malora import MALoRAConfig, adapter_layers, collect_aux_loss, inject_adapters
from orchestrator.evaluation.scoring import lm_parts
from orchestrator.training.loss import ResponseLoss
from tests.tiny import tiny_llama

V = 97


def llama(tied: bool) -> torch.nn.Module:
    return tiny_llama(vocab_size=V, hidden_size=32, intermediate_size=64, tie_word_embeddings=tied)


def gpt2() -> torch.nn.Module:  # tied head, final LayerNorm ln_f inside model.transformer
    return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def opt_without_final_norm() -> torch.nn.Module:  # post-norm OPT: no final norm; project_out 32 -> 16 before the head
    return OPTForCausalLM(OPTConfig(vocab_size=V, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                    num_attention_heads=4, word_embed_proj_dim=16, do_layer_norm_before=False,
                                    max_position_embeddings=64, dropout=0.0, attention_dropout=0.0))


MODELS = {"llama_untied": lambda: llama(False), "llama_tied": lambda: llama(True), "gpt2": gpt2,
          "opt_post_norm": opt_without_final_norm}


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded (4, 12): prompts of 3-7 tokens, responses of 1-4, pad id 0 with labels -100."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(4, 12, dtype=torch.long)
    labels = torch.full((4, 12), -100)
    mask = torch.zeros(4, 12, dtype=torch.long)
    for b, (p, r) in enumerate([(3, 1), (7, 4), (5, 2), (4, 4)]):
        ids[b, :p + r] = torch.randint(1, V, (p + r,), generator=g)
        labels[b, p:p + r] = ids[b, p:p + r]
        mask[b, :p + r] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def full_loss(model: torch.nn.Module, data: dict[str, torch.Tensor]) -> torch.Tensor:
    """The reference: logits at every position, in the model's dtype (HF's own loss casts float64 to float32)."""
    logits = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits  # (B, T, V)
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), data["labels"][:, 1:].reshape(-1))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_gathered_loss_and_gradients_equal_the_full_computation(name):
    torch.manual_seed(0)
    model = MODELS[name]().double()
    wrapped = ResponseLoss(model)
    assert wrapped.gathered  # otherwise the comparison below would be the full loss against itself
    data = batch()
    full = full_loss(model, data)
    full.backward()
    ref = grads(model)
    ours = wrapped(**data)
    ours.backward()
    got = grads(model)
    assert ours.dtype == torch.float64
    assert ours.item() == pytest.approx(full.item(), rel=1e-12)
    assert got.keys() == ref.keys() and len(got) == len(list(model.parameters()))
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-10, atol=1e-12, msg=k)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_gathered_loss_matches_hf_loss_in_float32(name):
    torch.manual_seed(4)
    model = MODELS[name]()
    data = batch(11)
    assert ResponseLoss(model)(**data).item() == pytest.approx(model(**data).loss.item(), rel=1e-5)


def test_loss_is_the_mean_log_likelihood_of_the_response_tokens_by_hand():
    torch.manual_seed(1)
    model = llama(False).double().eval()
    data = batch(3)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits,
                                 -1)
        terms = [-logp[b, t - 1, data["labels"][b, t]] for b in range(4) for t in range(1, 12)
                 if data["labels"][b, t] != -100]
        assert len(terms) == 1 + 4 + 2 + 4
        assert ResponseLoss(model)(**data).item() == pytest.approx(float(sum(terms) / len(terms)), rel=1e-12)


def test_adapters_run_inside_and_their_balance_loss_is_collected():
    torch.manual_seed(2)
    model = llama(False)
    inject_adapters(model, MALoRAConfig(d=8, r_bar=4, num_experts=4, top_k=2, alpha=8.0, dropout=0.0,
                                        target_modules=("q_proj", "v_proj", "up_proj")))
    model.double()
    with torch.no_grad():  # leave the identity init, so that the adapter changes the loss
        for _, layer in adapter_layers(model):
            for p in layer.parameters():
                if p.requires_grad:
                    p.add_(0.3 * torch.randn_like(p))
    data = batch(5)
    full = full_loss(model, data)
    full_aux = collect_aux_loss(model)
    (full + full_aux).backward()
    ref = grads(model)
    wrapped = ResponseLoss(model)
    ours = wrapped(**data)
    aux = collect_aux_loss(model)
    (ours + aux).backward()
    got = grads(model)
    assert aux.item() > 0 and aux.item() == pytest.approx(full_aux.item(), rel=1e-12)
    assert ours.item() == pytest.approx(full.item(), rel=1e-12)
    assert set(got) == {n for n, p in model.named_parameters() if p.requires_grad} == set(ref)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-10, atol=1e-12, msg=k)


class ScaledLlama(LlamaForCausalLM):
    """Multiplies its logits after the head: the backbone/head split no longer reproduces them."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 2.0
        return out


def test_a_model_that_changes_its_logits_after_the_head_falls_back_to_its_own_loss():
    torch.manual_seed(3)
    model = ScaledLlama(llama(False).config).double()
    wrapped = ResponseLoss(model)
    assert lm_parts(model) is None and not wrapped.gathered
    data = batch(7)
    assert wrapped(**data).item() == model(**data).loss.item()


def test_full_logits_mode_is_the_models_own_loss_and_the_wrapper_owns_no_new_parameters():
    model = llama(True)
    wrapped = ResponseLoss(model, full_logits=True)
    assert not wrapped.gathered
    assert [id(p) for p in wrapped.parameters()] == [id(p) for p in model.parameters()]
    assert all(k.startswith("model.") for k in wrapped.state_dict())
    data = batch(9)
    assert wrapped(**data).item() == model(**data).loss.item()
