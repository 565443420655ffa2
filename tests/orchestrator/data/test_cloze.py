"""Cloze training examples are token for token the rows the scorer scores, for every task's cloze style, with a
byte-level BPE tokenizer (SmolLM2's) and a SentencePiece-style LLaMA tokenizer (the leading-space trap)."""
from __future__ import annotations

import re

import pytest

from orchestrator.data.cloze import cloze_item, encode_cloze_example, encode_pair, hellaswag_clean
from orchestrator.data.schema import DataError, Example
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
    if task == "piqa":  # lm-eval scores the dataset's solution with its own spaces: read it from the instruction
        k = ex_choices[question].index(option) + 1
        raw = re.search(rf"Solution{k}: (.*?)\n\n(Solution|Answer format)", ex_prompts[question], re.S).group(1)
        return f"Question: {question}\nAnswer:", " " + raw
    if task == "boolq":
        return f"Question: {question}\nAnswer:", " " + {"true": "yes", "false": "no"}[option]
    if task == "pubmedqa":
        return f"{question}\nAnswer:", " " + option
    return f"Question: {question}\nAnswer:", " " + option


ex_prompts: dict[str, str] = {}  # PIQA question -> its instruction, to read the raw solutions back
ex_choices: dict[str, tuple[str, ...]] = {}


@pytest.fixture(scope="module")
def items(shared_data_dir):
    out = {}
    for name in TASKS:
        _, evaluation = load_task(name, shared_data_dir)
        out[name] = evaluation[:4]
    # PIQA's test items 0-3 have no trailing space: add the first whose gold solution has one (lm-eval keeps it)
    _, piqa = load_task("piqa", shared_data_dir)
    spaced = next(ex for ex in piqa if re.search(rf"Solution{ex.answer_index + 1}: [^\n]* \n\n", ex.prompt))
    out["piqa"] = out["piqa"] + [spaced]
    for ex in out["piqa"]:
        ex_prompts[ex.question], ex_choices[ex.question] = ex.prompt, ex.choices
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


def _tiny_with(single: str):
    """The tiny byte-level tokenizer with a post-processor template (``"<s> $A"``: BOS; ``"$A </s>"``: EOS)."""
    from tokenizers import processors

    from orchestrator.models.loading import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    specials = [(t, tok.convert_tokens_to_ids(t)) for t in ("<s>", "</s>") if t in single]
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single=single, special_tokens=specials)
    return tok


def test_a_tokenizer_that_appends_eos_splits_the_pair_at_the_context():
    # issue 29 item 11: with EOS appended, whole[len(ctx):] would drop the continuation's first token
    tok = _tiny_with("$A </s>")
    assert tok("Answer:")["input_ids"][-1] == tok.eos_token_id  # the trap is armed
    plain = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    ctx, cont = encode_pair(tok, "Question: is the sky blue?\nAnswer:", " yes")
    assert ctx == plain("Question: is the sky blue?\nAnswer:")
    assert ctx + cont == plain("Question: is the sky blue?\nAnswer: yes") and tok.eos_token_id not in cont


def test_a_merge_across_the_boundary_is_refused():
    from orchestrator.models.loading import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    context, continuation = "Q", "uestion: what is red?"
    whole, alone = tok(context + continuation)["input_ids"], tok(context)["input_ids"]
    assert whole[:len(alone)] != alone  # "Q" + "uestion" merge: "Q" alone is another token
    with pytest.raises(DataError, match="merge across the boundary"):
        encode_pair(tok, context, continuation)


def test_long_items_train_on_the_row_they_are_scored_on(items):
    # issue 29 item 10: one cut for both; BOS kept; the continuation whole
    from orchestrator.evaluation import scoring as sc

    tok = _tiny_with("<s> $A")
    for name, examples in items.items():
        task = get_task(name)
        for ex in examples:
            requests = option_requests(task, ex, tok, formulation="cloze")
            ctx, cont = requests[ex.answer_index]
            max_length = len(cont) + 1 + 4  # room for 4 context tokens: BOS and the last 3
            enc = encode_cloze_example(tok, task, ex, max_length=max_length)
            scored = sc.fit_requests(tok, [requests], max_length)[0]
            if scored is None:  # another option is too long for this room: check the gold row alone
                scored_ctx, scored_cont = sc.fit_requests(tok, [[(ctx, cont)]], max_length)[0][0]
            else:
                scored_ctx, scored_cont = scored[ex.answer_index]
            assert scored_ctx == [tok.bos_token_id] + ctx[-3:] and scored_cont == cont, name
            assert enc["input_ids"] == scored_ctx + scored_cont + [tok.eos_token_id], name


def test_hellaswag_text_is_cleaned_as_lm_eval_does(items):
    assert hellaswag_clean(" Visit a site like [www.kiddio.org] to find toys. ") == "Visit a site like to find toys."
    assert hellaswag_clean("How to fix a bike [title] Remove the wheel [step] Then") == \
        "How to fix a bike. Remove the wheel Then"
    marked = Example("p", "t", ("See [find a lawyer | how to] now", "b"), 0, "ending1", ("ending1", "ending2"),
                     "Ctx [x] here")
    item = cloze_item(get_task("hellaswag"), marked)
    assert item.contexts[0] == "Ctx here" and item.continuations[0] == " See now"
    assert item.choices[0] == "See now"  # acc_norm divides by the cleaned ending, as lm-eval


def test_a_winogrande_sentence_without_a_blank_is_refused():
    ex = Example("p", "t", ("Sarah", "Maria"), 0, "option1", ("option1", "option2"), "Sarah beat Maria and won.")
    with pytest.raises(DataError, match=r"winogrande.*'Sarah beat Maria and won\.' has no blank"):
        cloze_item(get_task("winogrande"), ex)
