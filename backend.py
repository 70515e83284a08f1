"""The model server the app talks to: one it launched itself, or an existing one given by URL.

A launched server is started in the background (the page opens at once and its status line shows the
loading progress), restarted if its process dies, and stopped when the app exits. Either way `status_line`
says which engine answers, so an echo fallback is never silent.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

import omni_client
from omni_server.protocol import Health, HealthStatus
from server_process import LaunchError, LocalServer

WATCH_INTERVAL_S = 2.0  # how often a launched server is checked (and restarted if it died)
# A launched server that misses this many health checks in a row (each waits 3 s) is frozen, not busy: ours
# answers /health while it streams a reply. It is killed and replaced, about 10 s after it froze.
HUNG_AFTER_MISSED_CHECKS = 2
READY_TIMEOUT_S = 3600.0  # a first download of the real model can take long; the status line shows progress


class Backend:
    def __init__(self, *, server_url: str | None, engine: str = "auto", checkpoint_dir: Path | None = None) -> None:
        self._external_url = server_url.rstrip("/") if server_url else None
        self._local = None if self._external_url else LocalServer(engine=engine, checkpoint_dir=checkpoint_dir)
        self._lock = threading.Lock()
        self._health = Health(HealthStatus.LOADING, "", "starting")
        self._progress = "Starting the model server"
        self._closed = threading.Event()
        self._watcher: threading.Thread | None = None
        self._missed_checks = 0
        self._restarts_seen = 0  # the launched server's restarts the watcher has seen, to let a new one start
        self._replies_in_flight = 0  # an external server may be single-threaded: busy with them, it cannot answer

    # -- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> None:
        """Launch (or look at) the server in the background; safe to call more than once."""
        with self._lock:
            if self._watcher is not None:
                return
            self._watcher = threading.Thread(target=self._watch, name="model-server-watch", daemon=True)
            self._watcher.start()

    def close(self) -> None:
        self._closed.set()
        if self._local is not None:
            self._local.stop()

    def _watch(self) -> None:
        while not self._closed.is_set():
            if self._local is not None:
                self._keep_local_server_up(self._local)
            else:
                self._check_health()
            self._closed.wait(WATCH_INTERVAL_S)

    def _keep_local_server_up(self, local: LocalServer) -> None:
        try:
            local.ensure_running()
            if local.restarts != self._restarts_seen:  # a new process (restarted here or by a turn): let it start
                self._restarts_seen = local.restarts
                self._health = Health(HealthStatus.LOADING, self._health.engine, "restarting")
            if self._health.status is not HealthStatus.READY:
                self._health = local.wait_ready(on_progress=self._show_progress, timeout_s=READY_TIMEOUT_S)
                self._missed_checks = 0
                return
            try:
                self._health = omni_client.fetch_health(local.url)
                self._missed_checks = 0
            except omni_client.ReplyError:
                self._missed_checks += 1
                if self._missed_checks >= HUNG_AFTER_MISSED_CHECKS:
                    self._show_progress("The model server stopped answering; starting a new one")
                    self._health = Health(HealthStatus.LOADING, self._health.engine, "restarting")
                    local.replace()
        except (LaunchError, omni_client.ReplyError) as error:
            if not self._closed.is_set():
                self._show_error(error.message)

    def _check_health(self) -> None:
        try:
            self._health = omni_client.fetch_health(self.url)
        except omni_client.ReplyError as error:
            if self._replies_in_flight == 0:  # else it is busy answering us (the original server is single-threaded)
                self._show_error(error.message)

    @contextlib.contextmanager
    def answering(self) -> Iterator[None]:
        """Around each reply request: while one streams, an external server's silence is not a problem."""
        with self._lock:
            self._replies_in_flight += 1
        try:
            yield
        finally:
            with self._lock:
                self._replies_in_flight -= 1

    def _show_error(self, sentence: str) -> None:
        """Keep the engine's name, so the status line still says which server has the problem."""
        self._health = Health(HealthStatus.ERROR, self._health.engine, sentence)

    def _show_progress(self, sentence: str) -> None:
        self._progress = sentence

    # -- what the app asks -------------------------------------------------------------------------------

    @property
    def server_pid(self) -> int | None:
        """The launched server's process (None for an external one)."""
        return self._local.pid if self._local is not None else None

    @property
    def url(self) -> str:
        if self._external_url is not None:
            return self._external_url
        assert self._local is not None
        return self._local.url

    @property
    def engine(self) -> str:
        """ "mini-omni", "echo", or "" while unknown."""
        return self._health.engine

    @property
    def description(self) -> str:
        """Which engine answers, and where: "echo engine, local server"."""
        where = f"server at {self._external_url}" if self._external_url else "local server"
        engine = self._health.engine
        return f"{engine} engine, {where}" if engine else where

    @property
    def ready(self) -> bool:
        """Whether turns can be sent. A server without /health (the original mini-omni) counts as ready: only a
        turn can tell more about it."""
        return self._health.status in (HealthStatus.READY, HealthStatus.UNKNOWN)

    def status_line(self) -> str:
        health = self._health
        if health.status is HealthStatus.READY:
            return f"Model server ready: {self.description}" + (f" ({health.detail})" if health.detail else "")
        if health.status is HealthStatus.UNKNOWN:
            return f"Using the model server at {self._external_url}: {health.detail}"
        if health.status is HealthStatus.ERROR:
            return f"The model server has a problem: {health.detail}"
        return f"{self._progress}…"

    def url_for_request(self) -> str:
        """The URL to send a turn to; a launched server that died is restarted first."""
        if self._local is not None:
            try:
                return self._local.ensure_running()
            except LaunchError as error:
                raise omni_client.ReplyError(omni_client.FailureKind.UNREACHABLE, error.message) from error
        return self.url
