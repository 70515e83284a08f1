"""Real HTTP servers on 127.0.0.1 for tests: our FastAPI app under uvicorn, in a background thread."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import uvicorn

from omni_server.echo import EchoEngine
from omni_server.engine import Engine
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
