"""Tasks and suites on the real shared files (skipped with a reason when ../shared/data is absent)."""
from __future__ import annotations

import json
import time

import pytest

from orchestrator.data import hub
from orchestrator.data.schema import DataError, Example
from orchestrator.data.tasks import SUITES, get_task, load_suite, load_task

# (task, train count or None, test count, labels seen in test) -- ../shared/data/README.md
COMMONSENSE = [
    ("boolq", 9427, 3270, {"true", "false"}),
    ("piqa", None, 1838, {"solution1", "solution2"}),
    ("siqa", None, 1954, {"answer1", "answer2", "answer3"}),
    ("hellaswag", None, 10042, {"ending1", "ending2", "ending3", "ending4"}),
    ("winogrande", None, 1267, {"option1", "option2"}),
    ("arc_e", 2251, 2376, {"answer1", "answer2", "answer3", "answer4", "answer5"}),
    ("arc_c", 1119, 1172, {"answer1", "answer2", "answer3", "answer4"}),
    ("obqa", 4957, 500, {"answer1", "answer2", "answer3", "answer4"}),
]


@pytest.mark.parametrize(("name", "n_train", "n_test", "labels"), COMMONSENSE)
def test_commonsense_counts_and_labels(shared_data_dir, name, n_train, n_test, labels):
    train, test = load_task(name, shared_data_dir)
    assert (len(train) if train is not None else None, len(test)) == (n_train, n_test)
    assert {ex.gold for ex in test} == labels
    assert labels <= set(get_task(name).label_set)
    for ex in test[:50] + test[-50:]:
        assert ex.target == f"the correct answer is {ex.gold}"
        assert ex.labels[ex.answer_index] == ex.gold
        assert len(ex.choices) == len(ex.labels) and all(c.strip() for c in ex.choices)


def test_options_are_parsed_from_the_instruction(shared_data_dir):
    _, arc = load_task("arc_e", shared_data_dir)
    assert arc[0].question == "Which statement best explains why photosynthesis is the foundation of most food webs?"
    assert arc[0].choices == (
        "Sunlight is the source of energy for nearly all ecosystems.",
        "Most ecosystems are found on land instead of in water.",
        "Carbon dioxide is more available than other gases.",
        "The producers in all ecosystems are plants.",
    )
    assert arc[0].answer_index == 0
    _, wino = load_task("winogrande", shared_data_dir)
    assert wino[0].choices == ("Sarah", "Maria") and wino[0].answer_index == 1
    assert wino[0].question == "Sarah was a much better surgeon than Maria so _ always got the easier cases."
    _, hs = load_task("hellaswag", shared_data_dir)
    assert hs[0].question == "Roof shingle removal: A man is sitting on a roof. he"
    assert hs[0].choices[3] == "starts pulling up roofing on a roof." and hs[0].gold == "ending4"
    _, boolq = load_task("boolq", shared_data_dir)
    assert boolq[0].choices == ("true", "false") and boolq[0].gold == "false" and boolq[0].answer_index == 1


def test_gsm8k_counts_and_final_numbers(shared_data_dir):
    train, test = load_task("gsm8k", shared_data_dir)
    assert (len(train), len(test)) == (7473, 1319)
    assert test[0].gold == "18" and test[0].target.endswith("The answer is 18.")
    assert "<<" not in test[0].target and test[0].choices is None
    assert all(float(ex.gold) == float(ex.gold) for ex in test)  # every gold parses as a number


@pytest.mark.parametrize(("name", "n"), [("svamp", 1000), ("addsub", 395), ("multiarith", 600), ("singleeq", 508),
                                         ("mawps", 238), ("aqua", 254)])
def test_math_test_sets_use_answer_field_only(shared_data_dir, name, n):
    train, test = load_task(name, shared_data_dir)
    assert train is None and len(test) == n
    if name == "aqua":
        assert test[0].gold == "A" and test[0].choices[0] == "23.65"  # output says (D): only `answer` is gold
    elif name == "svamp":
        assert test[0].gold == "8" and test[0].target == "The answer is 8."


def test_pubmedqa_official_split(shared_data_dir):
    train, test = load_task("pubmedqa", shared_data_dir)
    assert (len(train), len(test)) == (500, 500)
    assert {ex.gold for ex in test} == {"yes", "no", "maybe"}
    assert test[0].prompt.startswith("Please answer the following question with yes, no or maybe, based on the "
                                      "context.\n\nContext: Programmed cell death (PCD) is the regulated death")
    assert test[0].gold == "yes" and test[0].target == "the correct answer is yes"
    assert test[0].prompt.endswith("Answer format: yes/no/maybe")


def test_mmlu_subject(shared_data_dir):
    dev, test = load_task("mmlu_clinical_knowledge", shared_data_dir)
    assert (len(dev), len(test)) == (5, 265)
    assert test[0].choices == ("18 gauge.", "20 gauge.", "22 gauge.", "24 gauge.") and test[0].gold == "answer1"
    assert get_task("mmlu_professional_law").domain == "law"


