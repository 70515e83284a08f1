"""Per-session conversation state: one explicit state machine per browser tab, no Gradio in here.

A tab's `Conversation` owns its pause detector, the reply being answered and the chat history, so nothing of
one tab can leak into another. The microphone streams all conversation long; what its audio means depends on
the phase:

    IDLE --start--> LISTENING --turn ends--> THINKING --first audio--> SPEAKING --playback over--> LISTENING
                        ^                      |  ^                       |
                        |                      v  |                       |
                        |                    QUEUED                       |
                        |                      |                          |
                        +--(no audio: failure)-+                          |
                                                                          |
    THINKING, QUEUED, SPEAKING --the user talks over it--> INTERRUPTED --turn ends--> THINKING
    any phase --stop--> STOPPED --start--> LISTENING

In LISTENING and INTERRUPTED the detector looks for the end of the user's turn. While the app answers
(THINKING, QUEUED, SPEAKING) it looks for the user cutting in: speech over the raised barge-in bar that is not
the reply's own echo. A reply is filed in the history when the browser has stopped playing it (to its end,
or cut off by the user), so the history keeps what was actually heard.

Callers run on several threads (microphone frames, the reply's stream, the browser's reports, Stop), so every
method takes the conversation's lock, and a move the current phase does not allow is refused, not forced.
`version` counts changes, so the page can follow them.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from echo_gate import is_reply_echo
from omni_server.protocol import OUTPUT_SAMPLE_RATE
from vad import VAD_SAMPLE_RATE, CompletionModel, PauseDetector, Utterance, VadOptions


class Phase(enum.Enum):
    IDLE = "idle"  # no conversation yet
    LISTENING = "listening"  # the user's turn; the detector looks for its end
    THINKING = "thinking"  # the turn went to the server; no reply audio yet
    QUEUED = "queued"  # the server is answering another conversation first
    SPEAKING = "speaking"  # reply audio is streaming or still playing in the browser
    INTERRUPTED = "interrupted"  # the user cut in: the reply was silenced, their new turn is being heard
    STOPPED = "stopped"  # the conversation was ended (Stop, or the tab's audio channel closed)


_ANSWERING = frozenset({Phase.THINKING, Phase.QUEUED, Phase.SPEAKING})
_TURN_PHASES = frozenset({Phase.LISTENING, Phase.INTERRUPTED})
_HEARING = _ANSWERING | _TURN_PHASES

_ALLOWED_MOVES: dict[Phase, frozenset[Phase]] = {
    Phase.IDLE: frozenset({Phase.LISTENING, Phase.STOPPED}),
    Phase.LISTENING: frozenset({Phase.THINKING, Phase.STOPPED}),
    Phase.THINKING: frozenset({Phase.QUEUED, Phase.SPEAKING, Phase.LISTENING, Phase.INTERRUPTED, Phase.STOPPED}),
    Phase.QUEUED: frozenset({Phase.THINKING, Phase.SPEAKING, Phase.LISTENING, Phase.INTERRUPTED, Phase.STOPPED}),
    Phase.SPEAKING: frozenset({Phase.LISTENING, Phase.INTERRUPTED, Phase.STOPPED}),
    Phase.INTERRUPTED: frozenset({Phase.THINKING, Phase.STOPPED}),
    Phase.STOPPED: frozenset({Phase.LISTENING, Phase.STOPPED}),
}

EchoCheck = Callable[[np.ndarray, bytearray], bool]  # (speech heard at 16 kHz, reply PCM at 24 kHz) -> is it echo


def reply_echo(heard: np.ndarray, reply_pcm: bytearray) -> bool:
    return is_reply_echo(heard, VAD_SAMPLE_RATE, reply_pcm, OUTPUT_SAMPLE_RATE)


@dataclass(frozen=True)
class HeardTurn:
    """A finished user turn waiting to be answered. `speech_ended_at` is on the `time.monotonic()` clock;
    `utterance.speech_end_s` is on the microphone stream's clock (seconds since the conversation started)."""

    number: int
    utterance: Utterance
    speech_ended_at: float


