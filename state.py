"""Per-session conversation state: one explicit state machine per browser tab, no Gradio in here.

A tab's `Conversation` owns its pause detector, the turn being answered and the chat history, so nothing of
one tab can leak into another. The Gradio handlers in app.py only move it through its phases:

    IDLE --record--> LISTENING --turn ends--> THINKING --first audio--> SPEAKING --playback ends--> LISTENING
                                                 |  ^                      |
                                                 v  |                      +--(failure without audio)--> LISTENING
                                               QUEUED
    any phase --Stop--> STOPPED --record--> LISTENING

Handlers run on Gradio's worker threads (a chunk, a reply and a Stop of one tab can overlap), so every
method takes the conversation's lock, and a move the current phase does not allow is refused, not forced.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from vad import PauseDetector, Utterance, VadOptions


class Phase(enum.Enum):
    IDLE = "idle"  # the microphone is off and no conversation is going on
    LISTENING = "listening"  # recording; microphone chunks go to the pause detector
    THINKING = "thinking"  # the utterance went to the server; no reply audio yet
    QUEUED = "queued"  # the server is answering another conversation first
    SPEAKING = "speaking"  # reply audio is streaming or still playing in the browser
    STOPPED = "stopped"  # the user pressed Stop; nothing re-arms until they record again


_ALLOWED_MOVES: dict[Phase, frozenset[Phase]] = {
    Phase.IDLE: frozenset({Phase.LISTENING, Phase.STOPPED}),
    Phase.LISTENING: frozenset({Phase.LISTENING, Phase.THINKING, Phase.IDLE, Phase.STOPPED}),
    Phase.THINKING: frozenset({Phase.QUEUED, Phase.SPEAKING, Phase.LISTENING, Phase.STOPPED}),
    Phase.QUEUED: frozenset({Phase.THINKING, Phase.SPEAKING, Phase.LISTENING, Phase.STOPPED}),
    Phase.SPEAKING: frozenset({Phase.LISTENING, Phase.STOPPED}),
    Phase.STOPPED: frozenset({Phase.LISTENING, Phase.STOPPED}),
}


class MicAction(enum.Enum):
    """What the browser must do with the microphone; app.py turns it into a click on Gradio's own button."""

    STOP = "stop"
    RECORD = "record"


@dataclass(frozen=True)
class HeardTurn:
    """A finished user turn waiting to be answered. `speech_ended_at` is on the `time.monotonic()` clock."""

    number: int
    utterance: Utterance
    speech_ended_at: float


@dataclass
class Reply:
    """The reply being received for one turn: all of its audio so far (s16le, 24 kHz) and its text."""

    turn: HeardTurn
    cancel: threading.Event = field(default_factory=threading.Event)
    pcm: bytearray = field(default_factory=bytearray)
    text: str = ""
    first_audio_at: float | None = None

    @property
    def seconds_to_first_audio(self) -> float | None:
        if self.first_audio_at is None:
            return None
        return self.first_audio_at - self.turn.speech_ended_at


