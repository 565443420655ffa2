"""The MLflow outbox without a server: writes stay in order through an outage, go offline without touching the
store while it is down, land once it is back; a write the store refuses is dropped, not retried forever."""

from __future__ import annotations

import json
import os

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from orchestrator.report import outbox
from orchestrator.report.outbox import Outbox, is_outage


class Store:
    """Stands in for the tracking server: ``down`` makes every write raise what MLflow raises after retries."""

    def __init__(self):
        self.down, self.calls, self.logged = False, 0, []

    def write(self, item):
        def run():
            self.calls += 1
            if self.down:
                raise MlflowException("API request to http://127.0.0.1:5055/api/2.0/mlflow/runs/log-batch failed "
                                      "with exception HTTPConnectionPool: Max retries exceeded")
            self.logged.append(item)
        return run


def test_writes_wait_out_an_outage_in_order():
    store, box = Store(), Outbox(retry_s=3600.0)
    box.put("a", store.write("a"))
    store.down = True
    box.put("b", store.write("b"))
    calls = store.calls
    for item in "cde":  # offline: queued without a call to the store, so no trial waits on it
        box.put(item, store.write(item))
    assert store.calls == calls and [w for w, _ in box.pending] == ["b", "c", "d", "e"]
    store.down = False
    assert box.flush() is False  # still inside the offline window: nothing is tried
    box.offline_until = 0.0  # the window has passed
    assert box.flush() is True
    assert store.logged == ["a", "b", "c", "d", "e"] and not box.pending


def test_flush_with_a_deadline_waits_for_the_store():
    store, box = Store(), Outbox(retry_s=0.01)
    store.down = True
    box.put("a", store.write("a"))
    box.put("b", store.write("b"))
    assert box.flush(deadline_s=0.05) is False and store.logged == []
    tries = store.calls

    def back_on_third_try():
        if store.calls - tries == 2:
            store.down = False
        store.write("c")()
    box.pending.appendleft(("c", back_on_third_try))
    assert box.flush(deadline_s=60.0) is True
    assert store.logged == ["c", "a", "b"] and store.calls - tries == 5  # 3 tries of c, then a and b once


def test_a_refused_write_is_dropped_and_the_rest_goes_on():
    store, box = Store(), Outbox(retry_s=3600.0)

    def refused():
        raise MlflowException("Changing param values is not allowed", error_code=INVALID_PARAMETER_VALUE)
    box.put("refused", refused)
    box.put("a", store.write("a"))
    assert store.logged == ["a"] and box.dropped == 1 and not box.pending


def test_outage_classification():
    assert is_outage(MlflowException("API request failed with exception"))  # INTERNAL_ERROR
    assert is_outage(ConnectionRefusedError())
    assert not is_outage(MlflowException("bad", error_code=INVALID_PARAMETER_VALUE))
    assert not is_outage(KeyError("a bug of ours"))


def test_bounded_http_retries_unless_the_user_set_them(monkeypatch):
    for key in outbox.HTTP_DEFAULTS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    outbox.bound_http_requests()
    from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT

    assert MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() == 1 and MLFLOW_HTTP_REQUEST_TIMEOUT.get() == 30
    assert os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] == "1"


@pytest.fixture(autouse=True)
def _restore_env(monkeypatch):
    for key in outbox.HTTP_DEFAULTS:  # bound_http_requests writes os.environ: undone after each test
        monkeypatch.setenv(key, os.environ.get(key, outbox.HTTP_DEFAULTS[key]))


def test_an_outage_like_error_that_recurs_while_the_store_answers_is_skipped_not_blocking():
    """A write failing with an outage-like error (INTERNAL_ERROR) while the probe reaches the store is tried once
    more, then skipped and listed; the writes behind it land at once instead of waiting for the final flush."""
    store, box = Store(), Outbox(retry_s=3600.0, probe=lambda: None)
    tries = []

    def broken():
        tries.append(1)
        raise MlflowException("API request to .../runs/log-batch failed: INTERNAL_ERROR")  # is_outage() is True
    box.put("broken", broken)
    box.put("a", store.write("a"))
    assert len(tries) == 2 and store.logged == ["a"] and not box.pending
    assert box.skipped == [("broken", "MlflowException: API request to .../runs/log-batch failed: INTERNAL_ERROR")]


def test_without_the_store_the_same_error_is_an_outage_and_waits():
    store, box = Store(), Outbox(retry_s=3600.0, probe=lambda: (_ for _ in ()).throw(ConnectionRefusedError()))
    store.down = True
    box.put("a", store.write("a"))
    box.put("b", store.write("b"))
    assert [w for w, _ in box.pending] == ["a", "b"] and box.skipped == [] and store.calls == 1


def test_the_journal_keeps_queued_writes_until_they_land_or_are_skipped(tmp_path):
    """On a real SQLite store: a write the store refuses (closing a run that does not exist) is skipped and
    journalled as such; an outage keeps the rest queued in the journal; a new Journal on the file (a resumed
    driver) sees exactly those as pending, in order."""
    from orchestrator.report import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = tracking.ensure_experiment(uri, "journal")
    run = tracking.client(uri).create_run(exp).info.run_id
    journal = outbox.Journal(tmp_path / "j" / "outbox.jsonl", replay=False)
    store, box = Store(), Outbox(retry_s=3600.0, journal=journal)
    box.put("refused", lambda: tracking.client(uri).set_terminated("0" * 32, "FINISHED"), {"op": "close"})
    box.put("metric", lambda: tracking.log_dict(uri, run, metrics={"m": 1.0}), {"op": "m"})
    store.down = True
    box.put("b", store.write("b"), {"op": "b"})
    box.put("c", store.write("c"), {"op": "c"})
    assert tracking.client(uri).get_run(run).data.metrics == {"m": 1.0}
    assert box.skipped == [("refused", f"MlflowException: Run with id={'0' * 32} not found")]
    lines = [json.loads(x) for x in (tmp_path / "j" / "outbox.jsonl").read_text().splitlines()]
    assert [(x.get("seq"), x.get("done"), x.get("op")) for x in lines] == [
        (1, None, "close"), (None, 1, None), (2, None, "m"), (None, 2, None), (3, None, "b"), (4, None, "c")]
    assert "skipped" in lines[1] and "skipped" not in lines[3]
    again = outbox.Journal(tmp_path / "j" / "outbox.jsonl", replay=True)
    assert [(r["seq"], r["what"]) for r in again.pending()] == [(3, "b"), (4, "c")] and again.seq == 4
    fresh = outbox.Journal(tmp_path / "j" / "outbox.jsonl", replay=False)  # a new search: nothing replayed
    assert fresh.pending() == [] and (tmp_path / "j" / "outbox.jsonl.old").is_file()
