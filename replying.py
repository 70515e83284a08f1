"""Answering one heard turn: send it, stream the reply, file both sides in the history. No Gradio in here.

`answer` hands each piece of reply audio on the moment it is read (nothing is held back beyond one server
read of at most 4096 bytes, 85 ms) and moves the conversation through its phases. A reply with audio is
filed once the browser has stopped playing it, with the audio the user actually heard (see state.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Generator
from contextlib import AbstractContextManager, closing
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import omni_client
from audio_files import TurnFiles, encode_mp3
from history import TurnFigures, assistant_turn, user_turn
from omni_server.audio_decode import UndecodableAudio, decode_audio_file
from omni_server.engine import MAX_INPUT_SECONDS
from omni_server.protocol import INPUT_SAMPLE_RATE, OUTPUT_SAMPLE_RATE
from state import Conversation, HeardTurn, Reply
from vad import VAD_SAMPLE_RATE

log = logging.getLogger(__name__)


class ModelServer(Protocol):
    """What answering needs from the backend (backend.Backend in the app, a plain URL holder in tests)."""

    def url_for_request(self) -> str: ...

    def answering(self) -> AbstractContextManager[None]:
        """Held while a reply is requested and streamed: a server busy with it may not answer health checks."""
        ...

    @property
    def description(self) -> str: ...


@dataclass(frozen=True)
class ReplySettings:
    """stall_timeout_s: no reply bytes for this long is a failure (mini-omni on a 2-core CPU needs ~7 s for
    its first piece, so the default leaves room). connect_timeout_s: for reaching the server at all."""

    stall_timeout_s: float = 30.0
    connect_timeout_s: float = 5.0


def file_user_turn(conversation: Conversation, heard: HeardTurn, files: TurnFiles) -> None:
    wav = files.user_wav(heard.number, heard.utterance.audio, VAD_SAMPLE_RATE)
    conversation.add_messages(user_turn(wav))


def file_reply(conversation: Conversation, reply: Reply, files: TurnFiles) -> None:
    """Put the reply, complete or not, into the history: one MP3 of the audio the user heard, its text, its
    figures, and in words what cut it short."""
    heard = reply.heard_pcm
    heard_s = len(heard) / 2 / OUTPUT_SAMPLE_RATE
    outcome = _outcome(reply, heard_s)
    mp3 = None
    if heard:
        try:
            mp3 = files.reply_mp3(reply.turn.number, heard, OUTPUT_SAMPLE_RATE)
        except OSError as error:  # e.g. a full disk: the text and figures still go into the chat
            log.warning("could not save the reply's audio: %s", error)
            unsaved = f"the reply's audio could not be saved ({error.strerror or error})"
            outcome = f"{outcome}; {unsaved}" if outcome else unsaved
    figures = TurnFigures(to_first_audio_s=reply.seconds_to_first_audio, reply_s=heard_s, outcome=outcome)
    conversation.add_messages(*assistant_turn(mp3, reply.text, figures))


def end_conversation(conversation: Conversation, files: TurnFiles, notice: str | None = None) -> None:
    """Stop the conversation (`notice`: why, when it was not the user) and keep every reply it cut short."""
    for reply in conversation.stop(notice):
        file_reply(conversation, reply, files)


def _outcome(reply: Reply, heard_s: float) -> str | None:
    if reply.interrupted:
        return f"you cut in after {heard_s:.1f} s" if heard_s else "you cut in before it began"
    if reply.failure is not None:
        return ("cut short: " if reply.pcm else "failed: ") + reply.failure
    return f"stopped after {heard_s:.1f} s" if reply.stopped else None


def answer(
    conversation: Conversation,
    reply: Reply,
    server: ModelServer,
    files: TurnFiles,
    play: Callable[[bytes], None],
    settings: ReplySettings = ReplySettings(),
) -> None:
    """Stream the reply to `reply.turn`, handing each piece of audio to `play` the moment it is read.
    A failure ends in a sentence (the conversation's notice and the filed turn), never an exception."""
    failure: str | None = None
    try:
        wav = omni_client.utterance_wav(reply.turn.utterance.audio, VAD_SAMPLE_RATE)
        reply.requested_at = time.monotonic()
        # closing(): a cancelled reply (Stop, a cut-in) drops its request at once, freeing the server
        with closing(_request_reply(server, wav, settings, cancel=reply.cancel)) as stream:
            for piece in stream:
                if isinstance(piece, omni_client.ReplyAudio):
                    if not conversation.reply_audio(reply, piece.pcm):
                        return  # stopped or cut in on: whoever did that files the reply
                    play(piece.pcm)
                elif isinstance(piece, omni_client.ReplyText):
                    conversation.reply_text(reply, piece.text)
                elif isinstance(piece, omni_client.ReplyQueued):
                    conversation.queued(reply, piece.ahead)
                elif isinstance(piece, omni_client.ReplyLoading):
                    conversation.loading(reply, piece.step)
    except omni_client.ReplyError as error:
        failure = error.message
    except Exception:  # a bug, not the server: still a sentence, a kept turn and a conversation that goes on
        log.exception("answering turn %d failed", reply.turn.number)
        failure = "Something went wrong in the app while answering (the details are in its log)."
    if reply.cancel.is_set():
        return
    done = conversation.finish_reply(reply, failure)
    if done is not None:  # no audio to play: the reply is over now
        file_reply(conversation, done, files)


def _request_reply(
    server: ModelServer, wav: bytes, settings: ReplySettings, cancel: threading.Event | None = None
) -> Generator[omni_client.ReplyEvent, None, None]:
    """The one way the app asks for a reply: the settings' timeouts, and the reply's text when the server has it."""
    with server.answering():
        yield from omni_client.stream_reply(
            server.url_for_request(),
            wav,
            stall_timeout_s=settings.stall_timeout_s,
            connect_timeout_s=settings.connect_timeout_s,
            stream_text=True,
            cancel=cancel,
        )


def whole_reply(
    server: ModelServer,
    question: bytes,
    mp3_path_for: Callable[[], Path],
    settings: ReplySettings,
) -> tuple[Path | None, str]:
    """For programs (the `chat` API): one whole question (an audio file's bytes) in; the reply's MP3 (None
    without audio) and text out. The file is decoded as the server decodes requests (bounded: see
    omni_server.audio_decode). Raises UndecodableAudio, DecoderUnavailable or omni_client.ReplyError, each
    with a plain sentence."""
    samples = decode_audio_file(question, max_seconds=MAX_INPUT_SECONDS)
    if samples.size == 0:
        raise UndecodableAudio("The audio file contains no sound samples.")
    wav = omni_client.utterance_wav(samples, INPUT_SAMPLE_RATE)
    pcm, text = bytearray(), ""
    with closing(_request_reply(server, wav, settings)) as stream:
        for piece in stream:
            if isinstance(piece, omni_client.ReplyAudio):
                pcm += piece.pcm
            elif isinstance(piece, omni_client.ReplyText):
                text += piece.text
    if not pcm:
        return None, text
    path = mp3_path_for()
    path.write_bytes(encode_mp3(bytes(pcm), OUTPUT_SAMPLE_RATE))
    return path, text
