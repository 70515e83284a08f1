"""The live audio channel: its wire format (live_protocol), the tokens that bind a socket to one tab
(live_route.LiveTokens), and the real `/live` route of `app.create_app` over loopback WebSockets, talking to
our echo server over real HTTP. The client is the `websockets` package's, doing what the page's live.js does.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

import app
import live_protocol as wire
from app import Handlers, Session
from audio_files import TurnFiles
from backend import Backend
from live_route import LiveTokens
from omni_client import fetch_health
from omni_server.protocol import OUTPUT_SAMPLE_RATE
from state import Conversation, Phase
from tests.servers import serving_app, wait_for
from tests.speech import espeak_available, join, silence, speak, to_int16

WAIT_S = 10.0  # for any one message; the echo replies here last ~1.5 s of real time

needs_espeak = pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed")

pytestmark = pytest.mark.usefixtures("loopback_only")  # these tests talk to 127.0.0.1 only


# --- the wire format ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"type": "hello", "token": "abc"}', wire.Hello("abc")),
        ('{"type": "sounding", "turn": 3, "after_s": 0.25}', wire.Sounding(3, 0.25)),
        ('{"type": "sounding", "turn": 1, "after_s": 0}', wire.Sounding(1, 0.0)),
        ('{"type": "played", "turn": 2, "samples": 0, "complete": false}', wire.Played(2, 0, False)),
        ('{"type": "played", "turn": 2, "samples": 48000, "complete": true}', wire.Played(2, 48_000, True)),
        ('{"type": "stop"}', wire.Stop()),
        ('{"type": "stop", "why": "a field the page may add"}', wire.Stop()),
    ],
)
def test_every_client_message_is_parsed(text: str, message: wire.ClientMessage) -> None:
    parsed = wire.parse_client_message(text)
    assert parsed == message and type(parsed) is type(message)
    if isinstance(parsed, wire.Sounding):
        assert isinstance(parsed.after_s, float)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("hello", "not JSON"),
        ('{"type": "hello"', "not JSON"),
        ("[" * 100_000, "not JSON"),  # deeper than the parser recurses
        ('["hello", "abc"]', "not a JSON object"),
        ('"stop"', "not a JSON object"),
        ("null", "not a JSON object"),
        ('{"type": "dance"}', "Unknown message type 'dance'"),
        ("{}", "Unknown message type None"),
        ('{"type": "hello"}', "'hello' needs 'token'"),
        ('{"type": "hello", "token": 5}', "'hello' needs 'token'"),
        ('{"type": "sounding", "turn": 1}', "'sounding' needs 'after_s'"),
        ('{"type": "sounding", "turn": 1, "after_s": "0.5"}', "'sounding' needs 'after_s'"),
        ('{"type": "sounding", "turn": 1, "after_s": true}', "'sounding' needs 'after_s'"),
        ('{"type": "sounding", "turn": 1, "after_s": -0.1}', "'after_s' must be 0 to 3600"),
        ('{"type": "sounding", "turn": 1, "after_s": 3600}', "'after_s' must be 0 to 3600"),
        ('{"type": "sounding", "turn": true, "after_s": 0.5}', "'sounding' needs 'turn'"),
        ('{"type": "sounding", "turn": 1.0, "after_s": 0.5}', "'sounding' needs 'turn'"),
        ('{"type": "sounding", "turn": 0, "after_s": 0.5}', "'turn' must be 1 or more"),
        ('{"type": "played", "turn": 1, "complete": true}', "'played' needs 'samples'"),
        ('{"type": "played", "turn": 1, "samples": true, "complete": true}', "'played' needs 'samples'"),
        ('{"type": "played", "turn": 1, "samples": 1.5, "complete": true}', "'played' needs 'samples'"),
        ('{"type": "played", "turn": 1, "samples": -1, "complete": true}', "'samples' must be zero or more"),
        ('{"type": "played", "turn": 1, "samples": 10}', "'played' needs 'complete'"),
        ('{"type": "played", "turn": 1, "samples": 10, "complete": 1}', "'played' needs 'complete'"),
        ('{"type": "played", "turn": -2, "samples": 10, "complete": true}', "'turn' must be 1 or more"),
        ('{"type": "played", "samples": 10, "complete": true}', "'played' needs 'turn'"),
    ],
)
def test_a_bad_client_message_is_refused_with_a_sentence(text: str, says: str) -> None:
    with pytest.raises(wire.ProtocolError) as refused:
        wire.parse_client_message(text)
    assert says in str(refused.value)


def test_microphone_frames_are_whole_int16_samples_within_the_limit() -> None:
    samples = np.arange(-256, 256, dtype="<i2") * 100
    assert len(samples) == wire.MIC_FRAME_SAMPLES
    heard = wire.mic_samples(samples.tobytes())
    assert heard.dtype == np.dtype("<i2") and np.array_equal(heard, samples)
    assert len(wire.mic_samples(bytes(2 * wire.MAX_MIC_FRAME_SAMPLES))) == wire.MAX_MIC_FRAME_SAMPLES
    assert wire.mic_samples(b"\x01\x80").tolist() == [-32767], "little-endian"
    for frame, says in [
        (b"", "1 to"),
        (b"\x00" * 1023, "whole 16-bit samples"),
        (bytes(2 * wire.MAX_MIC_FRAME_SAMPLES + 2), "1 to"),
    ]:
        with pytest.raises(wire.ProtocolError, match=says):
            wire.mic_samples(frame)


@pytest.mark.parametrize("turn", [1, 7, 2**32 - 1])
def test_a_reply_frame_carries_its_turn_and_pcm(turn: int) -> None:
    pcm = (np.sin(np.arange(2048) / 7) * 9000).astype("<i2").tobytes()
    frame = wire.reply_frame(turn, pcm)
    assert frame[:4] == turn.to_bytes(4, "little") and len(frame) == 4 + len(pcm), "what live.js reads"
    assert wire.parse_reply_frame(frame) == (turn, pcm)
    assert wire.parse_reply_frame(wire.reply_frame(turn, b"")) == (turn, b"")
    with pytest.raises(wire.ProtocolError):
        wire.parse_reply_frame(frame[:3])


def test_server_messages_and_page_settings_are_plain_json() -> None:
    assert json.loads(wire.server_message("flush", turn=3)) == {"type": "flush", "turn": 3}
    assert json.loads(wire.server_message("ping")) == {"type": "ping"}
    settings = json.loads(json.dumps(wire.page_settings()))
    assert settings == {"micSampleRate": 16_000, "micFrameSamples": 512, "replySampleRate": OUTPUT_SAMPLE_RATE}
    assert 4000 <= wire.REFUSED_CODE <= 4999, "a close code of the application's own range"
    assert 0.02 <= wire.MIC_FRAME_SAMPLES / wire.MIC_SAMPLE_RATE <= 0.04, "20-40 ms frames"


# --- tokens -----------------------------------------------------------------------------------------------


class Tab:
    """A stand-in session: tokens only compare sessions by identity."""


def test_a_token_is_claimed_once_by_its_own_session() -> None:
    tokens: LiveTokens[Tab] = LiveTokens()
    one, other = Tab(), Tab()
    token, others = tokens.issue(one), tokens.issue(other)
    assert tokens.claim(token) is one
    assert tokens.claim(token) is None, "single use"
    assert tokens.claim(others) is other, "issuing for one session leaves another's token alone"
    assert tokens.claim("") is None and tokens.claim("not-issued") is None


def test_a_new_token_revokes_the_old_unclaimed_one_and_revoke_revokes() -> None:
    tokens: LiveTokens[Tab] = LiveTokens()
    tab = Tab()
    old = tokens.issue(tab)
    new = tokens.issue(tab)
    assert tokens.claim(old) is None, "only a session's latest token works"
    tokens.revoke(tab)
    assert tokens.claim(new) is None
    tokens.revoke(Tab())  # a session with no token: nothing to do


def test_tokens_are_long_and_distinct() -> None:
    tokens: LiveTokens[Tab] = LiveTokens()
    issued = [tokens.issue(Tab()) for _ in range(200)]
    assert len(set(issued)) == len(issued)
    assert min(map(len, issued)) >= 43, "32 random bytes, url-safe base64"
    assert all(
        set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_") for token in issued
    )


# --- the route, over real loopback sockets ---------------------------------------------------------------


@pytest.fixture(scope="module")
def handlers(echo_url: str) -> Handlers:
    return Handlers(Backend(server_url=echo_url))


@pytest.fixture(scope="module")
def live_url(handlers: Handlers) -> Iterator[str]:
    with serving_app(app.create_app(handlers)) as url:
        yield url.replace("http://", "ws://") + "/live"


@pytest.fixture(scope="module")
def greeting() -> np.ndarray:
    return speak("Good morning.")


def client_message(kind: str, **fields: object) -> str:
    """A text message as live.js sends it."""
    return json.dumps({"type": kind, **fields})


def new_session(tmp_path: Path) -> Session:
    """What `page_loaded` makes for a tab (without starting the backend's watcher)."""
    return Session(conversation=Conversation(), files=TurnFiles(tmp_path))


@contextmanager
def socket_to(live_url: str) -> Iterator[ClientConnection]:
    with connect(live_url, open_timeout=5, close_timeout=2, max_size=None) as socket:
        yield socket


@contextmanager
def live_socket(live_url: str, token: str) -> Iterator[ClientConnection]:
    """A socket that has said hello with `token`."""
    with socket_to(live_url) as socket:
        socket.send(client_message("hello", token=token))
        yield socket


def refusal(socket: ClientConnection) -> str:
    """The app's sentence for a refused socket, after checking that it then closes it with REFUSED_CODE."""
    message = json.loads(socket.recv(timeout=WAIT_S))
    assert message["type"] == "error"
    with pytest.raises(ConnectionClosed) as closed:
        socket.recv(timeout=WAIT_S)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == wire.REFUSED_CODE
    return message["message"]


def say(socket: ClientConnection, speech: np.ndarray) -> None:
    """Speech and a pause, as the page's capture worklet sends them."""
    pcm = to_int16(join(silence(0.5), speech, silence(1.5))).astype("<i2").tobytes()
    step = 2 * wire.MIC_FRAME_SAMPLES
    for start in range(0, len(pcm), step):
        socket.send(pcm[start : start + step])


def next_text(socket: ClientConnection) -> dict:
    """The next control message (pings skipped)."""
    while True:
        message = socket.recv(timeout=WAIT_S)
        if isinstance(message, str) and json.loads(message)["type"] != "ping":
            return json.loads(message)
        assert isinstance(message, str), f"unexpected audio: {message[:16]!r}"


def whole_reply(socket: ClientConnection, turn: int) -> bytes:
    """The reply's audio for `turn`, up to its `reply_end`; anything for another turn fails."""
    pcm = bytearray()
    while True:
        message = socket.recv(timeout=WAIT_S)
        if isinstance(message, bytes):
            number, piece = wire.parse_reply_frame(message)
            assert number == turn, f"audio of turn {number} while waiting for turn {turn}"
            pcm += piece
            continue
        parsed = json.loads(message)
        if parsed["type"] == "reply_end":
            assert parsed["turn"] == turn
            return bytes(pcm)
        assert parsed["type"] == "ping", parsed


def test_an_unknown_token_is_refused(live_url: str) -> None:
    with live_socket(live_url, "made-up") as socket:
        assert "reload the page" in refusal(socket)


def test_a_token_opens_one_socket_only(live_url: str, handlers: Handlers, tmp_path: Path) -> None:
    session = new_session(tmp_path)
    token = handlers.tokens.issue(session)
    with live_socket(live_url, token):
        wait_for(lambda: session.conversation.phase is Phase.LISTENING, what="the conversation to start")
    wait_for(lambda: session.conversation.phase is Phase.STOPPED, what="the closed socket to end it")
    with live_socket(live_url, token) as again:
        refusal(again)


@pytest.mark.parametrize(
    "first",
    [client_message("stop"), b"\x00\x00" * wire.MIC_FRAME_SAMPLES, "not json", client_message("hello")],
)
def test_a_first_message_that_is_not_a_hello_is_refused(
    live_url: str, handlers: Handlers, tmp_path: Path, first: str | bytes
) -> None:
    session = new_session(tmp_path)
    token = handlers.tokens.issue(session)
    with socket_to(live_url) as socket:
        socket.send(first)
        refusal(socket)
    assert session.conversation.phase is Phase.IDLE
    assert handlers.tokens.claim(token) is session, "the tab's token was not used up by someone else's socket"


def test_a_socket_that_says_nothing_is_refused(live_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire, "HELLO_TIMEOUT_S", 0.3)
    with socket_to(live_url) as socket:
        refusal(socket)


def test_a_conversation_already_on_another_socket_is_refused(live_url: str, handlers: Handlers, tmp_path: Path) -> None:
    session = new_session(tmp_path)
    with live_socket(live_url, handlers.tokens.issue(session)):
        wait_for(lambda: session.conversation.phase is Phase.LISTENING, what="the first socket's conversation")
        with live_socket(live_url, handlers.tokens.issue(session)) as second:
            assert "already running" in refusal(second)
        assert session.conversation.phase is Phase.LISTENING, "the refusal leaves the running one alone"


@pytest.mark.slow
@needs_espeak
def test_a_whole_conversation_over_the_socket(
    live_url: str, handlers: Handlers, tmp_path: Path, greeting: np.ndarray
) -> None:
    session = new_session(tmp_path)
    with live_socket(live_url, handlers.tokens.issue(session)) as socket:
        say(socket, greeting)
        turn = next_text(socket)
        assert turn["type"] == "turn" and turn["turn"] == 1
        assert 0.5 < turn["speech_end_s"] < 0.5 + len(greeting) / 16_000
        pcm = whole_reply(socket, 1)
        assert abs(len(pcm) / 2 / OUTPUT_SAMPLE_RATE - len(greeting) / 16_000) < 0.5, "the echo of the greeting"
        assert session.conversation.phase is Phase.SPEAKING, "until the page says it has played it"

        socket.send(client_message("sounding", turn=1, after_s=0.31))
        socket.send(client_message("played", turn=1, samples=len(pcm) // 2, complete=True))
        wait_for(lambda: session.conversation.phase is Phase.LISTENING, what="the reply to be filed")
        assert "0.31 s to first sound" in session.conversation.history[-1]["content"]

        socket.send(client_message("stop"))
        with pytest.raises(ConnectionClosed):
            socket.recv(timeout=WAIT_S)
    assert session.conversation.phase is Phase.STOPPED and session.conversation.notice is None, (
        "the user stopped it: no notice"
    )


@needs_espeak
def test_a_lost_socket_stops_the_conversation_and_keeps_the_reply(
    live_url: str, handlers: Handlers, tmp_path: Path, echo_url: str, greeting: np.ndarray
) -> None:
    session = new_session(tmp_path)
    with live_socket(live_url, handlers.tokens.issue(session)) as socket:
        say(socket, greeting)
        assert next_text(socket)["type"] == "turn"
        frame = socket.recv(timeout=WAIT_S)
        assert isinstance(frame, bytes), "the reply has begun"
        turn, pcm = wire.parse_reply_frame(frame)
        assert turn == 1 and len(pcm) > 0 and len(pcm) % 2 == 0, "with turn 1's audio"
    wait_for(lambda: session.link is not None and session.link.closed.is_set(), what="the lost socket to end the link")
    assert session.conversation.phase is Phase.STOPPED
    assert session.conversation.notice == "The live audio connection closed."
    assert "stopped" in session.conversation.history[-1]["content"], "what came of the reply is kept"
    wait_for(lambda: not fetch_health(echo_url).busy, what="the server to drop the reply no one hears")


@pytest.mark.slow
@needs_espeak
def test_each_socket_gets_only_its_own_tabs_audio(
    live_url: str, handlers: Handlers, tmp_path: Path, greeting: np.ndarray
) -> None:
    first, second = new_session(tmp_path / "a"), new_session(tmp_path / "b")
    with (
        live_socket(live_url, handlers.tokens.issue(first)) as one,
        live_socket(live_url, handlers.tokens.issue(second)) as other,
    ):
        wait_for(lambda: second.conversation.phase is Phase.LISTENING, what="the second tab's conversation")
        say(one, greeting)
        other.send(bytes(2 * wire.MIC_FRAME_SAMPLES))  # its microphone streams too, silence
        assert next_text(one)["turn"] == 1
        assert whole_reply(one, 1)
        with pytest.raises(TimeoutError):
            other.recv(timeout=0.5)  # everything for the first tab has been sent by now
    # (the first tab's reply may be filed too by now: closing its socket ended the conversation)
    assert [message["role"] for message in first.conversation.history][:1] == ["user"]
    assert sum(message["role"] == "user" for message in first.conversation.history) == 1
    assert second.conversation.history == []


def test_a_frame_that_is_not_audio_stops_the_conversation_with_a_sentence(
    live_url: str, handlers: Handlers, tmp_path: Path
) -> None:
    session = new_session(tmp_path)
    with live_socket(live_url, handlers.tokens.issue(session)) as socket:
        socket.send(b"\x00" * 3)
        with pytest.raises(ConnectionClosed):
            while True:  # the app ends the socket (anything before that would be a ping or the error sentence)
                assert isinstance(socket.recv(timeout=WAIT_S), str)
    assert session.link is not None and session.link.closed.is_set()
    assert session.conversation.phase is Phase.STOPPED
    assert "could not use" in session.conversation.notice and "16-bit samples" in session.conversation.notice


def test_a_bad_message_mid_conversation_is_a_sentence_for_the_page(
    live_url: str, handlers: Handlers, tmp_path: Path
) -> None:
    """live_protocol says the app sends an `error` sentence before it closes the socket, so the page shows
    what went wrong instead of blaming the network (close code 1006)."""
    session = new_session(tmp_path)
    with live_socket(live_url, handlers.tokens.issue(session)) as socket:
        socket.send(client_message("played", turn=1))
        message = json.loads(socket.recv(timeout=WAIT_S))
        assert message["type"] == "error" and "could not use" in message["message"]
