"""The app's event handlers called directly, as Gradio would call them, against real local servers.

Microphone chunks are espeak-ng speech at the browser's 48 kHz, fed in `STREAM_EVERY_S` pieces through the
real pause detector; replies come from our server's echo engine over real HTTP, or from a server that
answers like the reference one to make it fail in the ways it does. Files are checked by decoding them.
"""

from __future__ import annotations

import io
import ipaddress
import re
import shutil
import socket
import time
import wave
from pathlib import Path

import numpy as np
import pytest
import soxr
from pydub import AudioSegment

import app
from app import Handlers, Session
from audio_files import TurnFiles
from backend import Backend
from omni_client import fetch_health
from omni_server.echo import EchoEngine
from replying import LISTENING_STATUS, PLAYER_LEAD_IN, ReplySettings
from state import Conversation, Phase
from tests.reference_server import Behaviour, ReferenceServer, Script
from tests.servers import serving_engine, wait_for
from tests.browser_harness import free_port
from tests.speech import espeak_available, join, silence, speak, write_wav

pytestmark = pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed")

BROWSER_RATE = 48_000
QUESTION = "What is the capital of France?"


def skipped(value: object) -> bool:
    return isinstance(value, dict) and value.get("__type__") == "update" and len(value) == 1


def browser_chunks(samples_16k: np.ndarray, every_s: float = app.STREAM_EVERY_S) -> list[tuple[int, np.ndarray]]:
    """Speech as Gradio's streaming microphone delivers it: 48 kHz int16 chunks of `every_s` seconds."""
    audio = soxr.resample(samples_16k, 16_000, BROWSER_RATE)
    pcm = (np.clip(audio, -1, 1) * 32767).astype(np.int16)
    step = round(every_s * BROWSER_RATE)
    return [(BROWSER_RATE, pcm[i : i + step]) for i in range(0, len(pcm), step)]


def talk(handlers: Handlers, session: Session, speech: np.ndarray) -> tuple:
    """Record, feed chunks until the app asks the browser to stop the microphone; return that output."""
    assert handlers.recording_started(session, 0.8, 0.25) == LISTENING_STATUS
    for chunk in browser_chunks(join(silence(0.5), speech, silence(2.0))):
        outputs = handlers.chunk(chunk, session)
        if not skipped(outputs[2]):
            return outputs
    raise AssertionError("the turn never ended")


def wav_seconds(path: str) -> float:
    with wave.open(path) as reader:
        return reader.getnframes() / reader.getframerate()


def mp3_seconds(path: str) -> float:
    return len(AudioSegment.from_file(path, format="mp3")) / 1000


def pcm_of_wav_chunk(chunk: bytes) -> bytes:
    with wave.open(io.BytesIO(chunk)) as reader:
        assert (reader.getframerate(), reader.getnchannels(), reader.getsampwidth()) == (24_000, 1, 2)
        return reader.readframes(reader.getnframes())


def messages(history: list[dict], role: str) -> list:
    return [message["content"] for message in history if message["role"] == role]


