"""Option log-likelihood scoring with controlled logits, generation parsing, evaluate_tasks and the CLI."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from orchestrator.evaluation import scoring as sc
from orchestrator.data.schema import DataError, Example
from orchestrator.data.tokenize import ALPACA_PROMPT
from orchestrator.data.tasks import get_task, load_task
from orchestrator.evaluate import main
from orchestrator.evaluation.accuracy import TaskScore, evaluate_tasks, option_requests
from orchestrator.models.loading import build_tiny_llama, build_tiny_tokenizer


class BigramLM(nn.Module):
    """A model whose logits we control: ``logits[b, t] = table[input_ids[b, t]]``."""

    def __init__(self, vocab: int):
        super().__init__()
        self.table = nn.Parameter(torch.zeros(vocab, vocab))
        self.config = SimpleNamespace(max_position_embeddings=512)

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0):
        logits = self.table[input_ids]  # (B, T, V)
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_llama(seed=0)


def _last_token(tok, text: str) -> tuple[int, int]:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return ids[-2], ids[-1]


def test_label_scoring_follows_the_logits_on_a_real_item(shared_data_dir, tok):
    _, arc = load_task("arc_e", shared_data_dir)
    ex = arc[0]  # photosynthesis; gold answer1 (sunlight)
    assert ex.gold == "answer1"
    model = BigramLM(len(tok))
    prev, gold_last = _last_token(tok, " answer1")
    _, wrong_last = _last_token(tok, " answer3")
    with torch.no_grad():
        model.table[prev, gold_last] = 5.0
    assert evaluate_tasks(model, tok, {"arc_e": [ex]}, formulation="label")["arc_e"].accuracy == 1.0
    with torch.no_grad():
        model.table[prev, wrong_last] = 6.0
    score = evaluate_tasks(model, tok, {"arc_e": [ex]}, formulation="label")["arc_e"]
    assert score.logliks[0][2] == max(score.logliks[0]) and len(score.logliks[0]) == 4   # option 3 is the likeliest
    assert score == TaskScore(0.0, 1, 0.0, "loglik/label", 0.25, (0,), "acc", (0,), (2,), (2,), gold=(0,),
                              logliks=score.logliks)


def test_sum_and_length_normalised_log_likelihood_by_hand(tok):
    # Uniform logits: every token costs log V, so LL(c) = -len(c) log V.
    # acc picks the option with the fewest tokens; acc_norm divides by the option's characters (lm-eval).
    long, short = "the quick brown fox jumps over the lazy dog", "zq"
    ex = Example("q", "t", (long, short), 0, "answer1", ("answer1", "answer2"), "Which?")
    task = get_task("arc_e")
    model = BigramLM(len(tok))
    reqs = option_requests(task, ex, tok, formulation="cloze")
    n_tokens = [len(tok("Question: Which?\nAnswer: " + o)["input_ids"]) - len(tok("Question: Which?\nAnswer:")
                                                                              ["input_ids"]) for o in (long, short)]
    assert [len(c) for _, c in reqs] == n_tokens
    ll = sc.option_logprobs(model, [reqs], batch_size=2, pad_id=0)
    assert [ll[0], ll[1]] == pytest.approx([-n * math.log(len(tok)) for n in n_tokens])
    norm = [-n * math.log(len(tok)) / len(o) for n, o in zip(n_tokens, (long, short))]
    score = evaluate_tasks(model, tok, {"arc_e": [ex]}, formulation="cloze")["arc_e"]
    assert n_tokens[1] < n_tokens[0] and score.accuracy == 0.0  # the short wrong option wins on the sum
    assert score.accuracy_norm == float(norm[0] > norm[1]) == 1.0  # and loses per character
    assert score.primary == "acc_norm" and score.primary_accuracy == 1.0 and score.chosen_norm == (0,)


def test_batched_left_padded_log_likelihood_matches_unpadded(tiny):
    model, tok = tiny
    requests = [[(tok("Question: what is red?\nAnswer:")["input_ids"], tok(" a tomato", add_special_tokens=False)
                  ["input_ids"]), ([5, 6], [7, 8, 9, 10, 11])], [([40] * 30, [41])]]
    reference = {}
    with torch.no_grad():
        flat = 0
        for options in requests:
            for ctx, cont in options:
                logp = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0].float(), -1)
                reference[flat] = float(sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))
                flat += 1
    for batch_size in (1, 3):
        for pack_tokens in (1, 256):  # a row per group (padded batches), or every group in one row
            got = sc.option_logprobs(model, requests, batch_size=batch_size, pad_id=tok.pad_token_id,
                                     pack_tokens=pack_tokens)
            assert got == pytest.approx(reference, abs=1e-4)


def test_options_of_a_shared_context_form_one_group(tok):
    ex = Example("p", "t", ("a red apple", "the blue sky", "green"), 0, "answer1",
                 ("answer1", "answer2", "answer3"), "q")
    reqs = option_requests(get_task("arc_e"), ex, tok, formulation="label")
    groups = sc.build_groups([reqs])
    assert len(groups) == 1 and len(groups[0].options) == 3
    assert [len(c) for _, c in reqs] == [2, 2, 2] and len({c[0] for _, c in reqs}) == 1  # " answer" + k
    assert groups[0].length == len(reqs[0][0]) + 1  # the context once, " answer" once for all three labels
    text_reqs = option_requests(get_task("arc_e"), ex, tok, formulation="cloze")
    assert len(sc.build_groups([text_reqs])) == 1  # one shared context, three option segments


def test_cloze_contexts(tok):
    wino = Example("p", "t", ("Sarah", "Maria"), 1, "option2", ("option1", "option2"), "Sarah beat Maria so _ won.")
    reqs = option_requests(get_task("winogrande"), wino, tok, formulation="cloze")
    assert [tok.decode(c) for c, _ in reqs] == ["Sarah beat Maria so Sarah", "Sarah beat Maria so Maria"]
    assert {tok.decode(x) for _, x in reqs} == {" won."}
    boolq = Example("p", "t", ("true", "false"), 0, "true", ("true", "false"), "is it?")
    reqs = option_requests(get_task("boolq"), boolq, tok, formulation="cloze")
    assert tok.decode(reqs[0][0]) == "Question: is it?\nAnswer:"
    assert [tok.decode(x) for _, x in reqs] == [" yes", " no"]  # lm-eval's and OLMES' BoolQ options


def test_generation_parsing():
    labels = ("answer1", "answer2", "answer3")
    assert sc.parse_label("The correct answer is Answer2. answer1 is wrong", labels) == 1
    assert sc.parse_label("no idea", labels) is None
    assert sc.parse_label("that is untrue", ("true", "false")) is None
    assert sc.parse_label("false, surely", ("true", "false")) == 1
    assert sc.parse_letter("A quick look: the answer is (D).") == 3
    assert sc.parse_letter("I cannot tell") is None


@pytest.mark.parametrize(("text", "gold", "ok"), [
    ("so she makes 9 * 2 = $18 per day. The answer is 18.", "18", True),
    ("The total is 1,234.0 apples", "1234", True),
    ("It is -3.5 degrees", "-3.5", True),
    ("8 apples and 9 pears", "8", False),  # the *last* number counts
    ("nothing numeric", "8", False),
    ("the answer is 0.3333", "0.333", True),  # LLM-Adapters' tolerance 1e-3
])
def test_number_extraction(text, gold, ok):
    assert sc.number_correct(text, gold) is ok


def _plain_loglik(model, ctx: list[int], cont: list[int]) -> float:
    """One unpadded full forward of context + continuation, log-softmax at every position."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0].double(), -1)
    return float(sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))