@dataclass
class Reply:
    """The reply to one turn: all of its audio so far (s16le, 24 kHz), its text, and how it ended."""

    turn: HeardTurn
    cancel: threading.Event = field(default_factory=threading.Event)
    pcm: bytearray = field(default_factory=bytearray)
    text: str = ""
    queue_ahead: int = 0  # conversations the server answers first
    loading: str | None = None  # the server is loading its model, at this step; the question waits for it
    requested_at: float | None = None  # the request went to the model server (monotonic clock)
    first_audio_at: float | None = None  # the first reply bytes reached the app (monotonic clock)
    sounding_after_s: float | None = None  # the browser's figure: end of speech -> reply audible
    sounding_at: float | None = None  # when the browser said it became audible (monotonic clock)
    streamed: bool = False  # the server's stream is over
    failure: str | None = None  # why the stream ended early, in words
    interrupted: bool = False  # the user cut in
    stopped: bool = False  # the user ended the conversation during it
    played_samples: int | None = None  # what the browser played of it, once it has stopped playing

    @property
    def seconds_to_first_audio(self) -> float | None:
        """The browser's measure when it sent one (what the user heard), else the first byte's arrival."""
        if self.sounding_after_s is not None:
            return self.sounding_after_s
        if self.first_audio_at is None:
            return None
        return self.first_audio_at - self.turn.speech_ended_at

    @property
    def engine_first_audio_s(self) -> float | None:
        """The model server's share of the wait: from the request to its first audio."""
        if self.first_audio_at is None or self.requested_at is None:
            return None
        return self.first_audio_at - self.requested_at

    def played_so_far(self, margin_s: float = 1.0) -> bytearray:
        """The reply's audio up to where the browser's player should be now (plus a margin for its clock): what
        may be echoing in the room. A server faster than real time is far ahead of the player, so the audio
        received is not the audio heard. Before the browser says it is sounding, nothing can echo."""
        if self.sounding_at is None:
            return bytearray()
        played_s = time.monotonic() - self.sounding_at + margin_s
        return self.pcm[: 2 * round(played_s * OUTPUT_SAMPLE_RATE)]

    @property
    def heard_pcm(self) -> bytes:
        """The audio the user heard: all of it, unless the browser reports having played less."""
        if self.played_samples is None:
            return bytes(self.pcm)
        return bytes(self.pcm[: 2 * self.played_samples])


@dataclass(frozen=True)
class CutIn:
    """The user started talking while the app answered: `reply` was cancelled and must be silenced."""

    reply: Reply


