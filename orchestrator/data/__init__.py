"""Benchmark tasks and suites, cross-task mixing, and tokenisation with response-only loss."""
from orchestrator.data.mixing import label_token_counts, mix_examples, mixture_weights
from orchestrator.data.schema import DataError, Example
from orchestrator.data.tasks import SUITES, Suite, Task, get_task, load_suite, load_task
from orchestrator.data.tokenize import collate, encode_example, encode_examples, render_prompt

__all__ = [
    "DataError", "Example", "SUITES", "Suite", "Task", "collate", "encode_example", "encode_examples",
    "get_task", "label_token_counts", "load_suite", "load_task", "mix_examples", "mixture_weights", "render_prompt",
]
