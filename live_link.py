"""One tab's live conversation as the app sees it: microphone frames in, reply audio and control messages out.

The WebSocket route (live_route.py) owns the socket and calls in here from worker threads; everything here is
plain Python with a `send` callable, so tests drive it without a browser or a socket. Each reply is streamed
on a thread of its own, so a slow model never holds up the microphone.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Protocol

import live_protocol as wire
from audio_files import TurnFiles
from replying import ModelServer, ReplySettings, answer, end_conversation, file_reply, file_user_turn
from state import Conversation, CutIn, HeardTurn, Phase, Reply

log = logging.getLogger(__name__)

Send = Callable[[str | bytes], None]  # queue one message for the page; never blocks
# After a reply's last audio the page says when it has played it. If it never does (its audio device went
# away, say), the reply counts as played this long after it would have ended, so the turn cannot hang.
PLAYED_GRACE_S = 5.0


class LiveSession(Protocol):
    """What a link needs of a tab's session (app.Session)."""

    conversation: Conversation
    files: TurnFiles


class LiveLink:
    def __init__(self, session: LiveSession, server: ModelServer, settings: ReplySettings, send: Send) -> None:
        self._session = session
        self._server = server
        self._settings = settings
        self._send = send
        self.closed = threading.Event()

    @property
    def conversation(self) -> Conversation:
        return self._session.conversation

    def open(self) -> bool:
        """The page's microphone stream begins: a new conversation, listening (False if one is going on)."""
        return self.conversation.start()

    def hear(self, frame: bytes) -> None:
        """One microphone frame. Raises live_protocol.ProtocolError for a frame that is not audio."""
        samples = wire.mic_samples(frame)
        if self.closed.is_set():
            return
        event = self.conversation.hear(wire.MIC_SAMPLE_RATE, samples)
        if isinstance(event, HeardTurn):
            self._answer(event)
        elif isinstance(event, CutIn):
            self._send(wire.server_message("flush", turn=event.reply.turn.number))

    def sounding(self, turn: int, after_s: float) -> None:
        if not self.closed.is_set():
            self.conversation.sounding(turn, after_s)

    def played(self, turn: int, samples: int, complete: bool) -> None:
        if self.closed.is_set():
            return
        reply = self.conversation.playback_over(turn, samples, complete)
        if reply is not None:
            file_reply(self.conversation, reply, self._session.files)

    def close(self, notice: str | None = None) -> None:
        """The conversation ends (Stop, or the socket closed): cancel the reply, keep everything in the chat."""
        if self.closed.is_set():
            return
        try:
            end_conversation(self.conversation, self._session.files, notice)
        finally:
            self.closed.set()

    def _answer(self, heard: HeardTurn) -> None:
        """Tell the page, file the user's words (a WAV, about 1 ms; first, so the chat keeps its order whatever
        happens to the reply), then stream the reply on a thread of its own."""
        utterance = heard.utterance
        self._send(
            wire.server_message(
                "turn",
                turn=heard.number,
                speech_end_s=round(utterance.speech_end_s, 4),
                utterance_s=round(utterance.duration_s, 4),
            )
        )
        try:
            file_user_turn(self.conversation, heard, self._session.files)
        except OSError as error:  # e.g. a full disk: the turn is still answered, only its file is missing
            log.warning("could not save turn %d: %s", heard.number, error)
            self.conversation.warn(
                f"Your words could not be saved to the chat ({error.strerror or error}); answering anyway."
            )
        reply = self.conversation.start_reply()
        if reply is not None:
            threading.Thread(target=self._stream, args=(reply,), name=f"reply-{heard.number}", daemon=True).start()

    def _stream(self, reply: Reply) -> None:
        turn = reply.turn.number
        answer(
            self.conversation,
            reply,
            self._server,
            self._session.files,
            play=lambda pcm: self._send(wire.reply_frame(turn, pcm)),
            settings=self._settings,
        )
        if reply.cancel.is_set():
            return
        engine_s = reply.engine_first_audio_s
        self._send(
            wire.server_message(
                "reply_end", turn=turn, engine_first_audio_s=None if engine_s is None else round(engine_s, 4)
            )
        )
        if reply.pcm:
            samples = len(reply.pcm) // 2
            deadline = threading.Timer(
                samples / wire.OUTPUT_SAMPLE_RATE + PLAYED_GRACE_S, self.played, (turn, samples, True)
            )
            deadline.daemon = True
            deadline.start()


def status_line(conversation: Conversation, server: str) -> str:
    """The page's one-line state of the conversation, with the last failure in words when there was one."""
    phase, reply = conversation.phase, conversation.reply
    line = {
        Phase.IDLE: "Click **Start** and speak; the answer plays when you pause.",
        Phase.LISTENING: "Listening… speak, then pause.",
        Phase.THINKING: f"Thinking… ({server})",
        Phase.QUEUED: _waiting(reply),
        Phase.SPEAKING: "Speaking… talk to cut in." if conversation.barge_in else "Speaking…",
        Phase.INTERRUPTED: "You cut in: listening…",
        Phase.STOPPED: "Stopped. Click **Start** to talk again.",
    }[phase]
    if conversation.notice and phase is not Phase.QUEUED:
        return f"{conversation.notice} {line}"
    return line


def _waiting(reply: Reply | None) -> str:
    if reply is not None and reply.loading is not None:
        return f"Waiting for the model to load ({reply.loading}); your question is answered as soon as it is ready…"
    return f"Queued: the model server is answering {_others(reply.queue_ahead if reply else 1)} first…"


def _others(count: int) -> str:
    return "another conversation" if count == 1 else f"{count} other conversations"
