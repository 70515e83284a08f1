"""The app's handlers and a tab's live link driven directly, as the page and its WebSocket would drive them.

No browser and no socket: a `Tab` stands in for the page. It opens the link, streams espeak-ng speech as the
page's capture worklet does (16 kHz s16le, `MIC_FRAME_SAMPLES` per frame), collects what the link sends back
and reports playback as the player would. Replies come from our server's echo engine over real HTTP, or from
a server that answers like the reference one to make it fail in the ways it does. Files are checked by
decoding them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import threading
import time
import wave
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from pydub import AudioSegment

import app
import live_link
import live_protocol as wire
from app import ConversationView, Handlers, Session
from audio_files import TurnFiles
from backend import Backend
from end_of_turn import SharedTurnModel
from live_link import LiveLink, status_line
from omni_client import fetch_health
from omni_server.echo import EchoEngine
from omni_server.protocol import OUTPUT_SAMPLE_RATE
from replying import ReplySettings, whole_reply
from state import Conversation, Phase
from tests import processes
from tests.browser_harness import free_port
from tests.reference_server import Behaviour, ReferenceServer, Script
from tests.servers import serving_engine, serving_while_loading, wait_for
from tests.speech import espeak_available, join, silence, speak, to_int16, trim, wav_bytes, write_wav

pytestmark = [
    pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed"),
    pytest.mark.usefixtures("loopback_only"),
]

QUESTION = "What is the capital of France?"
LONG_QUESTION = "Tell me a long story about a dragon and a knight, please."
REPLY_WAIT_S = 15.0  # the longest echo reply here is ~4 s of real time; a loaded 2-core machine gets slack


def skipped(value: object) -> bool:
    return isinstance(value, dict) and value.get("__type__") == "update" and len(value) == 1


def wav_seconds(path: str) -> float:
    with wave.open(path) as reader:
        return reader.getnframes() / reader.getframerate()


def mp3_seconds(path: str) -> float:
    return len(AudioSegment.from_file(path, format="mp3")) / 1000


def messages(history: list[dict], role: str) -> list:
    return [message["content"] for message in history if message["role"] == role]


def new_session(tmp_path: Path) -> Session:
    return Session(conversation=Conversation(), files=TurnFiles(tmp_path))


def mic_frames(samples_16k: np.ndarray) -> Iterator[bytes]:
    """Speech as the page's capture worklet sends it: s16le frames of MIC_FRAME_SAMPLES."""
    pcm = to_int16(samples_16k).astype("<i2").tobytes()
    step = 2 * wire.MIC_FRAME_SAMPLES
    for start in range(0, len(pcm), step):
        yield pcm[start : start + step]


@dataclass(frozen=True)
class Received:
    """One message from the app, when it came and what the tab's status line said as it was sent."""

    message: str | bytes
    at: float
    status: str


