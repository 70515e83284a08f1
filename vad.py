"""Streaming pause detection: decide when the user has finished a spoken turn.

One `PauseDetector` per session is fed the browser's microphone chunks as they come, `(sample_rate, ndarray)` (the
live page sends 32 ms frames at 16 kHz; any rate and length work). Each chunk is mixed to mono, resampled to 16 kHz
by soxr (a streaming resampler, so chunk boundaries are seamless), and cut into 512-sample windows that the
silero-vad model scores once each, with its recurrent state carried across chunks. A small state machine with
hysteresis turns the window scores into a turn: speech starts after `start_secs` of speech, and the turn ends at a
pause that follows speech (or at `max_utterance_secs`). Silence before the user starts never ends a turn.

Which pause ends the turn: with `semantic` on (the default) and an end-of-turn model at hand (end_of_turn.py),
the model is asked once the pause reaches `check_secs` (and again at `recheck_secs`); the turn ends as soon as it
judges the turn complete, else after `fallback_secs` of silence whatever it says. With `semantic` off, or while
the model is unavailable, the turn ends after `pause_secs` of silence.

Cost: silero-vad's own ONNX model (shipped in its wheel) is run by onnxruntime, one window per call with its
recurrent state carried by hand. The page sends one window per frame, so the per-call overhead is the cost:
0.27 ms a window here against 2.7 ms for the torch model called the same way (measured side by side, 2-core
machine), and the cost per audio second does not grow with the length of the utterance. The probabilities are
the stock model's (tests check this). torch is not imported: `import silero_vad` would set torch's thread
count to 1 for the whole process, so this module only reads the model file out of that package.
"""

from __future__ import annotations

import enum
import functools
import importlib.util
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, TypedDict

import numpy as np
import onnxruntime
import soxr

VAD_SAMPLE_RATE = 16_000
WINDOW_SAMPLES = 512  # silero-vad's window at 16 kHz: 32 ms
_CONTEXT_SAMPLES = 64  # silero-vad prepends the last 64 samples of the previous window to each window
_BATCH_WINDOWS = 32  # windows scored per step of `feed` (about 1 s), so a huge chunk stops soon after a turn ends
_MIN_RATE, _MAX_RATE = 8_000, 96_000
_MODEL_WINDOW_SAMPLES = 8 * 16_000  # the end-of-turn model hears at most the turn's last 8 s
_MAX_CHANNELS = 8


class AudioInputError(ValueError):
    """Input the detector cannot use as audio; the message is a plain sentence the app can show the user."""


