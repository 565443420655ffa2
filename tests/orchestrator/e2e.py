"""Shared pieces of the end-to-end tests: the subprocess environment and the MLflow client of a test's store."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


def subprocess_env(shared_data_dir: Path) -> dict[str, str]:
    """This environment for a ``python -m orchestrator.*`` subprocess: offline, local Ray, the test's own MLflow."""
    env = dict(os.environ, MALORA_DATA_DIR=str(shared_data_dir), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               MLFLOW_DISABLE_TELEMETRY="true", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def mlflow_client(tmp_path: Path):
    """A client of the SQLite store the commands create in their working directory ``tmp_path``."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")


def ui_run_names(tmp_path: Path, url: str, parent_name: str) -> list[str]:
    """Run names the MLflow UI lists at ``url`` (served by a real ``mlflow server`` on the test's store), read from
    the page rendered in headless Chromium after expanding the parent run's row: [parent, children...]."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no Chromium: .ci/run installs Debian's chromium package (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (tmp_path / "mlflow-server.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                               f"sqlite:///{tmp_path / 'mlflow.db'}", "--host", "127.0.0.1", "--port", str(port)],
                              cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)  # its own group: the server's workers stop with it
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, (
                    "mlflow server did not come up: " + (tmp_path / "mlflow-server.log").read_text()[-2000:])
                time.sleep(0.5)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
            page = browser.new_page()
            page.goto(url.replace("127.0.0.1:5000", f"127.0.0.1:{port}"))
            page.get_by_text(parent_name, exact=True).wait_for(timeout=90_000)
            page.locator('button[data-component-id*="runnamecellrenderer"]').first.click()  # expand its children
            page.wait_for_function("document.querySelectorAll('a[href*=\"/runs/\"]').length > 1", timeout=60_000)
            time.sleep(1.0)  # let the expanded rows finish rendering
            names = page.locator('a[href*="/runs/"]').all_inner_texts()
            browser.close()
        return [n.strip() for n in names]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