def test_evaluate_tasks_end_to_end(tiny, shared_data_dir):
    model, tok = tiny
    model.train()
    _, arc = load_task("arc_e", shared_data_dir)
    _, gsm = load_task("gsm8k", shared_data_dir)
    scores = evaluate_tasks(model, tok, {"arc_e": arc[:6], "gsm8k": gsm[:1]}, batch_size=2, max_new_tokens=2)
    assert scores["arc_e"].n == 6 and scores["arc_e"].method == "loglik/label" and scores["arc_e"].chance == 0.25
    assert scores["gsm8k"].n == 1 and scores["gsm8k"].method == "generate" and scores["gsm8k"].accuracy_norm is None
    prefix = tok("the correct answer is", add_special_tokens=False)["input_ids"]
    for formulation in ("label", "cloze"):
        got = evaluate_tasks(model, tok, {"arc_e": arc[:6]}, batch_size=4, formulation=formulation)["arc_e"]
        chosen = []
        for ex in arc[:6]:  # contexts and continuations written out here, scored one plain forward each
            if formulation == "label":
                ctx = tok(ALPACA_PROMPT.format(instruction=ex.prompt))["input_ids"] + prefix
                lls = [_plain_loglik(model, ctx, tok(f" {lab}", add_special_tokens=False)["input_ids"])
                       for lab in ex.labels]
            else:
                ctx = tok(f"Question: {ex.question}\nAnswer:")["input_ids"]
                lls = [_plain_loglik(model, ctx, tok(f"Question: {ex.question}\nAnswer: {c}")["input_ids"][len(ctx):])
                       for c in ex.choices]
            chosen.append(max(range(len(lls)), key=lambda k: lls[k]))
        assert got.chosen == tuple(chosen), formulation
        assert got.accuracy == sum(c == ex.answer_index for c, ex in zip(chosen, arc[:6])) / 6
    assert model.training  # the caller's mode is restored


