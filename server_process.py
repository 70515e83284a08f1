"""The local model server: `python -m omni_server` as a child process, its URL, its readiness, its end.

Beside backend.py, which watches it (and restarts it through `replace`) while the app runs.
"""

from __future__ import annotations

import atexit
import collections
import logging
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from omni_client import ReplyError, fetch_health
from omni_server.protocol import LISTENING_PREFIX, Health, HealthStatus

log = logging.getLogger(__name__)


class LaunchError(Exception):
    """The local model server could not be started or could not load; `message` is a plain sentence."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class LocalServer:
    """`python -m omni_server` as a child process on 127.0.0.1 and a free port, stopped when we exit.

    The child learns of our death even on SIGKILL: it stops when its stdin (a pipe from us) closes.
    """

    def __init__(
        self,
        *,
        engine: str = "auto",
        checkpoint_dir: Path | None = None,
        device: str | None = None,
        python: str = sys.executable,
        start_timeout_s: float = 30.0,
    ) -> None:
        self._command = [
            python,
            "-m",
            "omni_server",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--engine",
            engine,
            "--stop-on-stdin-close",
        ]
        if checkpoint_dir is not None:
            self._command += ["--checkpoint-dir", str(checkpoint_dir)]
        if device is not None:
            self._command += ["--device", device]
        self._start_timeout_s = start_timeout_s
        self._process: subprocess.Popen[bytes] | None = None
        self._url: str | None = None
        self._log: collections.deque[str] = collections.deque(maxlen=40)
        self._lock = threading.Lock()
        self._poll_lock = threading.Lock()
        self.restarts = 0

    @property
    def url(self) -> str:
        """The base URL of the running child (changes after a restart)."""
        if self._url is None:
            raise LaunchError("The local model server has not been started.")
        return self._url

    @property
    def running(self) -> bool:
        process = self._process
        if process is None:
            return False
        # One poll at a time: Popen.poll() answers None ("running") while another thread polls the same child,
        # so a turn could be sent to a server that had died.
        with self._poll_lock:
            return process.poll() is None

    def start(self) -> str:
        """Launch the child and wait until it has bound its port (not until the model is loaded)."""
        return self.ensure_running()

    def ensure_running(self) -> str:
        """Launch the child, or restart it if it died (the URL changes); returns the current URL."""
        with self._lock:
            if self.running:
                return self.url
            if self._process is not None:
                log.warning("local model server exited (code %s); restarting", self._process.returncode)
                self.restarts += 1
            self._launch()
            return self.url

    def wait_ready(self, on_progress: Callable[[str], None] | None = None, timeout_s: float = 900.0) -> Health:
        """Poll /health until ready, calling `on_progress(sentence)` whenever the loading step changes."""
        deadline = time.monotonic() + timeout_s
        said = ""
        while True:
            if not self.running:
                raise LaunchError(self._exit_sentence())
            try:
                health = fetch_health(self.url, timeout_s=2.0)
            except ReplyError:
                health = Health(HealthStatus.LOADING, "", "starting")
            if health.status is HealthStatus.READY:
                return health
            if health.status is HealthStatus.ERROR:
                raise LaunchError(f"The model server could not load its model: {health.detail}")
            sentence = (
                f"Starting the model server ({health.engine}: {health.detail})"
                if health.engine
                else "Starting the model server"
            )
            if on_progress is not None and sentence != said:
                on_progress(sentence)
            said = sentence
            if time.monotonic() > deadline:
                raise LaunchError(f"The model server was not ready after {timeout_s:g} s ({health.detail}).")
            time.sleep(0.2)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def replace(self) -> None:
        """Kill a child that stopped answering (frozen, not dead: SIGTERM would wait behind its stop); the next
        `ensure_running` launches a new one."""
        with self._lock:
            process = self._process
            if process is None or process.poll() is not None:
                return
            log.warning("local model server %d stopped answering; replacing it", process.pid)
            process.kill()
            process.wait(timeout=5.0)

    def stop(self, timeout_s: float = 5.0) -> None:
        with self._lock:
            process, self._process = self._process, None
            self._url = None
        atexit.unregister(self.stop)
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout_s)

    def __enter__(self) -> LocalServer:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def _launch(self) -> None:
        self._log.clear()
        process = subprocess.Popen(
            self._command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parent,
        )
        self._process = process
        atexit.register(self.stop)
        bound: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._drain, args=(process, bound), name="omni-server-log", daemon=True).start()
        try:
            self._url = bound.get(timeout=self._start_timeout_s)
        except queue.Empty:
            pass
        if not self._url or process.poll() is not None:
            self._url = None
            process.kill()
            process.wait()
            raise LaunchError(self._exit_sentence())
        log.info("local model server at %s (pid %d)", self._url, process.pid)

    def _drain(self, process: subprocess.Popen[bytes], bound: queue.Queue[str]) -> None:
        """Forward the child's output to our log, keep its tail for error messages, and spot its URL."""
        assert process.stdout is not None
        for raw in process.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            self._log.append(line)
            if line.startswith(LISTENING_PREFIX):
                bound.put(line[len(LISTENING_PREFIX) :].strip())
            log.info("[omni_server] %s", line)
        bound.put("")

    def _exit_sentence(self) -> str:
        last = next((line for line in reversed(self._log) if line.strip()), "")
        because = f" Its last words: {last}" if last else ""
        return f"The local model server stopped.{because}"
