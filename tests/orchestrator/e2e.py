"""Shared pieces of the end-to-end tests: the subprocess environment, the MLflow client of a test's store, a real
``mlflow server`` on 127.0.0.1 and the MLflow UI read in headless Chromium."""

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


def store_ready(log: Path) -> bool:
    """Whether a search or study writing to `log` has set up its SQLite MLflow store (it logs its parent run's id
    once it has). A test that opens the store before then runs MLflow's table creation concurrently with the
    command's own, and the loser of that race fails."""
    return log.is_file() and "MLflow parent run" in log.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_mlflow_server(folder: Path, port: int, log_name: str) -> subprocess.Popen:
    """``mlflow server`` on 127.0.0.1:port over folder/mlflow.db (artifacts served from folder/mlartifacts)."""
    log = (folder / log_name).open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
         "--artifacts-destination", str(folder / "mlartifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], cwd=folder, env=dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true"), stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True)
    end = time.time() + 120
    while time.time() < end:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                if resp.status == 200:
                    return proc
        except OSError:
            pass
        if proc.poll() is not None:
            raise AssertionError(f"mlflow server exited ({proc.returncode}): {(folder / log_name).read_text()[-2000:]}")
        time.sleep(1)
    stop(proc)  # its worker processes too: a server left starting keeps loading the machine after the test
    raise AssertionError("mlflow server did not come up in 120 s")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group, SIGKILL it after 30 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def ui_run_names(tmp_path: Path, url: str, parent_name: str) -> list[str]:
    """Run names the MLflow UI lists at ``url`` (served by a real ``mlflow server`` on the test's store), read from
    the page rendered in headless Chromium after expanding the parent run's row: [parent, children...]."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no Chromium: .ci/run installs Debian's chromium package (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    port = free_port()
    server = start_mlflow_server(tmp_path, port, "mlflow-server.log")
    try:
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
        stop(server)