def new_session(tmp_path: Path) -> Session:
    return Session(conversation=Conversation(), files=TurnFiles(tmp_path))


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any connection these tests (Gradio, gradio_client, the app) try beyond this machine."""
    connect = socket.socket.connect

    def checked(sock: socket.socket, address: object) -> object:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            host = address[0]  # type: ignore[index]
            assert ipaddress.ip_address(host).is_loopback, f"tried to reach {address}"
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", checked)


@pytest.fixture(scope="module")
def question() -> np.ndarray:
    return speak(QUESTION)


@pytest.fixture(scope="module")
def echo_url():
    with serving_engine(EchoEngine(thinking_s=0.05, realtime=True)) as url:
        yield url


def test_a_whole_turn_with_the_echo_server(tmp_path: Path, question: np.ndarray, echo_url: str) -> None:
    handlers, session = Handlers(Backend(server_url=echo_url)), new_session(tmp_path)
    chat, status, command = talk(handlers, session, question)

    assert command.startswith("stop:"), "the turn's end stops the microphone"
    assert status.startswith("Thinking")
    [user_wav] = messages(chat, "user")
    heard_s = wav_seconds(user_wav["path"])
    assert len(question) / 16_000 < heard_s < len(question) / 16_000 + 0.8  # speech + pre-roll + tail
    assert all(skipped(out) for out in handlers.chunk(browser_chunks(question)[0], session)), \
        "chunks after the turn's end are ignored"

    started = time.monotonic()
    steps, arrivals = [], []
    for outputs in handlers.recording_stopped(session):
        steps.append(outputs)
        arrivals.append(time.monotonic() - started)
    audio = [(out[0], at) for out, at in zip(steps, arrivals) if not skipped(out[0])]
    pieces = [pcm_of_wav_chunk(chunk) for chunk, _ in audio]
    assert pieces[0].startswith(PLAYER_LEAD_IN), "the player's first piece starts with its short lead-in"
    pieces[0] = pieces[0][len(PLAYER_LEAD_IN):]
    pcm = b"".join(pieces)
    assert all(len(piece) <= 4096 for piece in pieces), "one server read per chunk, no more"
    assert abs(len(pcm) / 2 / 24_000 - heard_s) < 0.05, "the echo is the heard turn, all of it"
    assert audio[0][1] < audio[-1][1] - 0.5 * heard_s, "audio is passed on as it arrives, not at the end"
    assert any(isinstance(out[2], str) and out[2].startswith("Speaking") for out in steps)

    final = steps[-1]
    reply_mp3, text, figures = messages(final[1], "assistant")
    assert abs(mp3_seconds(reply_mp3["path"]) - heard_s) < 0.15
    assert text.startswith("(echo)")
    assert "s to first audio" in figures and f"{heard_s:.1f} s reply" in figures
    assert skipped(final[3]), "the microphone waits for the reply to finish playing"
    assert session.conversation.phase is Phase.SPEAKING

    status, command = handlers.playback_ended(session)
    assert status == LISTENING_STATUS and command.startswith("record:")
    assert session.conversation.phase is Phase.LISTENING


@pytest.mark.parametrize(
    ("script", "words"),
    [
        (Script(Behaviour.HTML_500), "web page|error"),
        (Script(Behaviour.EMPTY), "without any audio"),
    ],
)
def test_a_failed_reply_keeps_the_turn_warns_and_listens_again(
    tmp_path: Path, question: np.ndarray, script: Script, words: str
) -> None:
    with ReferenceServer(script) as server:
        handlers, session = Handlers(Backend(server_url=server.url)), new_session(tmp_path)
        talk(handlers, session, question)
        with pytest.warns(UserWarning) as warned:
            steps = list(handlers.recording_stopped(session))
    message = str(warned[0].message)
    assert re.search(words, message, re.IGNORECASE), message
    _, chat, status, command = steps[-1]
    assert message in status and command.startswith("record:"), "nothing to play, so the microphone re-arms"
    assert len(messages(chat, "user")) == 1 and Path(messages(chat, "user")[0]["path"]).exists()
    assert messages(chat, "assistant")[-1].startswith("*no reply audio") and "failed" in messages(chat, "assistant")[-1]
    assert session.conversation.phase is Phase.LISTENING


def test_a_stall_after_some_audio_keeps_that_audio(tmp_path: Path, question: np.ndarray) -> None:
    piece = (np.sin(np.arange(8192) / 10) * 8000).astype("<i2").tobytes()  # 341 ms
    with ReferenceServer(Script(Behaviour.STALL, pieces=[piece, piece])) as server:
        handlers = Handlers(Backend(server_url=server.url), ReplySettings(stall_timeout_s=1.0))
        session = new_session(tmp_path)
        talk(handlers, session, question)
        with pytest.warns(UserWarning):
            steps = list(handlers.recording_stopped(session))
    _, chat, status, command = steps[-1]
    reply_mp3, figures = messages(chat, "assistant")
    assert abs(mp3_seconds(reply_mp3["path"]) - 2 * 8192 / 24_000) < 0.1, "the audio that came is kept"
    assert "cut short" in figures
    assert skipped(command) and session.conversation.phase is Phase.SPEAKING, "it plays what came, then re-arms"
    assert handlers.playback_ended(session)[1].startswith("record:")


def test_an_unreachable_server_is_a_sentence(tmp_path: Path, question: np.ndarray) -> None:
    handlers, session = Handlers(Backend(server_url=f"http://127.0.0.1:{free_port()}")), new_session(tmp_path)
    talk(handlers, session, question)
    with pytest.warns(UserWarning, match="reach"):
        steps = list(handlers.recording_stopped(session))
    assert steps[-1][3].startswith("record:")


class BuggyServer:
    """A model server whose request path raises what no one planned for (a bug, not a network failure)."""

    description = "a buggy server"

    def url_for_request(self) -> str:
        raise RuntimeError("a bug in the app")


def test_an_unforeseen_failure_is_still_a_sentence_and_keeps_the_turn(tmp_path: Path, question: np.ndarray) -> None:
    handlers, session = Handlers(BuggyServer()), new_session(tmp_path)
    talk(handlers, session, question)
    with pytest.warns(UserWarning, match="went wrong"):
        steps = list(handlers.recording_stopped(session))
    _, chat, status, command = steps[-1]
    assert "went wrong" in status and "a bug in the app" not in status and command.startswith("record:")
    assert len(messages(chat, "user")) == 1 and "failed" in messages(chat, "assistant")[-1]
    assert session.conversation.phase is Phase.LISTENING, "the conversation is not stuck waiting for the reply"


def test_a_removed_audio_folder_is_made_again(tmp_path: Path, question: np.ndarray, echo_url: str) -> None:
    """A temp-file cleaner may remove the session's folder during a long conversation: nothing is lost."""
    handlers, session = Handlers(Backend(server_url=echo_url)), new_session(tmp_path)
    shutil.rmtree(session.files.folder)
    chat, _, command = talk(handlers, session, question)
    assert command.startswith("stop:") and Path(messages(chat, "user")[0]["path"]).exists()
    steps = list(handlers.recording_stopped(session))
    reply_mp3 = messages(steps[-1][1], "assistant")[0]
    assert Path(reply_mp3["path"]).exists()


