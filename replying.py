"""Answering one heard turn: send it, stream the reply, file both sides in the history. No Gradio in here.

`answer` is a generator of `Progress` steps; app.py maps each step onto the page (a reply chunk to the
player, the status line, the chat, a warning, a microphone click). Each piece of reply audio is passed on
the moment it is read, so nothing is held back beyond one server read.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

import omni_client
from audio_files import TurnFiles, encode_mp3, wav_bytes
from history import TurnFigures, assistant_turn, user_turn
from state import Conversation, HeardTurn, Phase, Reply
from vad import VAD_SAMPLE_RATE, to_mono_float

log = logging.getLogger(__name__)


class ModelServer(Protocol):
    """What answering needs from the backend (backend.Backend in the app, a plain URL holder in tests)."""

    def url_for_request(self) -> str: ...

    @property
    def description(self) -> str: ...


@dataclass(frozen=True)
class ReplySettings:
    """stall_timeout_s: no reply bytes for this long is a failure (mini-omni on a 2-core CPU needs ~7 s for
    its first piece, so the default leaves room). connect_timeout_s: for reaching the server at all."""

    stall_timeout_s: float = 30.0
    connect_timeout_s: float = 5.0


@dataclass(frozen=True)
class Progress:
    status: str | None  # None: the status line stays as it is
    audio: bytes | None = None  # a WAV chunk (16-bit PCM) for the streaming player
    history_changed: bool = False
    warning: str | None = None
    rearm_mic: bool = False  # nothing is left to play: the microphone can record the next turn now


LISTENING_STATUS = "Listening… speak, then pause."

# 43 ms of silence in front of the reply's first piece, for the browser's player only (not the history).
# Gradio re-encodes a streamed reply to AAC with ffmpeg, which emits its first frame only after more than 2048
# samples; a first piece of one 4096-byte read (2048 samples) therefore makes an empty first segment, and the
# browser's player then waits about 1 s for its next playlist check before it starts (bench/reply_path.py).
PLAYER_LEAD_IN = bytes(2 * 1024)


def file_user_turn(conversation: Conversation, heard: HeardTurn, files: TurnFiles) -> None:
    wav = files.user_wav(heard.number, heard.utterance.audio, VAD_SAMPLE_RATE)
    conversation.add_messages(user_turn(wav))


def file_reply(conversation: Conversation, reply: Reply, files: TurnFiles, outcome: str | None) -> None:
    """Put the reply, complete or not, into the history: one MP3 of all its audio, its text, its figures."""
    mp3 = None
    if reply.pcm:
        try:
            mp3 = files.reply_mp3(reply.turn.number, bytes(reply.pcm), omni_client.REPLY_SAMPLE_RATE)
        except OSError as error:  # e.g. a full disk: the text and figures still go into the chat
            log.warning("could not save the reply's audio: %s", error)
            unsaved = f"the reply's audio could not be saved ({error.strerror or error})"
            outcome = f"{outcome}; {unsaved}" if outcome else unsaved
    figures = TurnFigures(
        to_first_audio_s=reply.seconds_to_first_audio,
        reply_s=len(reply.pcm) / 2 / omni_client.REPLY_SAMPLE_RATE,
        outcome=outcome,
    )
    conversation.add_messages(*assistant_turn(mp3, reply.text, figures))


def answer(
    conversation: Conversation,
    reply: Reply,
    server: ModelServer,
    files: TurnFiles,
    settings: ReplySettings = ReplySettings(),
) -> Iterator[Progress]:
    """Stream the reply to `reply.turn`. Failures end in a warning and a filed turn, never an exception."""
    seconds = reply.turn.utterance.duration_s
    error: str | None = None
    try:
        yield Progress(f"Thinking… ({seconds:.1f} s of speech sent to {server.description})")
        wav = omni_client.utterance_wav(reply.turn.utterance.audio, VAD_SAMPLE_RATE)
        stream = _request_reply(server, wav, settings, cancel=reply.cancel)
        # closing(): when Gradio closes this generator (Stop), the request is dropped at once, freeing the server
        with closing(stream):
            yield from _stream_to_player(conversation, reply, stream, server.description)
    except omni_client.ReplyError as failure:
        error = failure.message
    except Exception:  # a bug, not the server: still a sentence, a kept turn and a microphone that re-arms
        log.exception("answering turn %d failed", reply.turn.number)
        error = "Something went wrong in the app while answering (the details are in its log)."
    if reply.cancel.is_set() or not conversation.finish_reply(reply):
        return
    outcome = None if error is None else ("cut short: " if reply.pcm else "failed: ") + error
    file_reply(conversation, reply, files, outcome)
    if error is not None:
        status = f"{error} Your turn is kept in the chat; speak again when you are ready."
        yield Progress(status, history_changed=True, warning=error, rearm_mic=conversation.phase is Phase.LISTENING)
    elif conversation.phase is Phase.LISTENING:  # a reply without audio: nothing to wait for
        yield Progress(LISTENING_STATUS, history_changed=True, rearm_mic=True)
    else:
        yield Progress(f"Speaking… ({server.description})", history_changed=True)


def _request_reply(
    server: ModelServer, wav: bytes, settings: ReplySettings, cancel: threading.Event | None = None
) -> Iterator[omni_client.ReplyEvent]:
    """The one way the app asks for a reply: the settings' timeouts, and the reply's text when the server has it."""
    return omni_client.stream_reply(
        server.url_for_request(),
        wav,
        stall_timeout_s=settings.stall_timeout_s,
        connect_timeout_s=settings.connect_timeout_s,
        stream_text=True,
        cancel=cancel,
    )


def _stream_to_player(
    conversation: Conversation, reply: Reply, stream: Iterator[omni_client.ReplyEvent], server: str
) -> Iterator[Progress]:
    """Each piece of reply audio to the player the moment it is read; text and queue news to the state."""
    for piece in stream:
        if isinstance(piece, omni_client.ReplyAudio):
            first = reply.first_audio_at is None
            if not conversation.reply_audio(reply, piece.pcm):
                return  # stopped: the Stop handler files what arrived
            pcm = PLAYER_LEAD_IN + piece.pcm if first else piece.pcm
            status = f"Speaking… ({server})" if first else None
            yield Progress(status, audio=wav_bytes(pcm, omni_client.REPLY_SAMPLE_RATE))
        elif isinstance(piece, omni_client.ReplyText):
            conversation.reply_text(reply, piece.text)
        elif isinstance(piece, omni_client.ReplyQueued):
            if piece.ahead > 0:
                conversation.queued(reply)
                yield Progress(f"Queued: the model server is answering {_conversations(piece.ahead)} first…")
            elif conversation.unqueued(reply):
                yield Progress(f"Thinking… (your turn is being answered: {server})")


def _conversations(count: int) -> str:
    return "another conversation" if count == 1 else f"{count} other conversations"


def whole_reply(
    server: ModelServer,
    sample_rate: int,
    samples: np.ndarray,
    mp3_path_for: Callable[[], Path],
    settings: ReplySettings,
) -> tuple[Path | None, str]:
    """For programs (the `chat` API): one whole question in; the reply's MP3 (None without audio) and text out.
    Raises omni_client.ReplyError with a plain sentence when the server fails."""
    wav = omni_client.utterance_wav(to_mono_float(samples), sample_rate)
    pcm, text = bytearray(), ""
    for piece in _request_reply(server, wav, settings):
        if isinstance(piece, omni_client.ReplyAudio):
            pcm += piece.pcm
        elif isinstance(piece, omni_client.ReplyText):
            text += piece.text
    if not pcm:
        return None, text
    path = mp3_path_for()
    path.write_bytes(encode_mp3(bytes(pcm), omni_client.REPLY_SAMPLE_RATE))
    return path, text
