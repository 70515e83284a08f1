"""Shared fixtures: the team's reference material in ../shared (found or skipped), and a loopback-only guard."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DIR = REPO_ROOT.parent / "shared"


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