class Conversation:
    """One tab's conversation. `completion`: the end-of-turn model (None: turns end on silence alone);
    `echo_check` is injectable for tests."""

    def __init__(self, completion: CompletionModel | None = None, echo_check: EchoCheck = reply_echo) -> None:
        self._lock = threading.RLock()
        self._completion = completion
        self._echo_check = echo_check
        self._detector: PauseDetector | None = None
        self._options = VadOptions()
        self._turns = 0
        self.barge_in = True
        self.phase = Phase.IDLE
        self.version = 0
        self.heard: HeardTurn | None = None
        self.reply: Reply | None = None  # the reply being streamed or played
        self._cut_off: dict[int, Reply] = {}  # replies the user cut in on, until the browser says what it played
        self.notice: str | None = None  # the last failure, in words, until the next turn is answered
        self.history: list[dict] = []

    # -- the conversation --------------------------------------------------------------------------------

    def start(self) -> bool:
        """A new conversation on a new microphone stream (time 0), with the latest options; refused while one
        is going on."""
        with self._lock:
            if not self._move(Phase.LISTENING):
                return False
            self._detector = PauseDetector(self._options, self._completion)
            self.notice = None
            return True

    @property
    def options(self) -> VadOptions:
        return self._options

    def set_options(self, options: VadOptions, barge_in: bool) -> None:
        """New turn options, used from the next turn on (the turn being heard keeps its own)."""
        with self._lock:
            self._options, self.barge_in = options, barge_in

    def stop(self, notice: str | None = None) -> list[Reply]:
        """End the conversation (`notice`: why, when it was not the user). Cancels the reply in flight and
        returns the replies not yet filed, to keep them."""
        with self._lock:
            self.notice = notice
            unfiled = [*self._cut_off.values(), *([self.reply] if self.reply is not None else [])]
            for reply in unfiled:
                reply.cancel.set()
                reply.stopped = not reply.interrupted
            self.reply, self.heard, self._cut_off = None, None, {}
            self._move(Phase.STOPPED)
            return unfiled

    # -- the microphone ----------------------------------------------------------------------------------

    def hear(self, sample_rate: int, samples: np.ndarray, now: float | None = None) -> HeardTurn | CutIn | None:
        """Feed one microphone frame (at most a few hundred ms). Returns the user's finished turn (phase ->
        THINKING), or a CutIn when they started talking over the app's answer (phase -> INTERRUPTED).
        Raises vad.AudioInputError for input that is not audio."""
        with self._lock:
            detector = self._detector
            if detector is None or self.phase not in _HEARING:
                return None
            arrived_at = time.monotonic() if now is None else now
            utterance = detector.feed(sample_rate, samples)
            if self.phase in _ANSWERING:  # a frame is shorter than any turn: speech can only have started
                return self._cut_in() if detector.speech_started else None
            if utterance is None:
                return None
            self._turns += 1
            # The frame that ended the turn arrived just now and carries the latest audio.
            speech_ended_at = arrived_at - max(0.0, detector.heard_s - utterance.speech_end_s)
            self.heard = HeardTurn(self._turns, utterance, speech_ended_at)
            self.notice = None  # the last failure is old news once a new turn is on its way
            self._move(Phase.THINKING)
            self._next_turn(over_reply=True)
            return self.heard

    def _cut_in(self) -> CutIn | None:
        """Speech started while the app answers: the user cutting in, or the reply's echo (dropped)."""
        assert self._detector is not None
        reply = self.reply
        echo = reply is not None and self._echo_check(self._detector.speech_so_far(), reply.played_so_far())
        if not self.barge_in or echo or reply is None:
            self._next_turn(over_reply=True)
            return None
        reply.cancel.set()
        reply.interrupted = True
        self._cut_off[reply.turn.number] = reply
        self.reply = None
        self._move(Phase.INTERRUPTED)
        return CutIn(reply)

    def _next_turn(self, over_reply: bool) -> None:
        """The detector looks for the next turn in the same stream, with the tab's latest options."""
        assert self._detector is not None
        self._detector.next_turn(over_reply=over_reply, options=self._options)

    # -- answering ---------------------------------------------------------------------------------------

    def start_reply(self) -> Reply | None:
        """Take the heard turn for answering; None when there is none (it was stopped or cut in on)."""
        with self._lock:
            if self.phase is not Phase.THINKING or self.heard is None or self.reply is not None:
                return None
            self.reply = Reply(self.heard)
            self.heard = None
            return self.reply

    def loading(self, reply: Reply, step: str) -> None:
        """The server is loading its model (at `step`): the reply waits for it, shown as a wait in line."""
        with self._lock:
            if self.reply is not reply or reply.loading == step:
                return
            reply.loading = step
            if self.phase is Phase.THINKING:
                self._move(Phase.QUEUED)
            else:
                self._touch()

    def queued(self, reply: Reply, ahead: int) -> None:
        """The server's line for this reply: `ahead` other conversations come first (0: it is being answered)."""
        with self._lock:
            if self.reply is not reply or (reply.queue_ahead == ahead and reply.loading is None):
                return
            reply.queue_ahead, reply.loading = ahead, None
            if ahead > 0 and self.phase is Phase.THINKING:
                self._move(Phase.QUEUED)
            elif ahead == 0 and self.phase is Phase.QUEUED:
                self._move(Phase.THINKING)
            else:
                self._touch()

    def reply_audio(self, reply: Reply, pcm: bytes, now: float | None = None) -> bool:
        """Record a piece of reply audio; False when the reply was stopped or cut in on (drop the piece)."""
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
                self._touch()

    def finish_reply(self, reply: Reply, failure: str | None = None) -> Reply | None:
        """The reply's stream is over, complete or failed (`failure` says why, in words). Without audio there
        is nothing to play: the reply is done (returned, for filing) and the user's turn comes round again.
        With audio it stays SPEAKING until the browser has played it (`playback_over`)."""
        with self._lock:
            if self.reply is not reply:
                return None
            reply.streamed, reply.failure = True, failure
            if failure is not None:
                self.notice = failure
            if reply.pcm:
                self._touch()
                return None
            self.reply = None
            self._listen_again()
            return reply

    def sounding(self, turn: int, after_speech_end_s: float) -> None:
        """The browser's own measure: the reply to `turn` became audible this long after the user's speech ended."""
        with self._lock:
            for reply in (self.reply, self._cut_off.get(turn)):
                if reply is not None and reply.turn.number == turn and reply.sounding_after_s is None:
                    reply.sounding_after_s = after_speech_end_s
                    reply.sounding_at = time.monotonic()

    def playback_over(self, turn: int, played_samples: int, complete: bool) -> Reply | None:
        """The browser stopped playing the reply to `turn`: at its end (`complete`), because the user cut in,
        or because the user stopped the conversation (incomplete, and not cut in on). Returns the reply for
        filing, once; the player catching up with a reply that still streams is not its end."""
        with self._lock:
            reply = self._cut_off.pop(turn, None)
            if reply is not None and complete:  # it had played to its end before the cut-in reached the page
                reply.interrupted = False
            if reply is None:
                reply = self.reply
                if reply is None or reply.turn.number != turn or (complete and not reply.streamed):
                    return None
                self.reply = None
                if not complete:
                    reply.cancel.set()
                    reply.stopped = True
                self._listen_again()
            reply.played_samples = max(0, min(played_samples, len(reply.pcm) // 2))
            self._touch()
            return reply

    # -- bookkeeping ---------------------------------------------------------------------------------------

    def warn(self, sentence: str) -> None:
        """Something the user should know (shown with the status line until the next reply)."""
        with self._lock:
            self.notice = sentence
            self._touch()

    def add_messages(self, *messages: dict) -> None:
        with self._lock:
            self.history.extend(messages)
            self._touch()

    def _listen_again(self) -> None:
        if self._move(Phase.LISTENING):
            self._next_turn(over_reply=False)

    def _move(self, to: Phase) -> bool:
        if to not in _ALLOWED_MOVES[self.phase]:
            return False
        self.phase = to
        self._touch()
        return True

    def _touch(self) -> None:
        self.version += 1
