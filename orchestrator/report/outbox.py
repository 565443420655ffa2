"""MLflow writes that survive a tracking-server outage: bounded HTTP retries, an ordered local buffer, a flush.

The Tune callback runs inside Tune's event loop, so every second it waits on MLflow is a second no trial's result
is processed, and an exception from it aborts the whole search. MLflow's own defaults retry a dead server for
about 4 minutes per call (``MLFLOW_HTTP_REQUEST_MAX_RETRIES=7`` with exponential backoff, 120 s timeout).

* :func:`bound_http_requests` lowers those defaults for this process (unless already set): 1 retry, 10 s timeout.
* :class:`Outbox` keeps the writes in order. A write that fails because the store is unreachable stays queued and
  the outbox goes *offline* for ``retry_s``: later writes are queued without touching the network, so a trial
  waits at most one bounded call per ``retry_s``. The first write after that retries the queue from its head.
  A write that the store rejects for good (a bug, a refused value) is logged and dropped, never retried forever.
* :meth:`Outbox.flush` with a deadline (the end of the search) waits for the server to come back.
* An error that looks like an outage while the store answers (``probe`` succeeds), and recurs on one retry, is
  deterministic: the write is logged, skipped (``Outbox.skipped``, reported at the end) and the queue moves on,
  instead of blocking every write behind it until the final flush gives up.
* :class:`Journal`: with one, every queued write is also an append-only JSON line on disk (fsync'd before the
  write is tried), and a ``{"done": seq}`` line follows once it landed or was skipped. A process killed with
  writes still queued (SIGKILL during an outage) leaves them in the journal; ``--resume`` replays the lines
  without a ``done`` (:meth:`Journal.pending`), in order, before anything new.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

logger = logging.getLogger(__name__)

HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
#: MLflow error codes that mean "the store answered and refused": retrying cannot help.
REFUSED = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS", "BAD_REQUEST",
           "INVALID_STATE", "PERMISSION_DENIED", "UNAUTHENTICATED"}


def bound_http_requests() -> None:
    """Bounded MLflow HTTP retries for this process (read by MLflow at every request; user values win)."""
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)


def is_outage(exc: BaseException) -> bool:
    """True when ``exc`` says the store could not be reached (retry later), False when it refused the write."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return exc.error_code not in REFUSED
    module = type(exc).__module__ or ""
    return isinstance(exc, (OSError, TimeoutError)) or module.startswith(("requests", "urllib3", "sqlalchemy"))


class Journal:
    """Append-only JSON lines of queued writes: ``{"seq": n, ...record}``, then ``{"done": n}`` once handled."""

    def __init__(self, path: str | Path, *, replay: bool):
        """Open ``path``; without ``replay`` an earlier journal there is set aside (``.old``), not replayed."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not replay and self.path.exists():
            self.path.replace(self.path.with_name(self.path.name + ".old"))
        self.seq = max((r.get("seq", r.get("done", 0)) for r in self._lines()), default=0)

    def _lines(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # the last line, cut by a kill mid-write: that write never ran
                continue
        return out

    def pending(self) -> list[dict[str, Any]]:
        """The records whose write has neither landed nor been skipped, in order."""
        lines = self._lines()
        done = {r["done"] for r in lines if "done" in r}
        return [r for r in lines if "seq" in r and r["seq"] not in done]

    def _append(self, line: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(line, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def append(self, record: dict[str, Any]) -> int:
        self.seq += 1
        self._append({"seq": self.seq, **record})
        return self.seq

    def done(self, seq: int, skipped: str | None = None) -> None:
        self._append({"done": seq, **({"skipped": skipped} if skipped else {})})


class Outbox:
    """An ordered queue of MLflow writes (callables), flushed while the store is reachable.

    ``probe`` (a cheap read of the store) tells an outage from a deterministic error; ``journal`` keeps the queue
    on disk (see the module doc)."""

    def __init__(self, retry_s: float = 10.0, *, probe: Callable[[], Any] | None = None,
                 journal: Journal | None = None):
        self.retry_s = retry_s
        self.pending: collections.deque[tuple[str, Callable[[], None]]] = collections.deque()
        self._seq_of: dict[int, int] = {}  # id(write) -> its journal line
        self.offline_until = 0.0
        self.outage_started: float | None = None
        self.dropped = 0
        self.skipped: list[tuple[str, str]] = []  # (what, error) of every write given up, for the end report
        self.probe, self.journal = probe, journal
        self._head_failures = 0

    def put(self, what: str, write: Callable[[], None], record: dict[str, Any] | None = None,
            seq: int | None = None) -> None:
        """Queue ``write`` (described by ``what``) and flush what the store takes now; never raises.

        ``record``: the write as data, journalled before it is tried (``seq``: a replayed journal line's)."""
        if seq is None and record is not None and self.journal is not None:
            seq = self.journal.append({"what": what, **record})
        self.pending.append((what, write))
        if seq is not None:
            self._seq_of[id(write)] = seq
        self.flush()

    def flush(self, deadline_s: float | None = None) -> bool:
        """Run the queued writes in order; True when none is left. Without ``deadline_s`` an unreachable store
        ends the attempt at once; with it, retry every ``retry_s`` for up to ``deadline_s`` seconds."""
        end = None if deadline_s is None else time.monotonic() + deadline_s
        while self.pending:
            now = time.monotonic()
            if now < self.offline_until:
                if end is None or now >= end:
                    return False
                time.sleep(max(0.0, min(self.offline_until, end) - now))
                continue
            what, write = self.pending[0]
            try:
                write()
            except Exception as exc:  # noqa: BLE001 - the search must never die of its tracking
                if is_outage(exc) and not self._recurs(exc):
                    continue
                logger.exception("MLflow refused %s; skipped (reported at the end)", what)
                self.dropped += 1
                self._pop(skipped=f"{type(exc).__name__}: {_first_line(exc)}")
                continue
            self._pop()
        if self.outage_started is not None:
            logger.warning("MLflow is reachable again after %.0f s; buffered writes flushed",
                           time.monotonic() - self.outage_started)
            self.outage_started = None
        return True

    def _recurs(self, exc: BaseException) -> bool:
        """After an outage-like error at the head: True when the store answers and the write has now failed twice
        (deterministic: skip it); else False, the head is retried (at once, or once the store is back)."""
        reachable = False
        if self.probe is not None:
            try:
                self.probe()
                reachable = True
            except Exception:  # noqa: BLE001 - unreachable: an outage
                pass
        if not reachable:
            self._offline(self.pending[0][0], exc)
            return False
        self._head_failures += 1
        return self._head_failures >= 2

    def _pop(self, skipped: str | None = None) -> None:
        what, write = self.pending.popleft()
        seq = self._seq_of.pop(id(write), None)
        self._head_failures = 0
        if skipped:
            self.skipped.append((what, skipped))
        if seq is not None and self.journal is not None:
            self.journal.done(seq, skipped)

    def _offline(self, what: str, exc: BaseException) -> None:
        if self.outage_started is None:
            self.outage_started = time.monotonic()
            first = _first_line(exc)
            logger.warning("MLflow unreachable (%s: %s); buffering writes (%d queued), retrying every %.0f s",
                           what, first, len(self.pending), self.retry_s)
        self.offline_until = time.monotonic() + self.retry_s


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
