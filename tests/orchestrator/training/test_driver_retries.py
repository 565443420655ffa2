"""Trial retries: transient failures are retried up to max_failures, recurring ones (NaN loss, bad config) never."""

from __future__ import annotations

import pytest

from orchestrator.training.driver import fit_with_retries, recurring_failure


class WorkerGroupLike(RuntimeError):
    """Shaped like Ray Train V2's WorkerGroupError: the per-rank exceptions in ``worker_failures``."""

    def __init__(self, failures):
        super().__init__("Training failed due to worker errors")
        self.worker_failures = failures


def _flaky(errors):
    calls = []

    def fit():
        calls.append(1)
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]

    return fit, calls


def test_transient_failures_are_retried_until_success():
    fit, calls = _flaky([WorkerGroupLike({0: ConnectionError("node died")}), RuntimeError("actor lost")])
    fit_with_retries(fit, max_failures=2)
    assert len(calls) == 3


def test_retries_stop_at_max_failures():
    fit, calls = _flaky([RuntimeError("a"), RuntimeError("b"), RuntimeError("c")])
    with pytest.raises(RuntimeError, match="b"):
        fit_with_retries(fit, max_failures=1)
    assert len(calls) == 2


def _wrapped_config_error() -> Exception:
    wrapper = RuntimeError("wrapper")
    wrapper.__cause__ = ValueError("r=0 is impossible")  # a config error under a generic wrapper
    return WorkerGroupLike({0: wrapper})


@pytest.mark.parametrize("error", [
    WorkerGroupLike({1: FloatingPointError("non-finite loss nan at step 3")}),
    _wrapped_config_error(),
    FloatingPointError("direct"),
])
def test_recurring_failures_are_not_retried(error):
    fit, calls = _flaky([error, error])
    with pytest.raises(type(error)):
        fit_with_retries(fit, max_failures=3)
    assert len(calls) == 1 and recurring_failure(error)


def test_a_transient_failure_is_not_taken_for_a_recurring_one():
    assert not recurring_failure(WorkerGroupLike({0: ConnectionError("x"), 1: OSError("y")}))