@dataclass(frozen=True)
class VadOptions:
    """How the detector turns speech probabilities into a turn. Times are in seconds of audio.

    start_secs: speech must last this long before a turn starts, so clicks and coughs do not start one.
    start_gap_secs: while that speech is being counted, a dip this short (an unvoiced consonant) does not
        restart the count, so the turn starts at the first syllable, not after it.
    pause_secs: silence after speech that ends the turn; longer tolerates hesitations, shorter answers sooner.
    pre_roll_secs: audio kept from before the detected start, so the first syllable is never lost.
    tail_secs: audio kept after the end of speech, so the last syllable's decay is not clipped.
        At most `pause_secs` (the detector has heard no more than that when it ends the turn).
    max_utterance_secs: a turn that never pauses ends when its audio reaches this length
        (30 s is mini-omni's input limit); the utterance then says `TurnEndReason.MAX_LENGTH`.
    threshold: silero speech probability at or above which a window is speech (starts or resumes speech).
    off_threshold: while the user is speaking, windows stay speech down to this lower probability
        (hysteresis), so a soft syllable does not open a pause.
    barge_in_threshold, barge_in_secs: the raised bar for speech that starts while the app answers (a reply
        is being prepared or plays): every window of the start must score at least this, for this long.
        Clean speech scores above 0.8 in about 85 % of its windows, noise and clicks rarely do; silero is
        blind to level (a -20 dB copy of speech scores the same), so the bar alone cannot tell the reply's
        own echo from the user: `echo_gate` does that.
    semantic: ask the end-of-turn model at pauses (below); off, the turn ends after `pause_secs` of silence.
    check_secs: the silence at which the model is first asked. Shorter answers sooner but asks more often.
    recheck_secs: silences at which it is asked again, while the pause lasts.
    completion_threshold: the model's probability at or above which the turn is complete and ends now.
    fallback_secs: the silence that ends the turn whatever the model says (with `semantic` on).
    resume_secs: when the model has ended a turn and the user speaks again within this long, they had not
        finished: the new turn carries on the old one and includes its audio (`Utterance.continues`), so the
        sentence is answered whole. 0 turns this off.
    """

    start_secs: float = 0.25
    start_gap_secs: float = 0.2
    pause_secs: float = 0.8
    pre_roll_secs: float = 0.3
    tail_secs: float = 0.2
    max_utterance_secs: float = 30.0
    threshold: float = 0.5
    off_threshold: float = 0.35
    barge_in_threshold: float = 0.8
    barge_in_secs: float = 0.3
    semantic: bool = True
    check_secs: float = 0.2
    recheck_secs: tuple[float, ...] = ()
    completion_threshold: float = 0.5
    fallback_secs: float = 1.5
    resume_secs: float = 1.5

    def __post_init__(self) -> None:
        for name in ("start_secs", "pause_secs", "max_utterance_secs", "barge_in_secs", "check_secs"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        for name in ("start_gap_secs", "pre_roll_secs", "tail_secs", "resume_secs"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be zero or more, got {getattr(self, name)!r}")
        shortest_end = min(self.pause_secs, self.check_secs) if self.semantic else self.pause_secs
        if self.tail_secs > shortest_end:
            raise ValueError(
                f"tail_secs ({self.tail_secs}) cannot exceed the shortest pause that ends a turn "
                f"({shortest_end}: pause_secs, or check_secs with semantic on)"
            )
        checks = (self.check_secs, *self.recheck_secs)
        if list(checks) != sorted(checks) or not checks[-1] < self.fallback_secs:
            raise ValueError(
                "need check_secs <= recheck_secs (ascending) < fallback_secs, got "
                f"{self.check_secs}, {self.recheck_secs} and {self.fallback_secs}"
            )
        if not 0 < self.completion_threshold < 1:
            raise ValueError(f"completion_threshold must be between 0 and 1, got {self.completion_threshold!r}")
        if not 0 < self.off_threshold <= self.threshold <= self.barge_in_threshold < 1:
            raise ValueError(
                "need 0 < off_threshold <= threshold <= barge_in_threshold < 1, got "
                f"{self.off_threshold!r}, {self.threshold!r} and {self.barge_in_threshold!r}"
            )


class PatienceOptions(TypedDict):
    """The VadOptions fields that one "When to answer" choice sets."""

    completion_threshold: float
    fallback_secs: float


# The page's "When to answer": how sure the end-of-turn model must be that a turn is complete, and the silence
# that ends a turn whatever it says. "balanced" is VadOptions' defaults (README: "When does a turn end").
PATIENCE: dict[str, PatienceOptions] = {
    "quick": {"completion_threshold": 0.4, "fallback_secs": 1.2},
    "balanced": {"completion_threshold": 0.5, "fallback_secs": 1.5},
    "patient": {"completion_threshold": 0.8, "fallback_secs": 2.0},
}


def turn_options(patience: str, semantic: bool, pause_secs: float, start_secs: float) -> VadOptions:
    """The page's turn options as detector options; an unknown `patience` is refused with a ValueError."""
    if patience not in PATIENCE:
        raise ValueError(f"'When to answer' must be one of {', '.join(PATIENCE)}, not {patience!r}.")
    return VadOptions(semantic=semantic, pause_secs=pause_secs, start_secs=start_secs, **PATIENCE[patience])


# The end-of-turn model: the turn's audio (16 kHz, at most its last 8 s are used) -> probability it is complete,
# or None when no model is at hand (the turn then ends on silence alone).
CompletionModel = Callable[[np.ndarray], "float | None"]


class TurnEndReason(enum.Enum):
    COMPLETE = "complete"  # the end-of-turn model judged the turn complete at a pause
    PAUSE = "pause"  # the user stopped for pause_secs (or fallback_secs with the model on)
    MAX_LENGTH = "max_length"  # the user talked for max_utterance_secs without pausing


class DetectorState(enum.Enum):
    WAITING = "waiting"  # no speech yet this turn (silence here never ends a turn)
    SPEAKING = "speaking"  # the user is talking
    PAUSING = "pausing"  # silence after speech; the turn ends if the model says so or the silence lasts
    ENDED = "ended"  # an utterance was handed on; further audio is ignored until next_turn() or reset()


@dataclass(frozen=True)
class Utterance:
    """One finished turn: the user's speech with pre-roll and tail, float32 mono at 16 kHz."""

    audio: np.ndarray
    reason: TurnEndReason
    start_s: float  # where `audio` starts, in seconds since the detector's last reset
    speech_end_s: float  # where speech ended (before the tail), same clock
    continues: bool = False  # it carries on the previous turn (ended by the model too soon) and includes it

    SAMPLE_RATE: ClassVar[int] = VAD_SAMPLE_RATE

    @property
    def duration_s(self) -> float:
        return len(self.audio) / VAD_SAMPLE_RATE


@functools.cache
def _silero_session() -> onnxruntime.InferenceSession:
    """silero-vad's ONNX model, loaded once per process; every detector carries its own recurrent state.
    Found without importing the silero_vad package (its import sets torch's thread count process-wide)."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("silero-vad is not installed (pip install -r requirements.txt)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "silero_vad.onnx"
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1  # a window is too small to share across threads
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class SpeechScorer:
    """Silero speech probability of consecutive 512-sample windows at 16 kHz, state carried across calls:
    the stock model called on each window in turn. Safe to use from any thread (one scorer per stream)."""

    _RATE = np.array(VAD_SAMPLE_RATE, dtype=np.int64)

    def __init__(self) -> None:
        self._session = _silero_session()
        self.reset()

    def reset(self) -> None:
        self._context = np.zeros(_CONTEXT_SAMPLES, dtype=np.float32)
        self._state = np.zeros((2, 1, 128), dtype=np.float32)

    def score(self, samples: np.ndarray) -> np.ndarray:
        """Probabilities for `samples` (float32, a whole number of windows), one per window."""
        count = len(samples) // WINDOW_SAMPLES
        probabilities = np.zeros(count, dtype=np.float32)
        for index in range(count):
            window = samples[index * WINDOW_SAMPLES : (index + 1) * WINDOW_SAMPLES]
            model_input = np.concatenate([self._context, window])[None]
            output, self._state = self._session.run(
                None, {"input": model_input, "state": self._state, "sr": self._RATE}
            )
            probabilities[index] = output[0, 0]
            self._context = window[-_CONTEXT_SAMPLES:].copy()
        return probabilities


def to_mono_float(samples: np.ndarray) -> np.ndarray:
    """A chunk's samples (int or float, mono or channels-last) as float32 mono in [-1, 1].

    NaN becomes 0 and infinities or overshoot are clipped, so a glitching microphone costs a click, not a crash.
    """
    try:
        array = np.asarray(samples)
    except (TypeError, ValueError) as error:  # e.g. ragged nested lists
        raise AudioInputError("The microphone sent something that is not audio samples.") from error
    if array.ndim == 0 or array.ndim > 2:
        raise AudioInputError(
            f"Audio must be a list of samples, optionally with channels last; got an array of shape {array.shape}."
        )
    if array.ndim == 2 and array.shape[1] > _MAX_CHANNELS:
        raise AudioInputError(
            f"Audio must be laid out as (samples, channels) with at most {_MAX_CHANNELS} channels; "
            f"got shape {array.shape}."
        )
    kind = array.dtype.kind
    if kind == "f":
        audio = np.nan_to_num(array.astype(np.float32, copy=False), nan=0.0, posinf=1.0, neginf=-1.0)
        audio = np.clip(audio, -1.0, 1.0)
    elif kind == "i":
        audio = array.astype(np.float32) / float(-np.iinfo(array.dtype).min)
    elif kind == "u":
        middle = float(np.iinfo(array.dtype).max // 2 + 1)
        audio = (array.astype(np.float32) - middle) / middle
    else:
        raise AudioInputError(f"Audio samples must be integers or floats, not {array.dtype}.")
    if audio.ndim == 2:
        audio = audio.mean(axis=1, dtype=np.float32)
    return np.ascontiguousarray(audio, dtype=np.float32)


class _Resampler:
    """Any input rate to 16 kHz, streaming: soxr keeps its filter state between chunks."""

    def __init__(self) -> None:
        self._rate: int | None = None
        self._stream: soxr.ResampleStream | None = None

    def __call__(self, rate: int, audio: np.ndarray) -> np.ndarray:
        if rate != self._rate:
            flushed = self._flush()
            self._rate = rate
            self._stream = None if rate == VAD_SAMPLE_RATE else soxr.ResampleStream(rate, VAD_SAMPLE_RATE, 1)
            if len(flushed):
                return np.concatenate([flushed, self(rate, audio)])
        if self._stream is None:
            return audio
        return self._stream.resample_chunk(audio)

    def _flush(self) -> np.ndarray:
        """What the old stream still holds, when the rate changes mid-turn."""
        if self._stream is None:
            return np.zeros(0, dtype=np.float32)
        return self._stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True)


class _SampleBuffer:
    """16 kHz samples addressed by their index since reset; the oldest ones can be dropped."""

    def __init__(self) -> None:
        self._data = np.zeros(VAD_SAMPLE_RATE, dtype=np.float32)
        self._first = 0  # index (since reset) of _data[0]
        self._length = 0

    @property
    def end(self) -> int:
        return self._first + self._length

    def append(self, samples: np.ndarray) -> None:
        needed = self._length + len(samples)
        if needed > len(self._data):
            grown = np.zeros(max(needed, 2 * len(self._data)), dtype=np.float32)
            grown[: self._length] = self._data[: self._length]
            self._data = grown
        self._data[self._length : needed] = samples
        self._length = needed

    def drop_before(self, index: int) -> None:
        drop = min(max(0, index - self._first), self._length)
        if drop:
            self._data[: self._length - drop] = self._data[drop : self._length]
            self._first += drop
            self._length -= drop

    def get(self, start: int, stop: int) -> np.ndarray:
        start = max(start, self._first)
        return self._data[start - self._first : stop - self._first].copy()


def _windows(seconds: float) -> int:
    return math.ceil(round(seconds * VAD_SAMPLE_RATE / WINDOW_SAMPLES, 6))


@dataclass(frozen=True)
class _Resumable:
    """A turn the model ended, which speech starting by `until_window` continues."""

    audio_start: int  # its first sample
    until_window: int


class _TurnTracker:
    """The state machine, on window probabilities and the end-of-turn model's verdicts alone (no audio, no
    model). Window i covers samples [512 i, 512 (i + 1)) since reset. `over_reply`: the start must clear the
    barge-in bar (see VadOptions). `semantic`: pauses are judged by the model; when a pause reaches a check,
    `check_due` is set and the caller answers with `judged`. `resumable`: the previous turn, which this one
    continues if its speech starts in time."""

    def __init__(
        self, options: VadOptions, over_reply: bool = False, semantic: bool = False, resumable: _Resumable | None = None
    ) -> None:
        self._options = options
        self._resumable = resumable
        self.continues = False
        self.semantic = semantic
        self._checks = frozenset(_windows(seconds) for seconds in (options.check_secs, *options.recheck_secs))
        self._fallback_windows = _windows(options.fallback_secs)
        self.check_due = False
        self._start_on = options.barge_in_threshold if over_reply else options.threshold
        self._start_keep = options.barge_in_threshold if over_reply else options.off_threshold
        self._start_windows = _windows(options.barge_in_secs if over_reply else options.start_secs)
        self._start_gap_windows = _windows(options.start_gap_secs)
        self._pause_windows = _windows(options.pause_secs)
        self._pre_roll = round(options.pre_roll_secs * VAD_SAMPLE_RATE)
        self.max_samples = round(options.max_utterance_secs * VAD_SAMPLE_RATE)
        self.state = DetectorState.WAITING
        self._run_start: int | None = None  # first window of a run of speech that may become the start
        self._run_voiced = 0  # speech windows counted in that run
        self._run_last_voiced = 0  # the run's latest speech window
        self.speech_start = 0  # first speech window of the turn
        self.speech_end = 0  # window after the last speech window
        self.reason: TurnEndReason | None = None

    @property
    def audio_start(self) -> int:
        """First sample of the utterance, pre-roll included (once speech has started); a continuing turn's
        starts where the turn it continues did."""
        if self.continues:
            assert self._resumable is not None
            return self._resumable.audio_start
        return max(0, self.speech_start * WINDOW_SAMPLES - self._pre_roll)

    def first_sample_needed(self, next_window: int) -> int:
        """The oldest sample an utterance could still need: its pre-roll may reach back before its start, and
        while the previous turn may still be continued, all of that turn."""
        if self.state is not DetectorState.WAITING:
            return self.audio_start
        first = self._run_start if self._run_start is not None else next_window
        needed = max(0, first * WINDOW_SAMPLES - self._pre_roll)
        if self._resumable is not None and next_window <= self._resumable.until_window:
            return min(needed, self._resumable.audio_start)
        return needed

    def step(self, index: int, probability: float) -> None:
        """Advance over window `index`; sets `state` to ENDED and `reason` when the turn is over."""
        options = self._options
        if self.state is DetectorState.WAITING:
            if self._run_start is None and probability >= self._start_on:
                self._run_start, self._run_voiced = index, 0
            if self._run_start is not None:
                if probability >= self._start_keep:
                    self._run_voiced += 1
                    self._run_last_voiced = index
                    if self._run_voiced >= self._start_windows:
                        self.state = DetectorState.SPEAKING
                        self.speech_start, self.speech_end = self._run_start, index + 1
                        resumable = self._resumable
                        self.continues = resumable is not None and self._run_start <= resumable.until_window
                elif index - self._run_last_voiced > self._start_gap_windows:
                    self._run_start = None
        elif self.state is DetectorState.SPEAKING:
            if probability >= options.off_threshold:
                self.speech_end = index + 1
            else:
                self.state = DetectorState.PAUSING
        elif self.state is DetectorState.PAUSING:
            silent = index + 1 - self.speech_end
            if probability >= options.threshold:
                self.state = DetectorState.SPEAKING
                self.speech_end = index + 1
            elif silent >= (self._fallback_windows if self.semantic else self._pause_windows):
                self._end(TurnEndReason.PAUSE)
                return
            elif self.semantic and silent in self._checks:
                self.check_due = True
        heard = (index + 1) * WINDOW_SAMPLES - self.audio_start
        if self.state is not DetectorState.WAITING and heard >= self.max_samples:
            self._end(TurnEndReason.MAX_LENGTH)

    def judged(self, complete: bool | None) -> None:
        """The model's verdict on the pause that set `check_due`; None: no model, so silence decides from now on."""
        self.check_due = False
        if complete is None:
            self.semantic = False
        elif complete:
            self._end(TurnEndReason.COMPLETE)

    def _end(self, reason: TurnEndReason) -> None:
        self.reason = reason
        self.state = DetectorState.ENDED

    def utterance_span(self) -> tuple[int, int, int]:
        """(first sample, sample where speech ended, sample after the tail) of the finished turn."""
        start = self.audio_start
        limit = start + self.max_samples
        speech_end = min(self.speech_end * WINDOW_SAMPLES, limit)
        stop = min(speech_end + round(self._options.tail_secs * VAD_SAMPLE_RATE), limit)
        return start, speech_end, stop


class PauseDetector:
    """Finds the ends of user turns in a stream of microphone chunks. One per session.

    After `feed` has returned an Utterance the detector is ENDED: the rest of that chunk and any further chunks
    are ignored (`feed` returns None) until `next_turn()` (the same stream goes on: model state, resampler and
    clock carry over, so a live microphone needs no restart) or `reset()` (a new stream, time 0).
    """

    def __init__(self, options: VadOptions = VadOptions(), completion: CompletionModel | None = None) -> None:
        self.options = options
        self._completion = completion
        self._scorer = SpeechScorer()
        self.model_calls = 0  # end-of-turn model calls so far, and their wall time: for benchmarks
        self.model_seconds = 0.0
        self.reset()

    def reset(self) -> None:
        """Forget everything: model state, audio, resampler. The next chunk is time 0."""
        self._scorer.reset()
        self._resample = _Resampler()
        self._buffer = _SampleBuffer()
        self._resumable: _Resumable | None = None
        self._tracker = self._new_tracker(over_reply=False)
        self._scored = 0  # windows scored since reset

    def next_turn(self, *, over_reply: bool = False, options: VadOptions | None = None) -> None:
        """Look for the next turn in the same stream (with new `options`, if given). Also drops a started
        turn (speech judged to be the reply's echo). `over_reply`: the app is answering, so a turn must
        start over the barge-in bar."""
        if options is not None:
            self.options = options
        self._tracker = self._new_tracker(over_reply)

    def _new_tracker(self, over_reply: bool) -> _TurnTracker:
        semantic = self.options.semantic and self._completion is not None
        return _TurnTracker(self.options, over_reply, semantic, self._resumable)

    @property
    def state(self) -> DetectorState:
        return self._tracker.state

    @property
    def speech_started(self) -> bool:
        """The current turn has started (speech held for start_secs, or barge_in_secs over a reply)."""
        return self._tracker.state in (DetectorState.SPEAKING, DetectorState.PAUSING)

    @property
    def heard_s(self) -> float:
        """Seconds of audio fed since reset (16 kHz samples taken in), the stream's clock."""
        return self._buffer.end / VAD_SAMPLE_RATE

    def speech_so_far(self) -> np.ndarray:
        """The started turn's speech from its first speech window (no pre-roll) to the latest sample."""
        return self._buffer.get(self._tracker.speech_start * WINDOW_SAMPLES, self._buffer.end)

    def feed(self, sample_rate: int, samples: np.ndarray) -> Utterance | None:
        """Take one chunk of the microphone stream; return the Utterance when the turn ends.

        Raises AudioInputError for a rate outside 8-96 kHz or samples that are not audio (NaN and infinities
        are cleaned, not refused).
        """
        rate = _checked_rate(sample_rate)
        audio = to_mono_float(samples)
        if self._tracker.state is DetectorState.ENDED or len(audio) == 0:
            return None
        self._buffer.append(self._resample(rate, audio))
        while self._tracker.state is not DetectorState.ENDED:
            available = self._buffer.end // WINDOW_SAMPLES - self._scored
            if available == 0:
                break
            first = self._scored * WINDOW_SAMPLES
            count = min(available, _BATCH_WINDOWS)
            probabilities = self._scorer.score(self._buffer.get(first, first + count * WINDOW_SAMPLES))
            for probability in probabilities:
                self._tracker.step(self._scored, float(probability))
                self._scored += 1
                if self._tracker.check_due:
                    self._tracker.judged(self._judge(self._scored * WINDOW_SAMPLES))
                if self._tracker.state is DetectorState.ENDED:
                    return self._utterance()
            self._forget_leading_silence()
        return None

    def _judge(self, end: int) -> bool | None:
        """Ask the model whether the turn heard up to sample `end` is complete (None: no model at hand)."""
        assert self._completion is not None
        started = time.perf_counter()
        audio = self._buffer.get(max(self._tracker.audio_start, end - _MODEL_WINDOW_SAMPLES), end)
        probability = self._completion(audio)
        if probability is None:
            return None
        self.model_calls += 1
        self.model_seconds += time.perf_counter() - started
        return probability >= self.options.completion_threshold

    def _forget_leading_silence(self) -> None:
        """Keep only the pre-roll's worth of audio while waiting, so a long silence costs no memory."""
        if self._tracker.state is DetectorState.WAITING:
            self._buffer.drop_before(self._tracker.first_sample_needed(self._scored))

    def _utterance(self) -> Utterance:
        tracker = self._tracker
        start, speech_end, stop = tracker.utterance_span()
        assert tracker.reason is not None
        # A turn the model ended may be continued; not one that is already half of mini-omni's 30 s limit.
        resumable = (
            tracker.reason is TurnEndReason.COMPLETE
            and self.options.resume_secs > 0
            and stop - start < tracker.max_samples // 2
        )
        self._resumable = _Resumable(start, self._scored + _windows(self.options.resume_secs)) if resumable else None
        return Utterance(
            audio=self._buffer.get(start, stop),
            reason=tracker.reason,
            start_s=start / VAD_SAMPLE_RATE,
            speech_end_s=speech_end / VAD_SAMPLE_RATE,
            continues=tracker.continues,
        )


def _checked_rate(sample_rate: int) -> int:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)):
        raise AudioInputError(f"The sample rate must be a whole number of hertz, not {sample_rate!r}.")
    if not _MIN_RATE <= sample_rate <= _MAX_RATE:
        raise AudioInputError(
            f"The microphone sent audio at {sample_rate} Hz; rates from {_MIN_RATE} to {_MAX_RATE} Hz are supported."
        )
    return int(sample_rate)


