"""Real HTTP servers on 127.0.0.1 for tests: our FastAPI app under uvicorn, in a background thread; and a
scripted engine to serve."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import uvicorn

from omni_server.echo import EchoEngine
from omni_server.engine import AudioPiece, ChatRequest, Engine, ProgressCallback, RequestRejected, TextPiece
from omni_server.engine_host import EngineHost
from omni_server.http_app import create_app


@contextmanager
def serving_app(app: object) -> Iterator[str]:
    """Run an ASGI app on a free 127.0.0.1 port for the duration of the block; yields its base URL."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=5)
        listener.close()


def ready_host(engine: Engine, note: str = "test engine") -> EngineHost:
    """An EngineHost whose engine is ready once `start_loading` has run."""
    host = EngineHost(lambda report: (engine, note), engine.name)
    host.start_loading().join(timeout=5)
    return host


@contextmanager
def serving_engine(engine: Engine) -> Iterator[str]:
    with serving_app(create_app(ready_host(engine))) as url:
        yield url


@contextmanager
def serving_while_loading(progress: str, note: str = "echo") -> Iterator[tuple[str, threading.Event]]:
    """Our server whose mini-omni engine is loading, reporting `progress`, until the test sets the yielded event;
    then the echo engine becomes ready (with `note` as its health detail). Yields (URL, event)."""
    release = threading.Event()

    def loader(report):
        report("mini-omni", progress)
        release.wait(timeout=10)
        return EchoEngine(), note

    host = EngineHost(loader, "mini-omni")
    with serving_app(create_app(host)) as url:
        host.start_loading()
        wait_for(lambda: host.health.detail == progress, what="loading progress")
        try:
            yield url, release
        finally:
            release.set()


def wait_for(condition: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


PIECE = b"\x01\x00" * 2048  # 85 ms of PCM


def tone(seconds: float, rate: int = 16_000) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


class ScriptedEngine:
    """Yields `pieces` audio pieces `delay` apart, then optionally raises; records each request's max_tokens."""

    name = "scripted"

    def __init__(
        self,
        pieces: int = 2,
        delay: float = 0.0,
        fail_after: int | None = None,
        text: str = "",
        gate: threading.Event | None = None,
        piece: bytes = PIECE,
        max_batch: int = 1,
    ) -> None:
        self.max_batch = max_batch
        self.pieces, self.delay, self.fail_after, self.text, self.gate = pieces, delay, fail_after, text, gate
        self.piece = piece
        self.served: list[int] = []
        self.stopped_early = threading.Event()

    def load(self, progress: ProgressCallback) -> None:
        pass

    def check(self, request: ChatRequest) -> None:
        if request.max_tokens == 13:
            raise RequestRejected("Thirteen tokens is unlucky.")

    def generate(self, request: ChatRequest) -> Iterator[AudioPiece | TextPiece]:
        self.served.append(request.max_tokens)
        if self.gate is not None:
            self.gate.wait(timeout=10)
        if self.text:
            yield TextPiece(self.text)
        completed = False
        try:
            for index in range(self.pieces):
                if self.fail_after is not None and index == self.fail_after:
                    raise RuntimeError("the decoder met a special token")
                time.sleep(self.delay)
                yield AudioPiece(self.piece)
            completed = True
        finally:
            if not completed:
                self.stopped_early.set()