def test_an_unwritable_audio_folder_still_answers_the_turn(tmp_path: Path, question: np.ndarray, echo_url: str) -> None:
    """When the user's WAV cannot be written (here the folder's path is taken by a file), the user is told,
    the microphone still stops, and the turn is still answered."""
    handlers, session = Handlers(Backend(server_url=echo_url)), new_session(tmp_path)
    shutil.rmtree(session.files.folder)
    session.files.folder.write_bytes(b"not a folder")
    with pytest.warns(UserWarning, match="could not be saved"):
        _, status, command = talk(handlers, session, question)
    assert command.startswith("stop:") and status.startswith("Thinking")
    assert session.conversation.phase is Phase.THINKING
    steps = list(handlers.recording_stopped(session))
    assert session.conversation.phase is not Phase.THINKING, "the turn was answered, not left waiting"
    said = " ".join(m for m in messages(steps[-1][1], "assistant") if isinstance(m, str))
    assert "(echo)" in said and "audio could not be saved" in said


def test_stop_cancels_the_reply_in_flight_and_keeps_the_history(
    tmp_path: Path, question: np.ndarray, echo_url: str
) -> None:
    handlers, session = Handlers(Backend(server_url=echo_url)), new_session(tmp_path)
    talk(handlers, session, question)
    replying = handlers.recording_stopped(session)
    while skipped(next(replying)[0]):
        pass  # until the first reply audio
    player, chat, status, command = handlers.stop(session)

    assert player is None and status.startswith("Stopped") and command.startswith("stop:")
    assert len(messages(chat, "user")) == 1
    reply_mp3, *_, figures = messages(chat, "assistant")
    assert "stopped" in figures and 0 < mp3_seconds(reply_mp3["path"]) < wav_seconds(messages(chat, "user")[0]["path"])
    assert list(replying) == [], "the cancelled reply sends nothing more"
    assert handlers.playback_ended(session) == (app.gr.skip(), app.gr.skip()), "nothing re-arms after Stop"
    wait_for(lambda: not fetch_health(echo_url).busy, timeout=3, what="the server to be freed for the next request")