@dataclass(frozen=True)
class RecordedTurn:
    """A turn found in a recording fed chunk by chunk; times are seconds into the recording."""

    utterance: Utterance
    turn_end_s: float  # end of the chunk on which the turn was declared over

    @property
    def speech_start_s(self) -> float:
        """Where the handed-on utterance starts (pre-roll included)."""
        return self.utterance.start_s

    @property
    def speech_end_s(self) -> float:
        return self.utterance.speech_end_s


def turns_in_recording(
    sample_rate: int, samples: np.ndarray, chunk_secs: float, detector: PauseDetector
) -> list[RecordedTurn]:
    """Feed a whole recording in chunks of `chunk_secs` as one stream, looking for the next turn after each, as
    the app does (without a reply playing, so no raised bar). A turn that continues the one before it (see
    VadOptions.resume_secs) is listed too, after the one it continues.

    For tests, benchmarks and tuning the options on one's own recordings.
    """
    chunk = max(1, round(chunk_secs * sample_rate))
    detector.reset()
    turns: list[RecordedTurn] = []
    for begin in range(0, len(samples), chunk):
        end = min(begin + chunk, len(samples))
        utterance = detector.feed(sample_rate, samples[begin:end])
        if utterance is not None:  # the rest of the chunk is scored with the next one, as in the app
            turns.append(RecordedTurn(utterance, end / sample_rate))
            detector.next_turn()
    return turns
