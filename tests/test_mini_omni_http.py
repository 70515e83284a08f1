"""The clean-room mini-omni engine behind the real HTTP server, as the app reaches it.

Always: `python -m omni_server --engine auto` on a tiny recipe checkpoint picks mini-omni (not echo), and the
app's own client gets audio and text from it over real HTTP. With ../shared: golden case A's byte counts over
HTTP (docs/mini-omni.md §15, docs/protocol.md §10) in reference mode, and the tail the default mode adds behind
the same protocol.
"""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest
import requests

import omni_client
from omni_client import ReplyAudio, ReplyText
from omni_server.mini_omni.config import GPTConfig
from omni_server.mini_omni.engine import MiniOmniEngine
from omni_server.protocol import HealthStatus
from server_process import LocalServer
from tests import mini_omni_helpers as helpers
from tests.mini_omni_helpers import GOLDEN, TINY, chirp_audio, write_tiny_checkpoint
from tests.servers import serving_engine

one_torch_thread = pytest.fixture(scope="module", autouse=True)(helpers.one_torch_thread)

TIMEOUT_S = 60


def post_chat(url: str, audio_file: bytes, **fields: object) -> requests.Response:
    payload = {"audio": base64.b64encode(audio_file).decode("ascii"), **fields}
    return requests.post(f"{url}/chat", json=payload, timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def launched_server(tmp_path_factory: pytest.TempPathFactory) -> str:
    checkpoint_dir = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-checkpoint"), TINY)
    with LocalServer(engine="auto", checkpoint_dir=checkpoint_dir, device="cpu") as server:
        server.start()
        server.wait_ready(timeout_s=180)
        yield server.url


@pytest.mark.slow
def test_auto_picks_mini_omni_when_a_checkpoint_is_present(launched_server: str) -> None:
    health = omni_client.fetch_health(launched_server)
    assert health.status is HealthStatus.READY
    assert health.engine == "mini-omni", health


@pytest.mark.slow
def test_the_app_client_gets_audio_and_text_from_the_model(launched_server: str) -> None:
    wav = omni_client.utterance_wav(chirp_audio())
    events = list(omni_client.stream_reply(launched_server, wav, stall_timeout_s=TIMEOUT_S))
    pcm = b"".join(event.pcm for event in events if isinstance(event, ReplyAudio))
    text = "".join(event.text for event in events if isinstance(event, ReplyText))
    assert len(pcm) > 0 and len(pcm) % 2 == 0
    assert text.strip()

    # The raw (mini-omni v1) answer to the same audio is the same PCM: noise is seeded per request's audio.
    raw = post_chat(launched_server, wav)
    assert raw.status_code == 200
    assert raw.content == pcm


@pytest.mark.slow
def test_max_tokens_that_leave_no_room_are_refused_before_any_audio(launched_server: str) -> None:
    wav = omni_client.utterance_wav(chirp_audio())
    response = post_chat(launched_server, wav, max_tokens=5)
    assert 400 <= response.status_code < 500
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["error"]


# ------------------------------------------------------------------------------------ golden case A


@pytest.fixture(scope="module")
def golden_checkpoint(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = GPTConfig.from_yaml(shared_dir / GOLDEN / "golden_A_model_config.yaml")
    return write_tiny_checkpoint(tmp_path_factory.mktemp("golden-a"), config)


def serve_golden(checkpoint_dir: Path, mode: str):
    engine = MiniOmniEngine(checkpoint_dir, device="cpu", mode=mode)
    engine.load(lambda _detail: None)
    return serving_engine(engine)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fields", "expected_bytes"),
    [({}, 147_456), ({"stream_stride": 5}, 143_360), ({"max_tokens": 120}, 49_152)],
)
def test_reference_mode_answers_golden_a_with_the_reference_byte_counts(
    shared_dir: Path, golden_checkpoint: Path, fields: dict, expected_bytes: int
) -> None:
    output1 = (shared_dir / GOLDEN / "output1.wav").read_bytes()
    with serve_golden(golden_checkpoint, "reference") as url:
        response = post_chat(url, output1, **fields)
    assert response.status_code == 200
    assert response.headers["content-type"] == "audio/wav"
    assert len(response.content) == expected_bytes


@pytest.mark.slow
def test_default_mode_sends_the_tail_the_reference_drops(shared_dir: Path, golden_checkpoint: Path) -> None:
    """Stride 5: the reference drops the 36th frame (143,360 bytes); the default mode sends all 36."""
    output1 = (shared_dir / GOLDEN / "output1.wav").read_bytes()
    with serve_golden(golden_checkpoint, "default") as url:
        response = post_chat(url, output1, stream_stride=5)
    assert response.status_code == 200
    samples = np.frombuffer(response.content, dtype="<i2")
    assert len(samples) == 36 * 2048
