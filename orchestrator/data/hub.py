"""The same tasks from the Hugging Face Hub, by dataset id, when no local data directory is given.

Each Hub row is rewritten into the LLM-Adapters layout of the local files and parsed by the same code, so a
task gives identical prompts and targets from either source. Offline (``HF_HUB_OFFLINE=1``, or the Hub
unreachable within a few seconds, in which case ``HF_HUB_OFFLINE`` is set for the rest of the process) this
fails at once with a one-line :class:`DataError` that says to pass a local data directory: without that flag
``datasets`` takes ~25 s to give up.
"""
from __future__ import annotations

import os
import socket
import threading
from urllib.parse import urlparse

from orchestrator.data.loaders import (
    choice_example,
    gsm8k_example,
    mc_item,
    pubmedqa_example,
)
from orchestrator.data.schema import DataError, Example

# task name -> (dataset id, config, train split or None, eval split)
HUB_SOURCES: dict[str, tuple[str, str | None, str | None, str]] = {
    "boolq": ("google/boolq", None, "train", "validation"),
    "piqa": ("ybisk/piqa", None, "train", "validation"),
    "siqa": ("allenai/social_i_qa", None, "train", "validation"),
    "hellaswag": ("Rowan/hellaswag", None, "train", "validation"),
    "winogrande": ("allenai/winogrande", "winogrande_xl", "train", "validation"),
    "arc_e": ("allenai/ai2_arc", "ARC-Easy", "train", "test"),
    "arc_c": ("allenai/ai2_arc", "ARC-Challenge", "train", "test"),
    "obqa": ("allenai/openbookqa", "main", "train", "test"),
    "gsm8k": ("openai/gsm8k", "main", "train", "test"),
    "pubmedqa": ("qiaojin/PubMedQA", "pqa_labeled", None, "train"),
}
#: Datasets whose labelled test split is the one evaluated, and which also ship a labelled validation split: it
#: is their val pool (the other tasks' evaluated split *is* their validation split; val is carved from train).
HUB_VALIDATION = {"arc_e": "validation", "arc_c": "validation", "obqa": "validation"}
_OFFLINE_VALUES = ("1", "true", "yes", "on")


def _offline_message(task: str) -> str:
    return (f"task {task!r}: no local data directory given and the Hugging Face Hub is offline "
            "(HF_HUB_OFFLINE=1); pass a local data directory (--data-dir / data_dir=, e.g. ../shared/data)")


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or ``HF_DATASETS_OFFLINE``) is set to a true value."""
    return any(os.environ.get(k, "").strip().lower() in _OFFLINE_VALUES
               for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A TCP connect to the Hub endpoint, bounded by ``timeout`` even when DNS hangs."""
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    ok: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    worker = threading.Thread(target=probe, daemon=True)
    worker.start()
    worker.join(timeout + 0.5)
    return bool(ok)


def _rows(task: str, dataset_id: str, config: str | None, split: str) -> list[dict]:
    if hub_offline():
        raise DataError(_offline_message(task))
    if not _hub_reachable():
        os.environ["HF_HUB_OFFLINE"] = "1"  # later tasks then fail in microseconds, not 25 s each
        raise DataError(_offline_message(task))
    import datasets

    try:
        return list(datasets.load_dataset(dataset_id, config, split=split))
    except Exception as exc:  # datasets raises many types; the user needs one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(f"task {task!r}: could not load {dataset_id}[{config}] split {split!r} from the Hub "
                        f"({first}); pass a local data directory instead") from exc


def _letter_index(key: str, labels) -> int:
    return list(labels).index(key)


def _convert(task: str, row: dict, where: str) -> Example:
    """One Hub row -> Example, via the LLM-Adapters layout of the local files."""
    if task == "boolq":
        gold = "true" if row["answer"] else "false"
        question = row["question"].strip().rstrip("?") + "?"
        item = {"instruction": "Please answer the following question with true or false, question: "
                f"{question}\n\nAnswer format: true/false", "answer": gold}
    elif task == "piqa":
        item = mc_item(row["goal"], [row["sol1"], row["sol2"]], int(row["label"]),
                       header="solution to the question", word="solution", option_sep="\n\n")
    elif task == "siqa":
        item = mc_item(f"{row['context']} {row['question']}", [row["answerA"], row["answerB"], row["answerC"]],
                       int(row["label"]) - 1)
    elif task == "hellaswag":
        item = mc_item(f"{row['activity_label']}: {row['ctx']}", row["endings"], int(row["label"]),
                       header="ending to complete the given sentence", word="ending")
    elif task == "winogrande":
        item = mc_item(row["sentence"], [row["option1"], row["option2"]], int(row["answer"]) - 1,
                       header="answer to fill in the blank to complete the given sentence", word="option",
                       tail_sep=" ")
    elif task in ("arc_e", "arc_c", "obqa"):
        question = row["question"] if task != "obqa" else row["question_stem"]
        item = mc_item(question, row["choices"]["text"], _letter_index(row["answerKey"], row["choices"]["label"]))
    elif task == "gsm8k":
        return gsm8k_example(row["question"], row["answer"], where)
    elif task == "pubmedqa":
        return pubmedqa_example(row["question"], row["context"]["contexts"], row["final_decision"], where)
    elif task.startswith("mmlu_"):
        item = mc_item(row["question"], row["choices"], int(row["answer"]))
    else:
        raise DataError(f"task {task!r} has no Hub source; pass a local data directory")
    return choice_example(item, where)


def load_hub_task(task: str) -> tuple[list[Example] | None, list[Example]]:
    """``(train or None, eval)`` for ``task`` from the Hub."""
    if task.startswith("mmlu_"):
        dataset_id, config, train_split, eval_split = "cais/mmlu", task[len("mmlu_"):], "dev", "test"
    elif task in HUB_SOURCES:
        dataset_id, config, train_split, eval_split = HUB_SOURCES[task]
    else:
        raise DataError(f"task {task!r} has no Hub source; pass a local data directory")

    def convert(split: str) -> list[Example]:
        rows = _rows(task, dataset_id, config, split)
        return [_convert(task, row, f"{dataset_id}[{config}]/{split}[{i}]") for i, row in enumerate(rows)]

    return (convert(train_split) if train_split else None), convert(eval_split)


def load_hub_validation(task: str) -> list[Example] | None:
    """The dataset's own validation split for ``task`` (``HUB_VALIDATION``), or None when it has none."""
    split = HUB_VALIDATION.get(task)
    if split is None:
        return None
    dataset_id, config, _, _ = HUB_SOURCES[task]
    rows = _rows(task, dataset_id, config, split)
    return [_convert(task, row, f"{dataset_id}[{config}]/{split}[{i}]") for i, row in enumerate(rows)]
