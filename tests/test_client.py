"""omni_client against real local servers: ours (uvicorn), one that speaks the reference protocol byte for byte,
and `python -m omni_server` launched by LocalServer. Every failure must arrive as a ReplyError with a sentence."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import wave
from pathlib import Path

import numpy as np
import pytest

from omni_client import (
    FailureKind,
    ReplyAudio,
    ReplyError,
    ReplyLoading,
    ReplyQueued,
    ReplyText,
    fetch_health,
    stream_reply,
    utterance_wav,
)
from omni_server.echo import EchoEngine
from omni_server.protocol import HealthStatus
from server_process import LocalServer
from tests import processes
from tests.reference_server import Behaviour, ReferenceServer, Script
from tests.servers import PIECE, ScriptedEngine, serving_engine, serving_while_loading, tone, wait_for

WAV = utterance_wav(tone(0.5))
FRAME = b"\r\n--frame\r\n"


def collect(url: str, wav: bytes = WAV, **options) -> tuple[list, ReplyError | None]:
    """All events of one reply, and the error that ended it (None for a clean end)."""
    events: list = []
    try:
        for event in stream_reply(url, wav, connect_timeout_s=2, **{"stall_timeout_s": 5, **options}):
            events.append(event)
    except ReplyError as error:
        return events, error
    return events, None


def audio_of(events: list) -> bytes:
    return b"".join(event.pcm for event in events if isinstance(event, ReplyAudio))


def assert_well_formed(events: list) -> None:
    for event in events:
        if isinstance(event, ReplyAudio):
            assert 0 < len(event.pcm) <= 4096 and len(event.pcm) % 2 == 0


# --- utterance_wav ------------------------------------------------------------------------------------------


def test_utterance_wav_is_16k_mono_16_bit_and_resamples() -> None:
    with wave.open(io.BytesIO(utterance_wav(np.zeros(48_000, dtype=np.float32), sample_rate=48_000))) as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate(), wav.getnframes()) == (1, 2, 16_000, 16_000)
    stereo_int16 = np.full((1600, 2), 16384, dtype=np.int16)
    with wave.open(io.BytesIO(utterance_wav(stereo_int16))) as wav:
        samples = np.frombuffer(wav.readframes(1600), dtype="<i2")
    assert np.all(np.abs(samples - 16384) <= 1)


# --- our server ---------------------------------------------------------------------------------------------


def test_echo_reply_with_text_and_queue_position() -> None:
    with serving_engine(EchoEngine(thinking_s=0.05)) as url:
        events, error = collect(url)
    assert error is None
    assert events[0] == ReplyQueued(0)
    assert ReplyText("(echo) 0.5 s of speech") in events
    assert len(audio_of(events)) == 2 * 12_000
    assert_well_formed(events)


def test_echo_reply_as_raw_pcm_when_text_is_not_asked() -> None:
    with serving_engine(EchoEngine(thinking_s=0.05)) as url:
        events, error = collect(url, stream_text=False)
    assert error is None
    assert all(isinstance(event, ReplyAudio) for event in events)
    assert len(audio_of(events)) == 2 * 12_000
    assert_well_formed(events)


def test_connection_refused_is_unreachable() -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    events, error = collect(f"http://127.0.0.1:{port}")
    assert events == []
    assert error.kind is FailureKind.UNREACHABLE
    assert error.message == f"Could not reach the model server at http://127.0.0.1:{port}. Is it running?"


def test_a_4xx_shows_the_servers_sentence() -> None:
    with serving_engine(EchoEngine()) as url:
        events, error = collect(url, wav=b"RIFF but not really a wave file")
    assert events == []
    assert error.kind is FailureKind.REJECTED
    assert error.message.startswith("The audio could not be decoded")


@pytest.mark.slow
def test_a_loading_server_holds_the_question_and_tells_its_progress() -> None:
    with serving_while_loading("warming up") as (url, release):
        assert fetch_health(url).detail == "warming up"
        assert fetch_health(url).status is HealthStatus.LOADING
        result: list = []
        asking = threading.Thread(target=lambda: result.append(collect(url, stream_text=True)))
        asking.start()
        time.sleep(1.5)
        release.set()
        asking.join(timeout=10)
    ((events, error),) = result
    assert error is None
    assert events[0] == ReplyLoading("mini-omni: warming up")
    assert audio_of(events) and all(isinstance(e, ReplyLoading) for e in events[: events.index(ReplyQueued(0))])


@pytest.mark.parametrize("stream_text", [False, True], ids=["raw", "multipart"])
def test_an_engine_failure_mid_reply_is_cut_short_after_the_audio_that_came(stream_text: bool) -> None:
    with serving_engine(ScriptedEngine(pieces=5, fail_after=2)) as url:
        events, error = collect(url, stream_text=stream_text)
    assert audio_of(events) == PIECE * 2
    assert error.kind is FailureKind.CUT_SHORT
    assert error.message.startswith("The reply was cut off")
    if stream_text:
        assert "special token" in error.message  # the server's reason, from its error part


def test_an_engine_failure_before_audio_is_a_server_error_with_its_sentence() -> None:
    with serving_engine(ScriptedEngine(pieces=3, fail_after=0)) as url:
        events, error = collect(url, stream_text=False)
    assert events == []
    assert error.kind is FailureKind.SERVER_ERROR
    assert "special token" in error.message


@pytest.mark.slow
def test_a_queued_request_hears_its_place_then_its_reply() -> None:
    gate = threading.Event()
    with serving_engine(ScriptedEngine(pieces=1, gate=gate)) as url:
        first = threading.Thread(target=collect, args=(url,))
        first.start()
        wait_for(lambda: fetch_health(url).busy, what="first request running")
        events: list = []
        replies = stream_reply(url, WAV, stall_timeout_s=5)
        events.append(next(replies))
        gate.set()
        events.extend(replies)
        first.join(timeout=10)
    places = [event.ahead for event in events if isinstance(event, ReplyQueued)]
    assert places[0] == 1 and places[-1] == 0
    assert events.index(ReplyQueued(0)) < min(i for i, event in enumerate(events) if isinstance(event, ReplyAudio))
    assert audio_of(events) == PIECE


def test_cancel_ends_the_reply_quietly_and_frees_the_server() -> None:
    cancel = threading.Event()
    engine = ScriptedEngine(pieces=50, delay=0.1)
    with serving_engine(engine) as url:
        received = []
        for event in stream_reply(url, WAV, cancel=cancel, stream_text=False):
            received.append(event)
            cancel.set()
        cancelled_at = time.monotonic()
        wait_for(lambda: not fetch_health(url).busy, what="the server to drop the cancelled request")
        freed_after = time.monotonic() - cancelled_at
    assert len(received) == 1
    assert engine.stopped_early.is_set()
    assert freed_after < 2.0  # not the 5 s the whole reply would take


# --- a server that speaks the reference protocol byte for byte ---------------------------------------------


def test_reference_stream_is_read_whole_in_small_pieces_and_the_request_is_the_reference_one() -> None:
    pieces = [bytes(range(256)) * 64] * 3  # 3 x 16,384 bytes = 3 x 341 ms
    with ReferenceServer(Script(pieces=pieces, delay_s=0.05)) as server:
        events, error = collect(server.url)
    assert error is None
    assert audio_of(events) == b"".join(pieces)
    assert_well_formed(events)
    request = server.bodies[0]
    assert set(request) == {"audio", "stream_text"}  # stream_text is ignored by the reference (other keys are)
    assert base64.b64decode(request["audio"]) == WAV


@pytest.mark.slow
def test_reference_first_bytes_are_handed_on_without_waiting_for_more() -> None:
    with ReferenceServer(Script(pieces=[b"\x01\x00" * 500, b"\x02\x00" * 8192], delay_s=2.0)) as server:
        started = time.monotonic()
        replies = stream_reply(server.url, WAV, stall_timeout_s=5)
        first = next(replies)
        waited = time.monotonic() - started
        rest = list(replies)
    assert first == ReplyAudio(b"\x01\x00" * 500)
    assert waited < 1.5  # the second piece only comes after 2 s
    assert audio_of([first, *rest]) == b"\x01\x00" * 500 + b"\x02\x00" * 8192


def test_reference_odd_reads_carry_a_byte_into_the_next_piece() -> None:
    with ReferenceServer(
        Script(pieces=[b"\x01\x02\x03", b"\x04\x05\x06\x07\x08", b"\x09\x0a\x0b\x0c"], delay_s=0.15)
    ) as server:
        events, error = collect(server.url)
    assert error is None
    assert [event.pcm for event in events] == [b"\x01\x02", b"\x03\x04\x05\x06\x07\x08", b"\x09\x0a\x0b\x0c"]


def test_reference_odd_total_length_is_garbage_after_the_audio() -> None:
    with ReferenceServer(Script(pieces=[b"\x01\x02\x03\x04\x05"])) as server:
        events, error = collect(server.url)
    assert audio_of(events) == b"\x01\x02\x03\x04"
    assert error.kind is FailureKind.GARBAGE
    assert "not 16-bit audio" in error.message


@pytest.mark.parametrize(
    ("behaviour", "kind", "message"),
    [
        (
            Behaviour.HTML_500,
            FailureKind.SERVER_ERROR,
            "The model server failed to answer (HTTP 500 INTERNAL SERVER ERROR)",
        ),
        (Behaviour.EMPTY, FailureKind.EMPTY, "The model server answered without any audio."),
    ],
    ids=["html-500", "empty-body"],
)
def test_reference_failures_before_any_audio(behaviour: Behaviour, kind: FailureKind, message: str) -> None:
    with ReferenceServer(Script(behaviour=behaviour)) as server:
        events, error = collect(server.url)
    assert events == []
    assert error.kind is kind
    assert error.message == message


def test_a_stall_after_some_audio_keeps_the_audio() -> None:
    with ReferenceServer(Script(behaviour=Behaviour.STALL, pieces=[b"\x01\x00" * 2048])) as server:
        events, error = collect(server.url, stall_timeout_s=0.5)
    assert audio_of(events) == b"\x01\x00" * 2048
    assert error.kind is FailureKind.STALLED
    assert error.message == "The model server stopped answering (nothing for 0.5 s)."


@pytest.mark.slow
def test_a_stall_before_the_answer_starts() -> None:
    with ReferenceServer(Script(pieces=[b"\x00\x00"], first_delay_s=1.5)) as server:
        events, error = collect(server.url, stall_timeout_s=0.4)
    assert events == []
    assert error.kind is FailureKind.STALLED


@pytest.mark.parametrize(
    ("content_type", "body", "words"),
    [
        (b"text/html; charset=utf-8", b"<!doctype html><p>hello</p>", "web page instead of audio"),
        (b"audio/wav", b"<!DOCTYPE html>\n<html><body>proxy error</body></html>", "web page instead of audio"),
        (b"application/json", b'{"ok": true}', "application/json instead of audio"),
        (b"multipart/x-mixed-replace; boundary=frame", b"no delimiter here at all", "multipart reply is malformed"),
        (b"multipart/x-mixed-replace; boundary=frame", FRAME + b"\x00\x00\x00\x00", "multipart reply is malformed"),
        (b"multipart/x-mixed-replace", FRAME, "names no boundary"),
    ],
    ids=["html", "html-as-audio", "json", "no-delimiter", "part-without-headers", "no-boundary"],
)
def test_garbage_answers(content_type: bytes, body: bytes, words: str) -> None:
    with ReferenceServer(Script(pieces=[body], content_type=content_type)) as server:
        events, error = collect(server.url)
    assert audio_of(events) == b""
    assert error.kind is FailureKind.GARBAGE
    assert words in error.message


def test_mini_omni2_multipart_split_at_awkward_places() -> None:
    audio = bytes(range(200)) * 41  # 8,200 bytes
    wire = (
        FRAME
        + b"Content-Type: audio/wav\r\n\r\n"
        + audio[:4101]
        + FRAME
        + b"Content-Type: text/plain\r\n\r\n"
        + b"Hello, how"
        + FRAME
        + b"Content-Type: audio/wav\r\n\r\n"
        + audio[4101:]
        + FRAME
        + b"Content-Type: text/plain\r\n\r\n"
        + " can I help? ✓".encode()
    )
    cuts = [5, 30, 2000, 4120, 4125, 4140, 4150, 4170, 6000, len(wire) - 3]  # inside delimiters and headers
    pieces = [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)])]
    with ReferenceServer(
        Script(pieces=pieces, delay_s=0.03, content_type=b"multipart/x-mixed-replace; boundary=frame")
    ) as server:
        events, error = collect(server.url)
    assert error is None
    assert audio_of(events) == audio
    assert [event.text for event in events if isinstance(event, ReplyText)] == ["Hello, how", " can I help? ✓"]
    assert_well_formed(events)


# --- health and launching --------------------------------------------------------------------------------------


def test_fetch_health_of_ours_of_the_reference_and_of_nothing() -> None:
    with serving_engine(EchoEngine()) as url:
        ours = fetch_health(url)
    assert (ours.status, ours.engine) == (HealthStatus.READY, "echo")
    with ReferenceServer(Script()) as server:
        assert fetch_health(server.url).status is HealthStatus.UNKNOWN
        gone_url = server.url
    with pytest.raises(ReplyError) as caught:
        fetch_health(gone_url, timeout_s=1)
    assert caught.value.kind is FailureKind.UNREACHABLE


@pytest.mark.slow
def test_local_server_launches_waits_restarts_and_stops() -> None:
    progress: list[str] = []
    with LocalServer(engine="echo") as server:
        first_url = server.url
        assert first_url.startswith("http://127.0.0.1:")
        health = server.wait_ready(on_progress=progress.append, timeout_s=30)
        assert (health.status, health.engine) == (HealthStatus.READY, "echo")
        assert "echo engine (chosen with --engine echo)" == health.detail
        events, error = collect(server.url)
        assert error is None and len(audio_of(events)) == 2 * 12_000

        os.kill(server.pid, signal.SIGKILL)  # the server dies under us
        assert processes.wait_gone(server.pid, timeout_s=5) and not server.running
        with pytest.raises(ReplyError) as caught:
            list(stream_reply(first_url, WAV, connect_timeout_s=1))
        assert caught.value.kind is FailureKind.UNREACHABLE
        second_url = server.ensure_running()
        assert server.restarts == 1 and server.running
        assert server.wait_ready(timeout_s=30).status is HealthStatus.READY
        assert fetch_health(second_url).engine == "echo"
        pid = server.pid
    assert pid is not None and processes.wait_gone(pid, timeout_s=5), "stopped on leaving the block"
    assert not server.running


@pytest.mark.slow
def test_local_server_exits_when_its_launcher_is_killed() -> None:
    """The launcher (an app) dies by SIGKILL, with no chance to stop its server: the server goes too."""
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; from server_process import LocalServer; server = LocalServer(engine='echo');"
            " server.start(); print(server.pid, flush=True); time.sleep(120)",
        ],
        cwd=Path(__file__).resolve().parent.parent,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        server_pid = int(launcher.stdout.readline())
        assert not processes.gone(server_pid)
        launcher.kill()
        launcher.wait(timeout=5)
        assert processes.wait_gone(server_pid, timeout_s=10), "the server outlived its launcher"
    finally:
        launcher.kill()
        launcher.wait()
