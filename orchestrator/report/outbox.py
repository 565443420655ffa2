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
"""

from __future__ import annotations

import collections
import logging
import os
import time
from typing import Callable

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


class Outbox:
    """An ordered queue of MLflow writes (callables), flushed while the store is reachable."""

    def __init__(self, retry_s: float = 10.0):
        self.retry_s = retry_s
        self.pending: collections.deque[tuple[str, Callable[[], None]]] = collections.deque()
        self.offline_until = 0.0
        self.outage_started: float | None = None
        self.dropped = 0

    def put(self, what: str, write: Callable[[], None]) -> None:
        """Queue ``write`` (described by ``what``) and flush what the store takes now; never raises."""
        self.pending.append((what, write))
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
                if is_outage(exc):
                    self._offline(what, exc)
                    continue
                logger.exception("MLflow refused %s; dropped", what)
                self.dropped += 1
            self.pending.popleft()
        if self.outage_started is not None:
            logger.warning("MLflow is reachable again after %.0f s; buffered writes flushed",
                           time.monotonic() - self.outage_started)
            self.outage_started = None
        return True

    def _offline(self, what: str, exc: BaseException) -> None:
        if self.outage_started is None:
            self.outage_started = time.monotonic()
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            logger.warning("MLflow unreachable (%s: %s); buffering writes (%d queued), retrying every %.0f s",
                           what, first, len(self.pending), self.retry_s)
        self.offline_until = time.monotonic() + self.retry_s
