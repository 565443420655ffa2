"""Cloze training examples are token for token the rows the scorer scores, for every task's cloze style, with a
byte-level BPE tokenizer (SmolLM2's) and a SentencePiece-style LLaMA tokenizer (the leading-space trap)."""
from __future__ import annotations

import pytest

from orchestrator.data.cloze import cloze_item, encode_cloze_example
from orchestrator.data.tasks import get_task, load_task
from orchestrator.evaluation.accuracy import choice_lengths, option_requests

TASKS = ("boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_e", "arc_c", "obqa", "pubmedqa",
         "mmlu_anatomy")


def expected_strings(task: str, question: str, option: str) -> tuple[str, str]:
    """(context, continuation) of lm-eval / OLMES for one option, written out here (docs/cloze.md)."""
    if task == "winogrande":  # partial scoring: the option fills the blank, the rest of the sentence is scored
        cut = question.index("_")
        return question[:cut] + option, " " + question[cut + 1:].strip()
    if task == "hellaswag":
        return question, " " + option
    if task == "boolq":
        return f"Question: {question}\nAnswer:", " " + {"true": "yes", "false": "no"}[option]
    if task == "pubmedqa":
        return f"{question}\nAnswer:", " " + option
    return f"Question: {question}\nAnswer:", " " + option


@pytest.fixture(scope="module")
def items(shared_data_dir):
    out = {}
    for name in TASKS:
        _, evaluation = load_task(name, shared_data_dir)
        out[name] = evaluation[:4]
    return out


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from orchestrator.models.loading import load_model

    return load_model("smollm2-135m-instruct")[1]


def llama_sp_tokenizer(texts: list[str]):
    """A SentencePiece-style LLaMA tokenizer: like LLaMA-2's tokenizer.json, the normalizer prefixes "▁" and
    turns every space into "▁", there is no pre-tokenizer, and BOS leads; the BPE merges are learned word by word
    (SentencePiece never merges across a space). Encoding " yes" alone therefore yields a lone "▁" first."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import LlamaTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tok.train_from_iterator(texts, trainer=trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"],
                                                               show_progress=False))
    tok.pre_tokenizer = None  # as LLaMA's: the normalised text is one piece sequence
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    bos = ("<s>", tok.token_to_id("<s>"))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[bos])
    return LlamaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _check_every_style(tok, items) -> None:
    for name, examples in items.items():
        task = get_task(name)
        for ex in examples:
            gold = ex.choices[ex.answer_index]
            ctx_text, cont_text = expected_strings(name, ex.question, gold)
            whole = tok(ctx_text + cont_text)["input_ids"]
            ctx = tok(ctx_text)["input_ids"]
            cont = whole[len(ctx):]
            enc = encode_cloze_example(tok, task, ex, max_length=4096)
            response = [t for t, lab in zip(enc["input_ids"], enc["labels"]) if lab != -100]
            assert response == cont + [tok.eos_token_id], (name, cont_text)
            assert enc["input_ids"] == ctx + cont + [tok.eos_token_id]
            scored = option_requests(task, ex, tok, formulation="cloze")[ex.answer_index]
            assert scored == (ctx, cont), name  # the scorer's row of the gold option is the trained row
            assert tok.decode(cont).strip() == cont_text.strip()
            lengths = choice_lengths(task, ex, "cloze")  # acc_norm divides by the doc_to_choice characters
            assert lengths[ex.answer_index] == len(ctx_text if name == "winogrande" else cont_text[1:])


def test_training_rows_equal_scored_rows_smollm2(smollm2_tokenizer, items):
    _check_every_style(smollm2_tokenizer, items)


def test_training_rows_equal_scored_rows_sentencepiece_llama(items):
    texts = [t for exs in items.values() for ex in exs
             for o in ex.choices for t in expected_strings(ex_task(items, ex), ex.question, o)]
    tok = llama_sp_tokenizer(texts)
    alone = tok.convert_ids_to_tokens(tok(" yes", add_special_tokens=False)["input_ids"])
    assert alone[0] == "▁" and len(alone) > 1  # the trap: encoded alone, " yes" gets a dummy-prefix piece
    _check_every_style(tok, items)
    ex = items["boolq"][0]
    ctx, cont = option_requests(get_task("boolq"), ex, tok, formulation="cloze")[ex.answer_index]
    assert tok.convert_ids_to_tokens(cont)[0] != "▁"  # but after the context it is the word's own piece


def ex_task(items, ex) -> str:
    return next(name for name, exs in items.items() if ex in exs)


def test_cloze_strings_per_task(items):
    wino = items["winogrande"][0]
    item = cloze_item(get_task("winogrande"), wino)
    assert len(set(item.continuations)) == 1 and item.contexts[0].endswith(wino.choices[0])
    boolq = cloze_item(get_task("boolq"), items["boolq"][0])
    assert boolq.continuations == (" yes", " no") and boolq.choices == ("yes", "no")
    assert get_task("boolq").prior_only and not get_task("arc_e").prior_only
    assert {t: get_task(t).primary_metric("cloze") for t in ("arc_e", "arc_c", "obqa", "piqa", "siqa", "hellaswag",
                                                               "winogrande", "boolq")} == {
        "arc_e": "acc_norm", "arc_c": "acc_norm", "obqa": "acc_norm", "piqa": "acc_norm", "siqa": "acc_norm",
        "hellaswag": "acc_norm", "winogrande": "acc", "boolq": "acc"}
    assert get_task("arc_e").primary_metric("label") == "acc"
