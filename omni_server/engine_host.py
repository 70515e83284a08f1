"""The engine's life in the server: load in a background thread, report progress, then serve.

The HTTP server binds at once and answers /health from here while weights load; /chat asks `ready_engine`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from omni_server.engine import Engine, LoadReport
from omni_server.protocol import Health, HealthStatus

log = logging.getLogger(__name__)

Loader = Callable[[LoadReport], tuple[Engine, str]]
"""Loads an engine, calling `report(engine_name, detail)` on the way; returns it and a sentence about it."""


class EngineHost:
    def __init__(self, loader: Loader, engine_name: str) -> None:
        self._loader = loader
        self._lock = threading.Lock()
        self._health = Health(HealthStatus.LOADING, engine_name, "starting")
        self._engine: Engine | None = None

    def start_loading(self) -> threading.Thread:
        thread = threading.Thread(target=self._load, name="engine-loader", daemon=True)
        thread.start()
        return thread

    @property
    def health(self) -> Health:
        with self._lock:
            return self._health

    @property
    def max_batch(self) -> int:
        """Replies served at once: the engine's own figure once it is loaded, 1 until then."""
        engine = self.ready_engine
        return engine.max_batch if engine is not None else 1

    @property
    def ready_engine(self) -> Engine | None:
        with self._lock:
            return self._engine

    def _load(self) -> None:
        try:
            engine, note = self._loader(self._report_progress)
        except Exception as error:  # any failure is shown in /health rather than killing the server
            log.exception("engine failed to load")
            self._set(Health(HealthStatus.ERROR, self.health.engine, f"failed to load: {error}"), None)
            return
        log.info("engine ready: %s", note)
        self._set(Health(HealthStatus.READY, engine.name, note), engine)

    def _report_progress(self, engine_name: str, detail: str) -> None:
        log.info("%s: %s", engine_name, detail)
        self._set(Health(HealthStatus.LOADING, engine_name, detail), None)

    def _set(self, health: Health, engine: Engine | None) -> None:
        with self._lock:
            self._health = health
            self._engine = engine