class Conversation:
    """One tab's conversation. `detector_factory` is injectable so tests can count or replace detectors."""

    def __init__(self, detector_factory: Callable[[VadOptions], PauseDetector] = PauseDetector) -> None:
        self._lock = threading.RLock()
        self._detector_factory = detector_factory
        self._detector: PauseDetector | None = None
        self._heard_s = 0.0  # microphone audio fed since the detector's last reset
        self._turns = 0
        self._mic_commands = 0
        self.phase = Phase.IDLE
        self.heard: HeardTurn | None = None
        self.reply: Reply | None = None
        self.history: list[dict] = []

    # -- listening ---------------------------------------------------------------------------------------

    def listen(self, options: VadOptions) -> bool:
        """Start (or restart) a turn with fresh detector state; refused while a turn waits for its answer
        or a reply is being received (the user may still talk over a reply that is only playing)."""
        with self._lock:
            if self.phase in (Phase.THINKING, Phase.QUEUED) or self.reply is not None:
                return False
            if not self._move(Phase.LISTENING):
                return False
            if self._detector is None or self._detector.options != options:
                self._detector = self._detector_factory(options)
            else:
                self._detector.reset()
            self._heard_s = 0.0
            self.heard = None
            return True

    def hear(self, sample_rate: int, samples: np.ndarray, now: float | None = None) -> HeardTurn | None:
        """Feed one microphone chunk; returns the turn when the detector says it ended (phase -> THINKING).

        Chunks that arrive in any other phase than LISTENING (the browser's last chunk after a stop, say)
        are ignored. Raises vad.AudioInputError for input that is not audio.
        """
        with self._lock:
            if self.phase is not Phase.LISTENING or self._detector is None:
                return None
            arrived_at = time.monotonic() if now is None else now
            utterance = self._detector.feed(sample_rate, samples)
            self._heard_s += len(samples) / sample_rate if sample_rate > 0 else 0.0
            if utterance is None:
                return None
            self._turns += 1
            # The chunk that ended the turn arrived just now and carries the latest audio, so speech ended
            # (audio heard - speech end) seconds ago.
            speech_ended_at = arrived_at - max(0.0, self._heard_s - utterance.speech_end_s)
            self.heard = HeardTurn(self._turns, utterance, speech_ended_at)
            self._move(Phase.THINKING)
            return self.heard

    def stop_listening(self) -> bool:
        """The microphone went off mid-turn (the user's click, or unusable input): what was heard is dropped."""
        with self._lock:
            return self.phase is Phase.LISTENING and self._move(Phase.IDLE)

    # -- answering ---------------------------------------------------------------------------------------

    def start_reply(self) -> Reply | None:
        """Take the heard turn for answering; None when there is none (a user's own mic stop, or Stop)."""
        with self._lock:
            if self.phase is not Phase.THINKING or self.heard is None or self.reply is not None:
                return None
            self.reply = Reply(self.heard)
            self.heard = None
            return self.reply

    def queued(self, reply: Reply) -> bool:
        """The server put this reply in line behind other conversations (THINKING -> QUEUED)."""
        with self._lock:
            return self.reply is reply and self.phase is Phase.THINKING and self._move(Phase.QUEUED)

    def unqueued(self, reply: Reply) -> bool:
        """The server has started on this reply (QUEUED -> THINKING)."""
        with self._lock:
            return self.reply is reply and self.phase is Phase.QUEUED and self._move(Phase.THINKING)

    def reply_audio(self, reply: Reply, pcm: bytes, now: float | None = None) -> bool:
        """Record a piece of reply audio; False when the reply was stopped (drop the piece)."""
        with self._lock:
            if self.reply is not reply or reply.cancel.is_set():
                return False
            if reply.first_audio_at is None:
                reply.first_audio_at = time.monotonic() if now is None else now
            reply.pcm += pcm
            if self.phase is not Phase.SPEAKING:
                self._move(Phase.SPEAKING)
            return True

    def reply_text(self, reply: Reply, text: str) -> None:
        with self._lock:
            if self.reply is reply and not reply.cancel.is_set():
                reply.text += text

    def finish_reply(self, reply: Reply) -> bool:
        """The reply's stream is over (complete or failed). True if this call took it (so the caller files it
        in the history; a Stop may have taken it first). Without audio there is nothing to play, so the
        conversation goes straight back to LISTENING; otherwise it stays SPEAKING until playback ends."""
        with self._lock:
            if self.reply is not reply:
                return False
            self.reply = None
            if self.phase is not Phase.STOPPED and not reply.pcm:
                self._listen_again()
            return True

    def playback_ended(self) -> bool:
        """The browser finished playing the reply; True when the microphone should re-arm."""
        with self._lock:
            if self.phase is not Phase.SPEAKING or self.reply is not None:
                return False
            return self._listen_again()

    def stop(self) -> Reply | None:
        """End the conversation: cancel a reply in flight and hand it back (to keep what arrived of it)."""
        with self._lock:
            reply, self.reply, self.heard = self.reply, None, None
            if reply is not None:
                reply.cancel.set()
            self._move(Phase.STOPPED)
            return reply

    # -- bookkeeping ---------------------------------------------------------------------------------------

    def add_messages(self, *messages: dict) -> None:
        with self._lock:
            self.history.extend(messages)

    def mic_command(self, action: MicAction) -> str:
        """A never-repeating value for the hidden component whose change makes the browser click."""
        with self._lock:
            self._mic_commands += 1
            return f"{action.value}:{self._mic_commands}"

    def _listen_again(self) -> bool:
        if not self._move(Phase.LISTENING):
            return False
        if self._detector is not None:
            self._detector.reset()
        self._heard_s = 0.0
        return True

    def _move(self, to: Phase) -> bool:
        if to not in _ALLOWED_MOVES[self.phase]:
            return False
        self.phase = to
        return True
