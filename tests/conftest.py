"""Shared fixtures: the team's reference material in ../shared (found or skipped), the end-of-turn model, an echo
server, a private PulseAudio, and a loopback-only guard; and the `golden` marker."""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from turn_weights import DOWNLOAD_VARIABLE

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DIR = REPO_ROOT.parent / "shared"
# Tests never download: the end-of-turn model is used where it was fetched at install (.ci/run does), and the
# apps and benchmarks the tests start inherit this.
os.environ[DOWNLOAD_VARIABLE] = "0"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that reads the reference's recorded outputs (through `shared_dir`) is a `golden` test."""
    for item in items:
        if "shared_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.golden)


@pytest.fixture(scope="session")
def turn_model():
    """The real end-of-turn model (Smart Turn v3.2), loaded once; skipped where its weights were not fetched
    (`python turn_weights.py`)."""
    from end_of_turn import SharedTurnModel

    model = SharedTurnModel().load_now()
    if model.problem:
        pytest.skip(model.problem)
    return model


@pytest.fixture(scope="module")
def echo_url() -> Iterator[str]:
    """Our server with the echo engine, paced in real time like the model, on 127.0.0.1."""
    from omni_server.echo import EchoEngine
    from tests.servers import serving_engine

    with serving_engine(EchoEngine(thinking_s=0.05, realtime=True)) as url:
        yield url


@pytest.fixture(scope="session")
def pulse() -> Iterator[object]:
    """A private PulseAudio whose null sink the browser tests play into and record from."""
    from tests.sound_capture import private_pulse

    with private_pulse() as running:
        yield running


@pytest.fixture(scope="session")
def chirp() -> np.ndarray:
    """A 1.7 s warbling chirp: synthetic, so a tiny recipe model's token streams are the same on every machine."""
    from tests.mini_omni_helpers import chirp_audio

    return chirp_audio()


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared beside the repo; tests that need it skip where it is absent (users do not have it)."""
    if not SHARED_DIR.is_dir():
        pytest.skip("../shared is not present")
    return SHARED_DIR


@pytest.fixture
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any connection a test (Gradio, gradio_client, the app) tries beyond this machine; used by the
    modules that drive the app in-process (`pytestmark = pytest.mark.usefixtures("loopback_only")`)."""
    connect = socket.socket.connect

    def checked(sock: socket.socket, address: object) -> object:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            host = address[0]  # type: ignore[index]
            assert ipaddress.ip_address(host).is_loopback, f"tried to reach {address}"
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", checked)
