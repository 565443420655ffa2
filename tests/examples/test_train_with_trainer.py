"""examples/train_with_trainer.py: the smoke test trains, saves and reloads; the real-model path (a config-built
model and a word-level tokenizer saved to a folder, a JSON-lines file) runs with fewer steps than the logging
interval, keeps EOS in the labels when pad = EOS, and nothing printed names a folder that is gone."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from malora import load_adapter

PATH = Path(__file__).parents[2] / "examples" / "train_with_trainer.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("train_with_trainer", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def eos_only_tokenizer() -> PreTrainedTokenizerFast:
    """Whitespace words w0..w99 and an EOS, no pad token (the example then pads with EOS)."""
    vocab = {"<unk>": 0, "</s>": 1, **{f"w{i}": i + 2 for i in range(100)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_the_smoke_test_trains_saves_and_reloads(example, tmp_path):
    assert example.main(["--smoke-test", "--output-dir", str(tmp_path)]) == 0   # it reloads and compares itself
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in tmp_path.iterdir()}
    assert (tmp_path / "checkpoint-4" / "adapter_model.safetensors").is_file()
    with pytest.raises(SystemExit) as exit_info:
        example.main([])                                               # neither --smoke-test nor --model/--data
    assert exit_info.value.code == 2


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_without_output_dir_no_deleted_path_is_printed(example, capsys):
    assert example.main(["--smoke-test"]) == 0
    out = capsys.readouterr().out
    printed = [Path(m) for m in re.findall(r"(/\S*malora-trainer-\S*?)[\s'\")]", out)]
    assert not printed, f"paths printed that no longer exist: {printed}"
    assert "adapter not kept" in out
    with pytest.raises(SystemExit) as exit_info:                       # a real run must say where to keep it
        example.main(["--model", "m", "--data", "d.jsonl"])
    assert exit_info.value.code == 2


def test_pad_equal_to_eos_keeps_eos_in_the_labels(example):
    eos = 1
    batch = example.pad_and_label([{"input_ids": [5, 6, 7, eos]}, {"input_ids": [8, eos]}], pad_id=eos)
    assert batch["input_ids"].tolist() == [[5, 6, 7, eos], [8, eos, eos, eos]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7, eos], [8, eos, -100, -100]]   # the real EOS is learnt


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_a_real_run_shorter_than_the_logging_interval(example, tmp_path, capsys):
    """--max-steps 3 (below the 10-step logging interval of a real run) on a saved config-built model whose
    tokenizer has no pad token: every text ends in EOS, EOS is in the labels, and the saved adapter loads back
    to the trained model's logits."""
    model_dir, data = tmp_path / "model", tmp_path / "train.jsonl"
    example.tiny_llama().save_pretrained(model_dir)
    eos_only_tokenizer().save_pretrained(model_dir)
    g = torch.Generator().manual_seed(0)
    data.write_text("".join(json.dumps({"text": " ".join(f"w{int(i)}" for i in torch.randint(0, 100, (n,),
                                                                                          generator=g))}) + "\n"
                            for n in (3, 5, 7, 4, 6, 2, 8, 5)))
    batches = []
    collate = example.pad_and_label
    example.pad_and_label = lambda features, pad_id: batches.append(collate(features, pad_id)) or batches[-1]
    try:
        code = example.main(["--model", str(model_dir), "--data", str(data), "--output-dir", str(tmp_path / "out"),
                             "--max-steps", "3"])
    finally:
        example.pad_and_label = collate
    assert code == 0
    assert "step 3: loss" in capsys.readouterr().out
    for batch in batches:
        lengths = batch["attention_mask"].sum(1)
        last = batch["labels"][torch.arange(len(lengths)), lengths - 1]
        assert (last == 1).all()                                      # every example's last label is EOS
    restored = example.tiny_llama()
    load_adapter(restored, tmp_path / "out")
    reference = example.tiny_llama()
    load_adapter(reference, tmp_path / "out" / "checkpoint-3")       # the last checkpoint: the same adapter
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(restored.eval()(ids).logits, reference.eval()(ids).logits, rtol=0, atol=0)