def test_an_item_too_long_for_max_length_is_unanswered_and_counted(tiny, caplog):
    # issue 29 item 9: an option whose continuation alone cannot fit is never scored silently
    model, tok = tiny
    short, long = "red", "a very long answer that goes on and on and on about many things"
    n_long = len(tok(f"Question: q?\nAnswer: {long}")["input_ids"]) - len(tok("Question: q?\nAnswer:")["input_ids"])
    fits = Example("p", "t", (short, "blue"), 0, "answer1", ("answer1", "answer2"), "q?")
    too_long = Example("p", "t", (short, long), 0, "answer1", ("answer1", "answer2"), "q?")
    max_length = n_long  # the long option plus eos leave no room for one context token
    with caplog.at_level("WARNING", logger="orchestrator.evaluation.scoring"):
        score = evaluate_tasks(model, tok, {"arc_e": [fits, too_long]}, formulation="cloze", max_length=max_length)
    assert score["arc_e"].n == 2 and score["arc_e"].chosen[1] == -1 and score["arc_e"].correct[1] == 0
    assert score["arc_e"].chosen[0] in (0, 1) and score["arc_e"].chosen_norm[1] == -1
    assert any("arc_e: 1 of 2 items not scored" in r.getMessage() for r in caplog.records)


def test_generate_hits_follow_the_generated_text(tiny, shared_data_dir):
    model, tok = tiny
    _, arc = load_task("arc_e", shared_data_dir)
    gen = evaluate_tasks(model, tok, {"arc_e": arc[:3]}, scoring="generate", max_new_tokens=3)["arc_e"]
    expected = []
    for ex in arc[:3]:  # one unbatched HF generate per item, parsed by the LLM-Adapters rule written out here
        ids = torch.tensor([tok(ALPACA_PROMPT.format(instruction=ex.prompt))["input_ids"]])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).lower()
        found = sorted((text.find(lab), k) for k, lab in enumerate(ex.labels) if lab in text)
        expected.append(found[0][1] if found else -1)
    assert gen.method == "generate" and gen.chosen == tuple(expected)
    assert gen.correct == tuple(int(c == ex.answer_index) for c, ex in zip(expected, arc[:3]))
    with pytest.raises(DataError, match="formulation='cloze'"):
        evaluate_tasks(model, tok, {"arc_e": arc[:1]}, scoring="generate", formulation="cloze")


def test_generate_is_deterministic(tiny):
    model, tok = tiny
    prompts = [tok("Paris is")["input_ids"], tok("The quick brown fox jumps")["input_ids"]]
    first = sc.generate(model, tok, prompts, max_new_tokens=4, batch_size=2)
    assert first == sc.generate(model, tok, prompts, max_new_tokens=4, batch_size=2) and len(first) == 2


def test_cli_table_and_errors(shared_data_dir, capsys):
    assert main(["--model", "tiny-llama", "--suite", "arc_e,boolq", "--limit", "2",
                 "--data-dir", str(shared_data_dir)]) == 0
    out = capsys.readouterr().out
    assert "| arc_e | 2 |" in out and "| boolq | 2 |" in out and "| mean | 4 |" in out and "time:" in out
    assert "formulation cloze" in out and "| acc_norm " in out  # cloze by default; arc_e's primary metric
    assert main(["--model", "tiny-llama", "--suite", "boolq", "--options", "text"]) == 2
    assert "--options was replaced by --formulation" in capsys.readouterr().err
    assert main(["--model", "tiny-llama", "--suite", "nope", "--data-dir", str(shared_data_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown suite or task 'nope'") and err.count("\n") == 1
    assert main(["--model", "no/such-model", "--suite", "boolq", "--limit", "1",
                 "--data-dir", str(shared_data_dir)]) == 2
    assert "cannot load model 'no/such-model'" in capsys.readouterr().err