@dataclass
class Tab:
    """The page's side of one tab's live link: what it sends the app, and everything the app sent it."""

    handlers: Handlers
    session: Session
    received: list[Received] = field(default_factory=list)
    _arrived: threading.Condition = field(default_factory=threading.Condition)
    link: LiveLink | None = None

    @classmethod
    def opened(cls, handlers: Handlers, session: Session) -> Tab:
        """The route's part: a link for the session whose token the page sent, and the stream begins."""
        tab = cls(handlers, session)
        tab.link = handlers.open_link(session, tab.send)
        assert tab.link is not None and session.link is tab.link, "a new conversation starts listening"
        assert handlers.open_link(session, tab.send) is None, "one link per conversation"
        return tab

    @property
    def conversation(self) -> Conversation:
        return self.session.conversation

    @property
    def status(self) -> str:
        return status_line(self.conversation, self.handlers.backend.description)

    def send(self, message: str | bytes) -> None:
        """The link's Send: called from the microphone's and the reply's threads alike."""
        with self._arrived:
            self.received.append(Received(message, time.monotonic(), self.status))
            self._arrived.notify_all()

    def texts(self, kind: str) -> list[dict]:
        with self._arrived:
            parsed = [json.loads(r.message) for r in self.received if isinstance(r.message, str)]
        return [message for message in parsed if message["type"] == kind]

    def frames(self, turn: int) -> list[tuple[bytes, Received]]:
        """The reply audio sent for `turn`, piece by piece."""
        with self._arrived:
            frames = [(wire.parse_reply_frame(r.message), r) for r in self.received if isinstance(r.message, bytes)]
        return [(pcm, received) for (number, pcm), received in frames if number == turn]

    def wait(self, condition: Callable[[], bool], what: str, timeout: float = REPLY_WAIT_S) -> None:
        with self._arrived:
            assert self._arrived.wait_for(condition, timeout), f"timed out waiting for {what}"

    def hear(self, audio: np.ndarray, until: Callable[[], bool] = lambda: False) -> np.ndarray:
        """Stream `audio` to the app frame by frame, stopping early once `until` holds; returns the rest."""
        assert self.link is not None
        for index, frame in enumerate(mic_frames(audio), start=1):
            self.link.hear(frame)
            if until():
                return audio[index * wire.MIC_FRAME_SAMPLES :]
        return audio[:0]

    def talk(self, speech: np.ndarray) -> dict:
        """Say `speech` and pause; returns the app's `turn` message once it says the turn ended."""
        turns = len(self.texts("turn"))
        self.hear(join(silence(0.5), speech, silence(2.0)), until=lambda: len(self.texts("turn")) > turns)
        assert len(self.texts("turn")) == turns + 1, "the turn never ended"
        return self.texts("turn")[-1]

    def user_wav(self, turn: int) -> str:
        """The path of the user's WAV for `turn`, once it is filed (the reply's thread files it)."""
        history = self.conversation.history
        wait_for(lambda: len(messages(history, "user")) >= turn, timeout=REPLY_WAIT_S, what=f"user turn {turn}")
        return messages(history, "user")[turn - 1]["path"]

    def audio(self, turn: int) -> bytes:
        """The reply audio for `turn` received so far."""
        return b"".join(pcm for pcm, _ in self.frames(turn))

    def reply(self, turn: int) -> bytes:
        """All of the reply to `turn`, once the app says no more is coming."""
        self.wait(lambda: any(m["turn"] == turn for m in self.texts("reply_end")), f"the end of reply {turn}")
        return self.audio(turn)

    def play(self, turn: int) -> bytes:
        """Receive the reply to `turn` and report it played to its end, as the player does."""
        assert self.link is not None
        pcm = self.reply(turn)
        self.link.played(turn, len(pcm) // 2, complete=True)
        return pcm


@pytest.fixture(scope="module")
def question() -> np.ndarray:
    return speak(QUESTION)


@pytest.fixture(scope="module")
def long_question() -> np.ndarray:
    return speak(LONG_QUESTION)


def reply_seconds(pcm: bytes) -> float:
    return len(pcm) / 2 / OUTPUT_SAMPLE_RATE


@pytest.mark.slow
def test_a_whole_turn_with_the_echo_server(tmp_path: Path, question: np.ndarray, echo_url: str) -> None:
    handlers = Handlers(Backend(server_url=echo_url))
    tab = Tab.opened(handlers, new_session(tmp_path))
    assert tab.status.startswith("Listening")
    turn = tab.talk(question)

    assert turn["turn"] == 1
    assert 0.5 + len(trim(question)) / 16_000 - 0.1 < turn["speech_end_s"] < 0.5 + len(question) / 16_000, (
        "the end of speech on the stream's clock (its first frame is time 0)"
    )
    assert tab.received[0].status.startswith("Thinking"), "the turn's end sets the app thinking"
    heard_s = wav_seconds(tab.user_wav(1))
    assert len(question) / 16_000 < heard_s < len(question) / 16_000 + 0.8  # speech + pre-roll + tail

    pcm = tab.reply(1)
    [end] = tab.texts("reply_end")
    assert 0.05 <= end["engine_first_audio_s"] < 2, "the server's share of the wait: its 0.05 s of thinking"
    frames = tab.frames(1)
    assert all(len(piece) <= 4096 for piece, _ in frames), "one server read per frame, no more"
    assert abs(reply_seconds(pcm) - heard_s) < 0.05, "the echo is the heard turn, all of it"
    assert frames[0][1].at < frames[-1][1].at - 0.5 * heard_s, "audio is passed on as it arrives, not at the end"
    assert all(received.status.startswith("Speaking") for _, received in frames)
    assert tab.conversation.phase is Phase.SPEAKING, "the reply is streamed, but the page still plays it"
    assert messages(tab.conversation.history, "assistant") == [], "a reply is filed once it has been played"

    tab.link.sounding(1, 0.42)
    tab.link.played(1, len(pcm) // 2, complete=True)
    assert tab.conversation.phase is Phase.LISTENING and tab.status.startswith("Listening")
    reply_mp3, text, figures = messages(tab.conversation.history, "assistant")
    assert abs(mp3_seconds(reply_mp3["path"]) - heard_s) < 0.15
    assert text.startswith("(echo)")
    assert "0.42 s to first sound" in figures and f"{heard_s:.1f} s reply" in figures, "the page's own measure"

    assert tab.talk(question)["turn"] == 2, "the next turn is heard on the same stream"


@pytest.mark.parametrize(
    ("script", "words"),
    [
        (Script(Behaviour.HTML_500), "web page|error"),
        (Script(Behaviour.EMPTY), "without any audio"),
    ],
)
def test_a_failed_reply_keeps_the_turn_says_why_and_listens_again(
    tmp_path: Path, question: np.ndarray, script: Script, words: str
) -> None:
    with ReferenceServer(script) as server:
        handlers = Handlers(Backend(server_url=server.url))
        tab = Tab.opened(handlers, new_session(tmp_path))
        tab.talk(question)
        assert tab.reply(1) == b""
    assert tab.texts("reply_end") == [{"type": "reply_end", "turn": 1, "engine_first_audio_s": None}]
    notice = tab.conversation.notice
    assert notice is not None and re.search(words, notice, re.IGNORECASE), notice
    assert tab.status == f"{notice} Listening… speak, then pause.", "the sentence, then the turn comes round again"
    history = tab.conversation.history
    assert len(messages(history, "user")) == 1 and Path(messages(history, "user")[0]["path"]).exists()
    figures = messages(history, "assistant")[-1]
    assert figures.startswith("*no reply audio") and "failed" in figures
    assert tab.conversation.phase is Phase.LISTENING
    assert tab.talk(question)["turn"] == 2, "the conversation goes on"


@pytest.mark.slow
def test_a_stall_after_some_audio_keeps_that_audio(tmp_path: Path, question: np.ndarray) -> None:
    piece = (np.sin(np.arange(8192) / 10) * 8000).astype("<i2").tobytes()  # 341 ms
    with ReferenceServer(Script(Behaviour.STALL, pieces=[piece, piece])) as server:
        handlers = Handlers(Backend(server_url=server.url), ReplySettings(stall_timeout_s=1.0))
        tab = Tab.opened(handlers, new_session(tmp_path))
        tab.talk(question)
        pcm = tab.reply(1)
        assert pcm == 2 * piece, "the audio that came is passed on"
        assert tab.conversation.phase is Phase.SPEAKING, "it plays what came"
        assert tab.status.startswith(tab.conversation.notice), "and says why it ended early"
        tab.link.played(1, len(pcm) // 2, complete=True)
    reply_mp3, figures = messages(tab.conversation.history, "assistant")
    assert abs(mp3_seconds(reply_mp3["path"]) - 2 * 8192 / 24_000) < 0.1, "the audio that came is kept"
    assert "cut short" in figures
    assert tab.conversation.phase is Phase.LISTENING


def test_an_unreachable_server_is_a_sentence(tmp_path: Path, question: np.ndarray) -> None:
    handlers = Handlers(Backend(server_url=f"http://127.0.0.1:{free_port()}"))
    tab = Tab.opened(handlers, new_session(tmp_path))
    tab.talk(question)
    assert tab.reply(1) == b""
    assert "Could not reach the model server" in tab.status
    assert tab.conversation.phase is Phase.LISTENING


class BuggyServer:
    """A model server whose request path raises what no one planned for (a bug, not a network failure)."""

    description = "a buggy server"

    def url_for_request(self) -> str:
        raise RuntimeError("a bug in the app")

    def answering(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


def test_an_unforeseen_failure_is_still_a_sentence_and_keeps_the_turn(
    tmp_path: Path, question: np.ndarray, caplog: pytest.LogCaptureFixture
) -> None:
    handlers = Handlers(BuggyServer())  # type: ignore[arg-type]  # all a link needs of the backend
    tab = Tab.opened(handlers, new_session(tmp_path))
    tab.talk(question)
    assert tab.reply(1) == b""
    assert "went wrong" in tab.status and "a bug in the app" not in tab.status
    assert "a bug in the app" in caplog.text, "the details go to the log"
    history = tab.conversation.history
    assert len(messages(history, "user")) == 1 and "failed" in messages(history, "assistant")[-1]
    assert tab.conversation.phase is Phase.LISTENING, "the conversation is not stuck waiting for the reply"


@pytest.mark.slow
def test_a_removed_audio_folder_is_made_again(tmp_path: Path, question: np.ndarray, echo_url: str) -> None:
    """A temp-file cleaner may remove the session's folder during a long conversation: nothing is lost."""
    handlers, session = Handlers(Backend(server_url=echo_url)), new_session(tmp_path)
    shutil.rmtree(session.files.folder)
    tab = Tab.opened(handlers, session)
    tab.talk(question)
    assert Path(tab.user_wav(1)).exists()
    tab.play(1)
    reply_mp3 = messages(session.conversation.history, "assistant")[0]
    assert Path(reply_mp3["path"]).exists()


@pytest.mark.slow
def test_an_unwritable_audio_folder_still_answers_the_turn(
    tmp_path: Path, question: np.ndarray, echo_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """When no file can be written (here the folder's path is taken by a file), the turn is still answered
    and the chat says the reply's audio could not be saved."""
    handlers, session = Handlers(Backend(server_url=echo_url)), new_session(tmp_path)
    shutil.rmtree(session.files.folder)
    session.files.folder.write_bytes(b"not a folder")
    tab = Tab.opened(handlers, session)
    with caplog.at_level(logging.WARNING):
        tab.talk(question)
        pcm = tab.play(1)
    assert "could not save turn 1" in caplog.text
    assert pcm, "the turn was answered, not left waiting"
    assert session.conversation.phase is Phase.LISTENING
    said = " ".join(m for m in messages(session.conversation.history, "assistant") if isinstance(m, str))
    assert "(echo)" in said and "audio could not be saved" in said


def test_stop_cancels_the_reply_in_flight_and_keeps_the_history(
    tmp_path: Path, question: np.ndarray, echo_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stop's fallback, when the page did not stop over its socket: the app cancels the reply itself."""
    monkeypatch.setattr(app, "STOP_GRACE_S", 0.1)
    handlers, session = Handlers(Backend(server_url=echo_url)), new_session(tmp_path)
    token = handlers.tokens.issue(session)
    tab = Tab.opened(handlers, session)
    tab.talk(question)
    tab.wait(lambda: bool(tab.frames(1)), "the first reply audio")
    chat, status = handlers.stop(session)

    assert status.startswith("Stopped") and session.conversation.phase is Phase.STOPPED
    assert tab.link.closed.is_set() and handlers.tokens.claim(token) is None, "the link and its token are done"
    [user_wav] = messages(chat, "user")
    reply_mp3, *_, figures = messages(chat, "assistant")
    assert "stopped" in figures and 0 < mp3_seconds(reply_mp3["path"]) < wav_seconds(user_wav["path"])
    wait_for(lambda: not fetch_health(echo_url).busy, timeout=3, what="the server to be freed for the next request")
    assert tab.texts("reply_end") == [], "the cancelled reply has no end to play"
    tab.link.played(1, 10**6, complete=True)
    assert session.conversation.history == chat and session.conversation.phase is Phase.STOPPED, (
        "a late playback report files nothing twice and starts nothing again"
    )


def test_the_pages_own_stop_keeps_what_was_heard_and_says_stopped(
    tmp_path: Path, question: np.ndarray, echo_url: str
) -> None:
    """What live.js does on Stop: it flushes the player, whose report (`played`, complete=False) goes out
    before `stop`; the reply is cancelled and filed with the audio that was heard."""
    handlers, session = Handlers(Backend(server_url=echo_url)), new_session(tmp_path)
    tab = Tab.opened(handlers, session)
    tab.talk(question)
    tab.wait(lambda: len(tab.audio(1)) > 2 * 12_000, "half a second of reply")
    tab.link.played(1, 12_000, complete=False)
    tab.link.close()  # the page's {"type": "stop"}, as the route handles it

    assert session.conversation.phase is Phase.STOPPED and tab.status.startswith("Stopped")
    reply_mp3, *_, figures = messages(session.conversation.history, "assistant")
    assert abs(mp3_seconds(reply_mp3["path"]) - 0.5) < 0.1 and "stopped after 0.5 s" in figures
    wait_for(lambda: not fetch_health(echo_url).busy, timeout=3, what="the server to be freed for the next request")
    assert tab.texts("reply_end") == [], "the cancelled reply has no end to play"


def test_a_queued_turn_that_is_stopped_leaves_the_line_at_once(tmp_path: Path, question: np.ndarray) -> None:
    """Stop (or a cut-in, or a lost socket) while the turn waits behind another tab's: the client drops its
    connection at once (it used to wait in a blocking read for the server's next bytes, up to a second in
    line and the model's whole first step while served), so the server's line shrinks at once."""
    with serving_engine(EchoEngine(thinking_s=3.0, realtime=True, max_batch=1)) as slow_url:  # one at a time
        handlers = Handlers(Backend(server_url=slow_url))
        first = Tab.opened(handlers, new_session(tmp_path / "first"))
        first.talk(question)
        wait_for(lambda: fetch_health(slow_url).busy, what="the server to take the first turn")
        second_session = new_session(tmp_path / "second")
        second = Tab.opened(handlers, second_session)
        second.talk(question)
        wait_for(lambda: fetch_health(slow_url).waiting == 1, what="the second turn to queue")
        second.link.close()  # the page's {"type": "stop"}
        assert "stopped" in messages(second_session.conversation.history, "assistant")[-1]
        wait_for(lambda: fetch_health(slow_url).waiting == 0, timeout=0.5, what="the stopped turn to leave the line")
        first.link.close()


@pytest.mark.slow
def test_the_user_cuts_in_over_the_reply(tmp_path: Path, question: np.ndarray, echo_url: str) -> None:
    handlers, session = Handlers(Backend(server_url=echo_url)), new_session(tmp_path)
    tab = Tab.opened(handlers, session)
    tab.talk(question)
    tab.wait(lambda: len(tab.audio(1)) > 2 * 12_000, "half a second of reply")
    assert tab.status == "Speaking… talk to cut in."

    words = trim(speak("Wait, tell me about the weather instead."))
    rest = tab.hear(join(silence(0.3), words, silence(1.5)), until=lambda: bool(tab.texts("flush")))
    assert tab.texts("flush") == [{"type": "flush", "turn": 1}], "the page is told to silence that reply"
    assert session.conversation.phase is Phase.INTERRUPTED and tab.status.startswith("You cut in")
    flushed_at = len(tab.frames(1))

    tab.link.played(1, 12_000, complete=False)  # what the player had played when it was flushed
    reply_mp3, *_, figures = messages(session.conversation.history, "assistant")
    assert abs(mp3_seconds(reply_mp3["path"]) - 0.5) < 0.1, "the history keeps what was heard"
    assert "you cut in after 0.5 s" in figures

    tab.hear(rest, until=lambda: len(tab.texts("turn")) == 2)
    assert tab.texts("turn")[-1]["turn"] == 2, "the words that cut in are the next turn"
    tab.reply(2)
    assert len(tab.frames(1)) == flushed_at, "nothing more of the silenced reply is sent"
    assert wav_seconds(tab.user_wav(2)) > len(words) / 16_000, "the turn that cut in keeps its first syllable"


@pytest.mark.slow
def test_without_barge_in_talking_over_the_reply_does_not_cut_it(
    tmp_path: Path, question: np.ndarray, echo_url: str
) -> None:
    handlers, session = Handlers(Backend(server_url=echo_url)), new_session(tmp_path)
    handlers.options_changed(None, "quick", True, 1.0, 0.3, False)  # before the page has loaded: nothing to change
    handlers.options_changed(session, "balanced", True, 0.8, 0.25, False)
    tab = Tab.opened(handlers, session)
    tab.talk(question)
    tab.wait(lambda: bool(tab.frames(1)), "the first reply audio")
    assert tab.status == "Speaking…"
    tab.hear(trim(speak("Wait, tell me about the weather instead.")))
    assert tab.texts("flush") == [] and session.conversation.phase is Phase.SPEAKING
    tab.play(1)
    assert "cut in" not in messages(session.conversation.history, "assistant")[-1]


@pytest.mark.slow
def test_two_tabs_keep_their_own_turns(tmp_path: Path, long_question: np.ndarray, echo_url: str) -> None:
    handlers = Handlers(Backend(server_url=echo_url))
    tabs = [Tab.opened(handlers, new_session(tmp_path / "a")), Tab.opened(handlers, new_session(tmp_path / "b"))]
    speeches = [speak("Good morning."), long_question]
    streams = [list(mic_frames(join(silence(0.5), speech, silence(2.0)))) for speech in speeches]
    for index in range(max(map(len, streams))):
        for tab, stream in zip(tabs, streams):
            if index < len(stream) and not tab.texts("turn"):
                tab.link.hear(stream[index])
    assert all(tab.texts("turn") for tab in tabs), "each tab's turn ends"

    for tab, speech in zip(tabs, speeches):
        heard_s = wav_seconds(tab.user_wav(1))
        assert len(speech) / 16_000 < heard_s < len(speech) / 16_000 + 0.8
        assert abs(reply_seconds(tab.reply(1)) - heard_s) < 0.05, "each tab hears the reply to its own turn"
        assert [r for r in tab.received if isinstance(r.message, bytes)] == [r for _, r in tab.frames(1)]
        assert len(tab.conversation.history) == 1, "one user turn each, the reply not yet played"
    assert tabs[0].session.files.folder != tabs[1].session.files.folder


def test_a_closed_tab_ends_its_conversation_and_leaves_nothing_behind(tmp_path: Path) -> None:
    """Gradio's delete callback for a tab that has gone: no token, no link, no audio left."""
    handlers, session = Handlers(Backend(server_url=f"http://127.0.0.1:{free_port()}")), new_session(tmp_path)
    tab = Tab.opened(handlers, session)
    token = handlers.tokens.issue(session)
    handlers.close_session(None)  # a tab that never loaded
    handlers.close_session(session)
    assert tab.link.closed.is_set() and session.conversation.phase is Phase.STOPPED
    assert handlers.tokens.claim(token) is None and not session.files.folder.exists()


def test_a_frame_that_is_not_audio_is_refused(tmp_path: Path) -> None:
    handlers = Handlers(Backend(server_url=f"http://127.0.0.1:{free_port()}"))
    tab = Tab.opened(handlers, new_session(tmp_path))
    for frame in (b"\x00\x01\x02", b"", bytes(2 * wire.MAX_MIC_FRAME_SAMPLES + 2)):
        with pytest.raises(wire.ProtocolError):
            tab.link.hear(frame)
    assert tab.conversation.phase is Phase.LISTENING and tab.received == [], "the refused frames changed nothing"


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_tab_waiting_for_the_server_says_it_is_queued(
    tmp_path: Path, question: np.ndarray, long_question: np.ndarray
) -> None:
    with serving_engine(EchoEngine(thinking_s=0.05, realtime=True, max_batch=1)) as one_at_a_time:
        tab_waits_for_another(Handlers(Backend(server_url=one_at_a_time)), tmp_path, question, long_question)


def tab_waits_for_another(handlers: Handlers, tmp_path: Path, question: np.ndarray, long_question: np.ndarray) -> None:
    first = Tab.opened(handlers, new_session(tmp_path / "a"))
    second = Tab.opened(handlers, new_session(tmp_path / "b"))
    first.talk(long_question)
    first.wait(lambda: bool(first.frames(1)), "the first tab's reply audio")  # the server is busy with it now
    second.talk(question)
    wait_for(
        lambda: second.status.startswith("Queued: the model server is answering another conversation first"),
        timeout=REPLY_WAIT_S,
        what="the second tab to say it is queued",
    )
    assert second.reply(1), "and then it is answered"
    assert all(received.status.startswith("Speaking") for _, received in second.frames(1))
    first.reply(1)


def follow(outputs: AsyncIterator[ConversationView], into: list[ConversationView]) -> threading.Thread:
    """Run an async streaming handler (Handlers.start) to its end on an event loop of its own, as Gradio would,
    collecting what it yields into `into`."""

    async def run() -> None:
        async for output in outputs:
            into.append(output)

    follower = threading.Thread(target=asyncio.run, args=(run(),), daemon=True)
    follower.start()
    return follower


def drain(outputs: AsyncIterator[ConversationView], into: list[ConversationView], timeout: float) -> None:
    """Run a streaming handler to its end; fail if it does not end in time."""
    follower = follow(outputs, into)
    follower.join(timeout)
    assert not follower.is_alive(), "the handler never ended"


@pytest.mark.slow
def test_start_hands_the_page_a_token_then_follows_the_conversation_until_it_stops(
    tmp_path: Path, question: np.ndarray, echo_url: str
) -> None:
    handlers, session = Handlers(Backend(server_url=echo_url)), new_session(tmp_path)
    outputs: list[ConversationView] = []
    follower = follow(handlers.start(session), outputs)
    wait_for(lambda: bool(outputs), what="the token")
    token, chat, status = outputs.pop(0)
    assert len(token) >= 40 and skipped(chat) and status.startswith("Opening")
    assert handlers.tokens.claim(token) is session, "the page's hello finds this tab's session"

    tab = Tab.opened(handlers, session)
    second_click: list[ConversationView] = []
    drain(handlers.start(session), second_click, timeout=5)
    assert second_click == [], "a second click while it runs does nothing"
    # The tab talks faster than real time: let the follower see it listening first (it looks every 50 ms).
    wait_for(lambda: bool(outputs), what="the listening line")
    tab.talk(question)
    tab.play(1)
    tab.link.close()
    follower.join(timeout=5)
    assert not follower.is_alive(), "the follower ends with the conversation"

    assert outputs and all(skipped(out.token) for out in outputs), "the token is handed out once"
    statuses = [out.status for out in outputs]
    assert statuses[0].startswith("Listening") and statuses[-1].startswith("Stopped")
    speaking = [out.chatbot for out in outputs if out.status.startswith("Speaking")]
    assert speaking and speaking[0][-1]["content"].startswith("(echo)"), "the reply's text shows as it streams"
    final_chat = outputs[-1].chatbot
    assert len(messages(final_chat, "user")) == 1 and len(messages(final_chat, "assistant")) == 3
    assert all(a != b for a, b in zip(outputs, outputs[1:])), "only changes are sent to the page"


def test_the_follower_shows_the_reply_a_lost_link_stopped(
    tmp_path: Path, question: np.ndarray, echo_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The socket is lost mid-reply (no Stop click, so no `stop` handler output to refresh the chat): the route
    calls `link.close(notice)`, which moves the conversation to STOPPED (waking the follower) and then files
    the reply. The follower waits for the link to be closed, so its last view has that reply, its text and
    its figures. Filing is held back here until the follower has ended (or half its grace), so a follower that
    did not wait would be caught whatever the timing."""
    handlers, session = Handlers(Backend(server_url=echo_url)), new_session(tmp_path)
    outputs: list[ConversationView] = []
    follower = follow(handlers.start(session), outputs)
    wait_for(lambda: bool(outputs), what="the token")
    file_reply = live_link.file_reply

    def file_once_the_follower_is_done(*args: object) -> None:
        follower.join(timeout=app.STOP_GRACE_S / 2)  # one that waits for the filing holds out; a racing one ends
        file_reply(*args)

    monkeypatch.setattr(live_link, "file_reply", file_once_the_follower_is_done)
    tab = Tab.opened(handlers, session)
    tab.talk(question)
    tab.wait(lambda: bool(tab.frames(1)), "the first reply audio")
    tab.link.close("The live audio connection closed.")  # what the route does when the socket is lost
    follower.join(timeout=5)
    assert not follower.is_alive()
    assert "stopped" in session.conversation.history[-1]["content"], "the history has the stopped reply"
    assert outputs[-1].chatbot == session.conversation.history, "and so should the page's chat"


def test_start_says_so_when_the_page_opens_no_link(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app, "CONNECT_TIMEOUT_S", 0.3)
    handlers, session = Handlers(Backend(server_url=f"http://127.0.0.1:{free_port()}")), new_session(tmp_path)
    outputs: list[ConversationView] = []
    drain(handlers.start(session), outputs, timeout=5)
    opening, failed = outputs
    assert failed.token == "" and skipped(failed.chatbot)
    assert "could not open its live audio connection" in failed.status and "Start" in failed.status
    assert handlers.tokens.claim(opening.token) is None, "the unused token is revoked"
    assert session.conversation.phase is Phase.IDLE


@pytest.mark.slow
def test_the_launched_server_reports_progress_restarts_when_it_dies_and_stops_with_the_app() -> None:
    backend = Backend(server_url=None, engine="echo")
    try:
        backend.start()
        deadline = time.monotonic() + 60
        while not backend.ready:
            assert time.monotonic() < deadline, backend.status_line()
            time.sleep(0.1)
        assert backend.status_line().startswith("Model server ready: echo engine, local server")
        crashed = backend.server_pid
        assert crashed is not None
        os.kill(crashed, signal.SIGKILL)  # as a crash would
        assert processes.wait_gone(crashed, timeout_s=5)
        new_url = backend.url_for_request()  # a turn after the crash restarts it first
        wait_for(lambda: fetch_health(new_url).status.value == "ready", timeout=30, what="the restarted server")
        restarted = backend.server_pid
        assert restarted is not None and restarted != crashed and not processes.gone(restarted)
    finally:
        backend.close()
    assert processes.wait_gone(restarted, timeout_s=10), "closing the app stops the server"


@pytest.mark.slow
def test_without_its_end_of_turn_model_the_page_says_turns_end_on_silence(tmp_path: Path, echo_url: str) -> None:
    missing = SharedTurnModel(tmp_path / "absent.onnx", fetch=False).load_now()
    handlers = Handlers(Backend(server_url=echo_url), turn_model=missing)
    opened = handlers.page_loaded()
    session = opened.session
    assert "End of turn: after a pause of silence. The end-of-turn model is unavailable (" in opened.server
    outputs: list[ConversationView] = []
    follower = follow(handlers.start(session), outputs)
    wait_for(lambda: bool(outputs), what="the token")
    Tab.opened(handlers, session)
    wait_for(lambda: len(outputs) > 1, what="the listening line")
    assert outputs[-1].status.startswith("Listening") and "unavailable" in outputs[-1].status
    assert outputs[-1].status.endswith("your turn ends after 0.8 s of silence.)")
    handlers.stop(session)
    follower.join(timeout=5)

    handlers.options_changed(session, "balanced", False, 0.8, 0.25, True)
    assert session.conversation.options.semantic is False
    assert "unavailable" not in handlers.stop(session).status, "no such note when the model is turned off"


@pytest.mark.slow
def test_a_turn_the_model_ended_too_soon_is_cut_in_on_and_answered_whole(tmp_path: Path, echo_url: str) -> None:
    """The model judges every pause finished (scripted): "I would like to" is answered, the user goes on, that
    reply is silenced, and the next turn holds the whole sentence."""
    handlers = Handlers(Backend(server_url=echo_url))
    session = Session(conversation=Conversation(completion=lambda audio: 0.9), files=TurnFiles(tmp_path))
    tab = Tab.opened(handlers, session)
    first, rest = trim(speak("I would like to")), trim(speak("book a table for two."))
    tab.hear(join(silence(0.5), first, silence(0.9), rest, silence(2.0)), until=lambda: len(tab.texts("turn")) == 2)
    assert [message["turn"] for message in tab.texts("flush")] == [1], "the early answer is silenced"
    whole = wav_seconds(tab.user_wav(2))
    assert whole > (len(first) + len(rest)) / 16_000 + 0.9, "the second turn holds the first words too"
    tab.play(2)


@pytest.mark.slow
def test_the_chat_api_refuses_what_is_not_a_question_in_a_sentence(tmp_path: Path, echo_url: str) -> None:
    """Checked before anything is decoded: a 60 KB WAV whose header says 1 Hz once resampled to gigabytes."""
    import resource

    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    handlers = Handlers(Backend(server_url=echo_url))
    one_hertz = write_wav(tmp_path / "one_hertz.wav", np.zeros(30_000, np.float32), rate=1)
    ten_minutes = write_wav(tmp_path / "ten_minutes.wav", np.zeros(600 * 8_000, np.float32), rate=8_000)
    text = tmp_path / "notes.wav"
    text.write_text("these are my notes, not a recording")
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for path, sentence in [
        (one_hertz, "sample rate is 1 Hz; rates from 8 to 96 kHz are supported"),
        (ten_minutes, "longer than 30 seconds"),
        (text, "could not be decoded"),
    ]:
        with pytest.raises(gr.Error, match=sentence):
            handlers.api_chat(str(path))
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 100 * 1024, "peak memory grew < 100 MB"
    with pytest.raises(gr.Error, match="Send an audio file"):
        handlers.api_chat(None)

    demo = app.build_demo(handlers)
    port = free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}", verbose=False)
        with pytest.raises(AppError, match="could not be decoded"):
            client.predict(handle_file(str(text)), api_name="/chat")
    finally:
        demo.close()


@pytest.mark.slow
def test_a_frozen_launched_server_is_replaced_and_the_page_says_so() -> None:
    """SIGSTOP: alive but silent. Every turn would fail after 30 s, forever, if only a dead server were replaced."""
    import os
    import signal

    backend = Backend(server_url=None, engine="echo")
    lines: list[str] = []
    try:
        backend.start()
        wait_for(lambda: backend.ready, timeout=60, what="the launched server")
        frozen = backend.server_pid
        os.kill(frozen, signal.SIGSTOP)
        frozen_at = time.monotonic()

        def replaced() -> bool:
            lines.append(backend.status_line())
            return backend.server_pid != frozen and backend.ready

        wait_for(replaced, timeout=30, what="a new server")
        assert time.monotonic() - frozen_at < 15, "replaced within 15 s"
        assert any("stopped answering" in line for line in lines), lines
        assert fetch_health(backend.url_for_request()).status.value == "ready"
    finally:
        backend.close()


@pytest.mark.slow
def test_a_single_threaded_server_busy_with_our_reply_is_not_reported_unreachable(tmp_path: Path) -> None:
    """The original mini-omni server answers one connection at a time: during a long reply our health check
    waits in its backlog and times out. That is the server working for us, not a problem to show."""
    import backend as backend_module

    script = Script(Behaviour.STREAM, pieces=[b"\x00\x10" * 2400] * 40, delay_s=0.2)  # 8 s of reply
    with ReferenceServer(script) as server:
        backend = Backend(server_url=server.url)
        try:
            backend.start()
            wait_for(lambda: "Using the model server" in backend.status_line(), timeout=10, what="its first check")
            lines: list[str] = []
            replying = threading.Thread(
                target=whole_reply,
                args=(
                    backend,
                    wav_bytes(np.zeros(16_000, np.float32)),
                    lambda: tmp_path / "reply.mp3",
                    ReplySettings(),
                ),
            )
            replying.start()
            while replying.is_alive():
                lines.append(backend.status_line())
                time.sleep(0.2)
        finally:
            backend.close()
    assert backend_module.WATCH_INTERVAL_S * 3 < 8, "several health checks ran during the reply"
    assert not any("problem" in line for line in lines), set(lines)


@pytest.mark.slow
def test_a_question_asked_while_the_model_loads_is_answered_once_it_is_ready(
    tmp_path: Path, question: np.ndarray
) -> None:
    with serving_while_loading("loading weights") as (url, release):
        handlers = Handlers(Backend(server_url=url))
        tab = Tab.opened(handlers, new_session(tmp_path / "a"))
        tab.talk(question)
        wait_for(
            lambda: tab.status.startswith("Waiting for the model to load (mini-omni: loading weights)"),
            timeout=REPLY_WAIT_S,
            what="the page to say it waits for the model",
        )
        release.set()
        assert reply_seconds(tab.play(1)) > 1.0, "answered once the model is ready"
        assert tab.conversation.notice is None and "failed" not in str(tab.conversation.history)

    with serving_while_loading("downloading 120 of 900 MB") as (url, release):
        handlers = Handlers(Backend(server_url=url))
        session = new_session(tmp_path / "b")
        tab = Tab.opened(handlers, session)
        tab.talk(question)
        wait_for(lambda: "downloading 120 of 900 MB" in tab.status, timeout=REPLY_WAIT_S, what="the wait")
        handlers.stop(session)
        wait_for(lambda: not fetch_health(url).busy, timeout=10, what="Stop to free the waiting server")
        assert session.conversation.phase is Phase.STOPPED


@pytest.mark.slow
def test_api_replies_are_removed_after_their_time_to_live(
    tmp_path: Path, question: np.ndarray, echo_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    handlers = Handlers(Backend(server_url=echo_url), files_root=tmp_path)
    wav = write_wav(tmp_path / "question.wav", question)
    first, _ = handlers.api_chat(str(wav))
    monkeypatch.setattr(app, "FILE_TTL_S", 0.0)  # every reply is old by the next one
    second, _ = handlers.api_chat(str(wav))
    assert not Path(first).exists() and Path(second).exists()