def test_two_tabs_keep_their_own_turns(tmp_path: Path, echo_url: str) -> None:
    handlers = Handlers(Backend(server_url=echo_url))
    tabs = [new_session(tmp_path / "a"), new_session(tmp_path / "b")]
    speeches = [speak("Good morning."), speak("Tell me a long story about a dragon and a knight, please.")]
    for tab in tabs:
        handlers.recording_started(tab, 0.8, 0.25)
    streams = [browser_chunks(join(silence(0.5), speech, silence(2.0))) for speech in speeches]
    ended = [None, None]
    for index in range(max(map(len, streams))):
        for tab_index, (tab, stream) in enumerate(zip(tabs, streams)):
            if index < len(stream) and ended[tab_index] is None:
                outputs = handlers.chunk(stream[index], tab)
                if not skipped(outputs[2]):
                    ended[tab_index] = outputs
    assert all(ended), "each tab's turn ends"
    heard = [wav_seconds(messages(out[0], "user")[0]["path"]) for out in ended]
    for seconds, speech in zip(heard, speeches):
        assert len(speech) / 16_000 < seconds < len(speech) / 16_000 + 0.8
    assert tabs[0].files.folder != tabs[1].files.folder
    assert len(tabs[0].conversation.history) == len(tabs[1].conversation.history) == 1


def test_input_that_is_not_audio_switches_the_microphone_off_with_a_sentence(tmp_path: Path) -> None:
    handlers, session = Handlers(Backend(server_url="http://127.0.0.1:9")), new_session(tmp_path)
    handlers.recording_started(session, 0.8, 0.25)
    with pytest.warns(UserWarning):
        chat, status, command = handlers.chunk((4_000, np.zeros(2000, dtype=np.int16)), session)
    assert "switched off" in status and command.startswith("stop:")
    assert session.conversation.phase is Phase.IDLE


def test_the_chat_api_with_gradio_client(tmp_path: Path, question: np.ndarray, echo_url: str) -> None:
    from gradio_client import Client, handle_file

    demo = app.build_demo(Handlers(Backend(server_url=echo_url)))
    port = free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        wav = tmp_path / "question.wav"
        write_wav(wav, question)
        client = Client(f"http://127.0.0.1:{port}", verbose=False, download_files=str(tmp_path / "downloads"))
        reply_path, text = client.predict(handle_file(str(wav)), api_name="/chat")
    finally:
        demo.close()
    assert text.startswith("(echo)")
    assert abs(mp3_seconds(reply_path) - len(question) / 16_000) < 0.15


def test_a_tab_waiting_for_the_server_says_it_is_queued(tmp_path: Path, echo_url: str) -> None:
    handlers = Handlers(Backend(server_url=echo_url))
    first, second = new_session(tmp_path / "a"), new_session(tmp_path / "b")
    talk(handlers, first, speak("Tell me a long story about a dragon and a knight, please."))
    talk(handlers, second, speak("Good morning."))
    answering_first = handlers.recording_stopped(first)
    while skipped(next(answering_first)[0]):
        pass  # the server is now busy with the first tab
    statuses = [out[2] for out in handlers.recording_stopped(second) if isinstance(out[2], str)]
    list(answering_first)
    assert any(status.startswith("Queued: the model server is answering another conversation") for status in statuses)
    assert any(status.startswith("Speaking") for status in statuses), "and then it is answered"


def test_the_launched_server_reports_progress_restarts_when_it_dies_and_stops_with_the_app() -> None:
    backend = Backend(server_url=None, engine="echo")
    try:
        backend.start()
        deadline = time.monotonic() + 60
        while not backend.ready:
            assert time.monotonic() < deadline, backend.status_line()
            time.sleep(0.1)
        assert backend.status_line().startswith("Model server ready: echo engine, local server")
        process = backend._local._process  # the child, to kill it as a crash would
        process.kill()
        process.wait()
        new_url = backend.url_for_request()  # a turn after the crash restarts it first
        wait_for(lambda: fetch_health(new_url).status.value == "ready", timeout=30, what="the restarted server")
        restarted = backend._local._process
        assert restarted is not process and restarted.poll() is None
    finally:
        backend.close()
    assert restarted.wait(timeout=10) is not None, "closing the app stops the server"