def test_suites_name_the_expected_tasks():
    assert SUITES["intra_domain"] == ("piqa", "obqa", "boolq", "arc_c", "arc_e")
    assert len(SUITES["commonsense8"]) == 8 and set(SUITES["intra_domain"]) < set(SUITES["commonsense8"])
    assert {get_task(t).domain for t in SUITES["inter_domain"]} >= {"math", "medical", "science", "reading", "law"}
    assert get_task("ARC-Challenge").name == "arc_c"
    with pytest.raises(DataError, match="unknown task 'arc_x'"):
        get_task("arc_x")


def test_bad_inputs_name_the_problem(shared_data_dir, tmp_path):
    with pytest.raises(DataError, match="data directory not found"):
        load_suite("intra_domain", tmp_path / "nope")
    with pytest.raises(DataError, match=r"data file not found: .*piqa.*test\.json"):
        load_suite("piqa", tmp_path)
    with pytest.raises(DataError, match="val_limit=0"):
        load_suite("piqa", shared_data_dir, val_limit=0)
    with pytest.raises(DataError, match="test_limit names tasks not in suite"):
        load_suite("piqa", shared_data_dir, test_limit={"boolq": 3})
    bad = tmp_path / "commonsense" / "piqa"
    bad.mkdir(parents=True)
    (bad / "test.json").write_text('[{"instruction": "no format line", "answer": "solution1"}]')
    with pytest.raises(DataError, match=r"test\.json\[0\]: not an LLM-Adapters multiple-choice item"):
        load_task("piqa", tmp_path)


def test_hub_offline_fails_fast_with_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(DataError) as info:
        load_suite("intra_domain", None)
    assert time.perf_counter() - start < 1.0
    assert "\n" not in str(info.value) and "pass a local data directory" in str(info.value)


def test_hub_unreachable_sets_offline(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(DataError, match="pass a local data directory"):
        load_task("boolq", None)
    import os

    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_hub_rows_give_the_same_examples_as_local_files(shared_data_dir, monkeypatch):
    rows = {
        "arc_e": {"question": "Which statement best explains why photosynthesis is the foundation of most food webs?",
                  "choices": {"text": ["Sunlight is the source of energy for nearly all ecosystems.",
                                       "Most ecosystems are found on land instead of in water.",
                                       "Carbon dioxide is more available than other gases.",
                                       "The producers in all ecosystems are plants."],
                              "label": ["A", "B", "C", "D"]}, "answerKey": "A"},
        "winogrande": {"sentence": "Sarah was a much better surgeon than Maria so _ always got the easier cases.",
                       "option1": "Sarah", "option2": "Maria", "answer": "2"},
        "boolq": {"question": "does ethanol take more energy make that produces", "answer": False, "passage": "..."},
    }
    first = {name: load_task(name, shared_data_dir)[1][0] for name in ("piqa", "hellaswag", "obqa", "gsm8k",
                                                                       "pubmedqa", "mmlu_anatomy")}
    rows["piqa"] = {"goal": first["piqa"].question, "sol1": first["piqa"].choices[0],
                    "sol2": first["piqa"].choices[1], "label": 0}
    stem = first["hellaswag"].question
    rows["hellaswag"] = {"activity_label": stem.split(": ")[0], "ctx": stem.split(": ", 1)[1],
                         "endings": list(first["hellaswag"].choices), "label": "3"}
    rows["siqa"] = {"context": "Tracy didn't go home that evening and resisted Riley's attacks.",
                    "question": "What does Tracy need to do before this?", "answerA": "make a new plan",
                    "answerB": "Go home and see Riley", "answerC": "Find somewhere to go", "label": "3"}
    rows["obqa"] = {"question_stem": first["obqa"].question, "answerKey": "B",
                    "choices": {"text": list(first["obqa"].choices), "label": ["A", "B", "C", "D"]}}
    gsm = (shared_data_dir / "math" / "gsm8k" / "test.jsonl").read_text().splitlines()[0]
    rows["gsm8k"] = json.loads(gsm)
    pqa = json.loads((shared_data_dir / "medical" / "pubmedqa" / "ori_pqal.json").read_text())["21645374"]
    rows["pubmedqa"] = {"question": pqa["QUESTION"], "context": {"contexts": pqa["CONTEXTS"]}, "final_decision": "yes"}
    rows["mmlu_anatomy"] = {"question": first["mmlu_anatomy"].question, "choices": list(first["mmlu_anatomy"].choices),
                            "answer": first["mmlu_anatomy"].answer_index}
    monkeypatch.setattr(hub, "_rows", lambda task, *a: [rows[task]])
    for name in rows:
        _, local = load_task(name, shared_data_dir)
        _, remote = load_task(name, None)
        assert remote == [local[0]], name


def test_example_is_frozen():
    ex = Example("p", "t", ("a", "b"), 1, "b", ("a", "b"))
    with pytest.raises(AttributeError):
        ex.prompt = "x"  # type: ignore[misc]
