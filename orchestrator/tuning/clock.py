"""How long a study or a search ran: each launch's running time, kept on the storage while it runs.

A run killed with SIGKILL writes nothing at the end, so each process records its launch when it starts and then
refreshes ``alive`` every ``interval_s`` seconds from a daemon thread (``<storage>/<name>/study_clock.json``, or
``search_clock.json``)::

    {"launches": [{"start": unix, "alive": unix, "command": ...}, ...]}

Running time = Σ (alive − start) over the launches, within ``interval_s`` per killed launch; the span from the
first launch to the last sign of life is reported beside it (``elapsed_s``), so the time a run lay stopped
between two sessions is visible as their difference.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from orchestrator.cluster import storage


class RunClock:
    """Start with :meth:`start` (records this launch, then refreshes it); read with :meth:`summary` (also without
    starting: a report rebuilt after the run)."""

    def __init__(self, storage_path: str, name: str, *, interval_s: float = 30.0, filename: str = "study_clock.json"):
        self.path = storage.join(storage_path, name, filename)
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._index: int | None = None

    def _read(self) -> dict[str, Any]:
        text = storage.read_text(self.path)
        return json.loads(text) if text else {"launches": []}

    def _touch(self) -> None:
        with self._lock:
            record = self._read()
            record["launches"][self._index]["alive"] = time.time()
            storage.write_text(self.path, json.dumps(record))

    def start(self, command: str, *, resume: bool, code: dict[str, Any] | None = None) -> "RunClock":
        """Record this launch (``code``: e.g. the checkout's commit and dirtiness, kept with it: a run resumed
        after a commit trains its later trials on the later code)."""
        with self._lock:
            record = self._read() if resume else {"launches": []}
            now = time.time()
            record["launches"].append({"start": now, "alive": now, "command": command, **(code or {})})
            self._index = len(record["launches"]) - 1
            storage.write_text(self.path, json.dumps(record))
        threading.Thread(target=self._beat, name="study-clock", daemon=True).start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._touch()
            except OSError:   # a storage hiccup costs one beat, never the study
                pass

    def summary(self) -> dict[str, Any]:
        """``running_s`` (Σ alive − start), ``elapsed_s`` (first start to the last alive: now while running) and
        the launches."""
        if self._index is not None:
            self._touch()
        launches = self._read()["launches"]
        if not launches:
            return {"running_s": 0.0, "elapsed_s": 0.0, "launches": []}
        return {"running_s": round(sum(x["alive"] - x["start"] for x in launches), 1),
                "elapsed_s": round(max(x["alive"] for x in launches) - launches[0]["start"], 1),
                "launches": [{"start": x["start"], "running_s": round(x["alive"] - x["start"], 1),
                              **{k: v for k, v in x.items() if k not in ("start", "alive")}} for x in launches]}
