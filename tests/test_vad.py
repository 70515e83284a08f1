"""Pause detection on speech synthesized here with espeak-ng, run through the real silero-vad model."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import soxr
import torch

import vad
from tests.conftest import REPO_ROOT
from tests.speech import RATE, espeak_available, join, silence, speak, to_int16, trim, write_wav
from vad import (
    AudioInputError,
    DetectorState,
    PauseDetector,
    TurnEndReason,
    VadOptions,
    turns_in_recording,
)

pytestmark = pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed")

QUESTION = "Excuse me, could you tell me what the weather will be like in Paris tomorrow?"
SECOND_QUESTION = "And should I take an umbrella with me?"
CHUNK_SECS = 0.5
OPTIONS = VadOptions()


def voiced_span(samples: np.ndarray, offset_s: float = 0.0, rate: int = RATE) -> tuple[float, float]:
    """(first, last) audible sample of synthesized speech, in seconds, shifted by offset_s: the ground truth."""
    audible = np.nonzero(np.abs(samples) > 1e-3)[0]
    return offset_s + audible[0] / rate, offset_s + (audible[-1] + 1) / rate


def phrase(text: str, **kwargs) -> np.ndarray:
    """Speech without espeak's own trailing silence, so the gaps a test puts in are the real pauses."""
    return trim(speak(text, **kwargs))


@pytest.fixture(scope="module")
def question() -> np.ndarray:
    return phrase(QUESTION)


@pytest.fixture(scope="module")
def second_question() -> np.ndarray:
    return phrase(SECOND_QUESTION)


@pytest.fixture(scope="module")
def detector() -> PauseDetector:
    return PauseDetector()


def test_scorer_matches_stock_silero_window_by_window(question: np.ndarray) -> None:
    """Batching windows and carrying state by hand gives the stock model's probabilities, however split."""
    import silero_vad

    audio = join(silence(0.7), question, silence(1.0))
    windows = len(audio) // vad.WINDOW_SAMPLES
    stock = silero_vad.load_silero_vad()
    with torch.inference_mode():
        expected = np.array(
            [stock(torch.from_numpy(audio[i * 512 : (i + 1) * 512]), RATE).item() for i in range(windows)]
        )
    scorer = vad.SpeechScorer()
    got, start = [], 0
    for size in [1, 7, 16, 3, 40] * windows:
        if start >= windows:
            break
        stop = min(start + size, windows)
        got.append(scorer.score(audio[start * 512 : stop * 512]))
        start = stop
    got_all = np.concatenate(got)
    assert got_all.shape == expected.shape
    np.testing.assert_allclose(got_all, expected, atol=1e-4)
    assert expected.max() > 0.9 and expected.min() < 0.1  # the speech and silence both really are there


def test_hesitant_start_gives_one_whole_turn(detector: PauseDetector, question: np.ndarray) -> None:
    audio = join(silence(2.5), question, silence(2.0))
    onset, speech_end = voiced_span(question, offset_s=2.5)
    turns = turns_in_recording(RATE, to_int16(audio), CHUNK_SECS, detector)
    assert len(turns) == 1
    turn = turns[0]
    assert turn.utterance.reason is TurnEndReason.PAUSE
    assert turn.speech_start_s <= onset
    assert onset - turn.speech_start_s <= OPTIONS.pre_roll_secs + 0.1  # not the leading silence
    assert turn.speech_end_s >= speech_end - 0.1
    assert turn.turn_end_s > speech_end


def test_mid_utterance_pauses_do_not_end_the_turn(detector: PauseDetector) -> None:
    parts = [phrase("I was thinking"), phrase("that maybe we could"), phrase("go to the beach on Sunday.")]
    audio = join(silence(0.5), parts[0], silence(0.5), parts[1], silence(0.5), parts[2], silence(2.0))
    _, speech_end = voiced_span(audio)
    turns = turns_in_recording(RATE, audio, CHUNK_SECS, detector)
    assert len(turns) == 1
    assert turns[0].speech_end_s >= speech_end - 0.1


def test_two_questions_apart_give_two_turns(
    detector: PauseDetector, question: np.ndarray, second_question: np.ndarray
) -> None:
    audio = join(silence(1.0), question, silence(2.5), second_question, silence(2.0))
    second_onset = 1.0 + len(question) / RATE + 2.5
    turns = turns_in_recording(RATE, audio, CHUNK_SECS, detector)
    assert [turn.utterance.reason for turn in turns] == [TurnEndReason.PAUSE] * 2
    first_onset, first_end = voiced_span(question, 1.0)
    assert turns[0].speech_start_s <= first_onset < first_end <= turns[0].turn_end_s
    onset, end = voiced_span(second_question, second_onset)
    assert turns[1].speech_start_s <= onset < end <= turns[1].turn_end_s


@pytest.mark.parametrize("chunk_secs", [0.25, 0.5])
def test_turn_ends_within_pause_plus_one_chunk(
    detector: PauseDetector, question: np.ndarray, chunk_secs: float
) -> None:
    audio = join(silence(1.0), question, silence(3.0))
    _, speech_end = voiced_span(question, 1.0)
    turns = turns_in_recording(RATE, audio, chunk_secs, detector)
    assert len(turns) == 1
    delay = turns[0].turn_end_s - speech_end
    assert OPTIONS.pause_secs <= delay <= OPTIONS.pause_secs + chunk_secs


def test_utterance_holds_the_onset_and_the_tail(detector: PauseDetector, question: np.ndarray) -> None:
    """The handed-on audio is the input itself, from pre-roll before the onset to the tail after speech."""
    audio = join(silence(1.5), question, silence(2.0))
    onset, speech_end = voiced_span(question, 1.5)
    (turn,) = turns_in_recording(RATE, audio, CHUNK_SECS, detector)
    utterance = turn.utterance
    first = round(utterance.start_s * RATE)
    np.testing.assert_array_equal(utterance.audio, audio[first : first + len(utterance.audio)])
    assert utterance.start_s <= onset - 0.05  # the first syllable and a little before it
    assert utterance.start_s + utterance.duration_s >= speech_end
    assert utterance.duration_s == pytest.approx(utterance.speech_end_s + OPTIONS.tail_secs - utterance.start_s)
    assert utterance.audio.dtype == np.float32 and utterance.SAMPLE_RATE == RATE


def test_chunking_does_not_change_the_turns(detector: PauseDetector, question: np.ndarray) -> None:
    """Seamless chunk boundaries: the same utterances whether chunks are 0.1 s, 0.5 s or 777 samples."""
    audio = join(silence(1.0), question, silence(1.5), question, silence(1.5))
    onsets = [voiced_span(question, 1.0)[0], voiced_span(question, 2.5 + len(question) / RATE)[0]]
    results = []
    for chunk_secs in (0.1, 0.5, 777 / RATE):
        turns = turns_in_recording(RATE, audio, chunk_secs, detector)
        assert len(turns) == 2
        results.append(turns)
        for turn, onset in zip(turns, onsets):
            assert turn.speech_start_s <= onset
    first_turns = [turns[0].utterance for turns in results]
    for other in first_turns[1:]:  # before the first reset the windows are the same: exactly equal
        assert dataclasses.replace(other, audio=None) == dataclasses.replace(first_turns[0], audio=None)
        np.testing.assert_array_equal(other.audio, first_turns[0].audio)
    # after a reset, the windows line up with the chunk where the previous turn ended: equal to about a window
    second_ends = [turns[1].speech_end_s for turns in results]
    assert max(second_ends) - min(second_ends) <= 0.1


def test_44k1_stereo_float_gives_the_same_turns_as_16k_mono_int16(
    detector: PauseDetector, question: np.ndarray, second_question: np.ndarray
) -> None:
    mono = join(silence(2.0), question, silence(2.5), second_question, silence(2.0))
    turns_16k = turns_in_recording(RATE, to_int16(mono), CHUNK_SECS, detector)

    hi = 44_100
    q, q2 = phrase(QUESTION, rate=hi), phrase(SECOND_QUESTION, rate=hi)
    mono_hi = join(silence(2.0, hi), q, silence(2.5, hi), q2, silence(2.0, hi))
    stereo = np.stack([mono_hi, 0.8 * mono_hi], axis=1)
    turns_hi = turns_in_recording(hi, stereo, CHUNK_SECS, detector)

    assert len(turns_16k) == len(turns_hi) == 2
    for low, high in zip(turns_16k, turns_hi):
        assert low.utterance.reason is high.utterance.reason
        assert high.speech_start_s == pytest.approx(low.speech_start_s, abs=0.07)
        assert high.speech_end_s == pytest.approx(low.speech_end_s, abs=0.07)
        assert high.turn_end_s == pytest.approx(low.turn_end_s, abs=CHUNK_SECS)


@pytest.mark.parametrize("rate", [8_000, 48_000, 96_000])
def test_other_rates_find_the_turn(detector: PauseDetector, rate: int) -> None:
    audio = join(silence(1.0, rate), phrase(SECOND_QUESTION, rate=rate), silence(1.5, rate))
    turns = turns_in_recording(rate, audio, CHUNK_SECS, detector)
    assert len(turns) == 1 and turns[0].utterance.reason is TurnEndReason.PAUSE


def test_a_rate_change_mid_turn_keeps_the_turn(detector: PauseDetector, question: np.ndarray) -> None:
    """A microphone switched mid-turn: the resampler is flushed and replaced, and the turn goes on."""
    audio = join(silence(1.0), question, silence(2.0))
    half = len(audio) // 2
    first = soxr.resample(audio[:half], RATE, 48_000)
    detector.reset()
    found = [detector.feed(48_000, first[i : i + 24_000]) for i in range(0, len(first), 24_000)]
    found += [detector.feed(RATE, audio[i : i + 8000]) for i in range(half, len(audio), 8000)]
    utterances = [u for u in found if u is not None]
    assert len(utterances) == 1
    onset, speech_end = voiced_span(question, 1.0)
    assert utterances[0].start_s <= onset and utterances[0].speech_end_s >= speech_end - 0.1


def test_silence_and_empty_chunks_never_make_a_turn(detector: PauseDetector) -> None:
    detector.reset()
    rng = np.random.default_rng(0)
    for _ in range(60):  # 30 s of digital silence and faint room noise, with empty chunks in between
        assert detector.feed(RATE, np.zeros(8000, dtype=np.int16)) is None
        assert detector.feed(RATE, np.zeros(0, dtype=np.int16)) is None
        assert detector.feed(44_100, np.zeros((0, 2), dtype=np.float32)) is None
        assert detector.feed(RATE, (rng.normal(0, 0.003, 8000)).astype(np.float32)) is None
        assert detector.state is DetectorState.WAITING


def test_clicks_and_a_beep_do_not_make_a_turn(detector: PauseDetector) -> None:
    rng = np.random.default_rng(1)
    clicks = silence(4.0)
    for at in rng.uniform(0.1, 3.8, size=20):  # key clicks: 5 ms decaying noise bursts
        start = int(at * RATE)
        clicks[start : start + 80] += rng.normal(0, 0.4, 80) * np.exp(-np.arange(80) / 20)
    t = np.arange(int(0.4 * RATE)) / RATE
    beep = (0.3 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    audio = join(clicks, silence(0.5), beep, silence(2.0))
    assert turns_in_recording(RATE, audio, CHUNK_SECS, detector) == []


def test_forty_second_monologue_ends_at_max_utterance(detector: PauseDetector) -> None:
    words = " ".join(["and then we walked along the river, talking about everything we had seen that day"] * 10)
    speech = phrase(words, words_per_minute=175)
    assert len(speech) / RATE > 40
    audio = join(silence(1.0), speech, silence(1.0))
    turns = turns_in_recording(RATE, audio, CHUNK_SECS, detector)
    first = turns[0]
    assert first.utterance.reason is TurnEndReason.MAX_LENGTH
    assert first.utterance.duration_s == pytest.approx(OPTIONS.max_utterance_secs, abs=1 / RATE)
    assert first.turn_end_s <= first.speech_start_s + OPTIONS.max_utterance_secs + CHUNK_SECS


def test_interleaved_detectors_are_independent(question: np.ndarray, second_question: np.ndarray) -> None:
    """Two users' chunks through two detectors, alternately, give exactly what each gives alone."""
    audio_a = to_int16(join(silence(0.5), question, silence(1.5)))
    audio_b = join(silence(1.3), second_question, silence(0.7), second_question, silence(1.5))

    def chunks(audio: np.ndarray, size: int) -> list[np.ndarray]:
        return [audio[i : i + size] for i in range(0, len(audio), size)]

    def run_alone(rate: int, audio: np.ndarray, size: int) -> list:
        detector = PauseDetector()
        return [detector.feed(rate, chunk) for chunk in chunks(audio, size)]

    alone_a, alone_b = run_alone(RATE, audio_a, 8000), run_alone(RATE, audio_b, 5000)
    a, b = PauseDetector(), PauseDetector()
    together_a, together_b = [], []
    for chunk_a, chunk_b in zip(chunks(audio_a, 8000), chunks(audio_b, 5000)):
        together_a.append(a.feed(RATE, chunk_a))
        together_b.append(b.feed(RATE, chunk_b))
    together_b += [b.feed(RATE, chunk) for chunk in chunks(audio_b, 5000)[len(together_b) :]]
    together_a += [a.feed(RATE, chunk) for chunk in chunks(audio_a, 8000)[len(together_a) :]]

    for alone, together in ((alone_a, together_a), (alone_b, together_b)):
        found = [u for u in alone if u is not None]
        assert len(found) == 1
        assert [u is None for u in alone] == [u is None for u in together]
        for mine, theirs in zip(alone, together):
            if mine is not None:
                assert dataclasses.replace(mine, audio=None) == dataclasses.replace(theirs, audio=None)
                np.testing.assert_array_equal(mine.audio, theirs.audio)


def test_nan_and_inf_samples_are_cleaned(detector: PauseDetector, question: np.ndarray) -> None:
    clean = join(silence(1.0), question, silence(1.5))
    dirty = clean.copy()
    dirty[100:200] = np.nan
    dirty[300] = np.inf
    dirty[400] = -np.inf
    turns_clean = turns_in_recording(RATE, clean, CHUNK_SECS, detector)
    turns_dirty = turns_in_recording(RATE, dirty, CHUNK_SECS, detector)
    assert len(turns_dirty) == len(turns_clean) == 1
    assert np.isfinite(turns_dirty[0].utterance.audio).all()
    assert turns_dirty[0].speech_end_s == turns_clean[0].speech_end_s


@pytest.mark.parametrize(
    ("rate", "samples"),
    [
        (RATE, np.array(["a", "b"])),
        (RATE, np.zeros(100, dtype=bool)),
        (RATE, np.zeros(100, dtype=np.complex64)),
        (RATE, np.array([None, 1.0], dtype=object)),
        (RATE, None),
        (RATE, np.zeros((10, 2, 2), dtype=np.float32)),
        (RATE, np.float32(0.5)),
        (RATE, np.zeros((2, 16000), dtype=np.int16)),  # channels first: refused rather than misread
        (4_000, np.zeros(100, dtype=np.int16)),
        (200_000, np.zeros(100, dtype=np.int16)),
        (16000.0, np.zeros(100, dtype=np.int16)),
    ],
)
def test_bad_input_raises_one_clear_error(rate, samples) -> None:
    detector = PauseDetector()
    with pytest.raises(AudioInputError) as raised:
        detector.feed(rate, samples)
    message = str(raised.value)
    assert message[0].isupper() and message.endswith(".") and "\n" not in message
    assert detector.state is DetectorState.WAITING


def test_states_and_feeds_after_the_turn(detector: PauseDetector, question: np.ndarray) -> None:
    detector.reset()
    audio = join(silence(1.0), question, silence(2.0))
    seen = []
    utterance = None
    for i in range(0, len(audio), 4000):
        utterance = detector.feed(RATE, audio[i : i + 4000])
        seen.append(detector.state)
        if utterance is not None:
            break
    assert utterance is not None
    assert seen[0] is DetectorState.WAITING and seen[-1] is DetectorState.ENDED
    assert DetectorState.SPEAKING in seen and DetectorState.PAUSING in seen
    assert detector.feed(RATE, to_int16(question)) is None  # ignored until reset
    assert detector.state is DetectorState.ENDED
    detector.reset()
    assert detector.state is DetectorState.WAITING


@pytest.mark.slow
def test_turn_latency_bench_reports_the_turns(tmp_path, question: np.ndarray, second_question: np.ndarray) -> None:
    """The tuning tool users run on their own recordings: one JSON object on the last line, turns in file time."""
    audio = join(silence(1.0), question, silence(2.5), second_question, silence(2.0))
    wav = write_wav(tmp_path / "two.wav", audio)
    bench = REPO_ROOT / "bench" / "turn_latency.py"
    run = subprocess.run(
        [sys.executable, str(bench), "--wav", str(wav), "--no-semantic", "--chunk-secs", "0.25", "--pause-secs", "0.7"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["options"]["pause_secs"] == 0.7 and report["chunk_secs"] == 0.25
    ends = [voiced_span(question, 1.0)[1], voiced_span(second_question, 3.5 + len(question) / RATE)[1]]
    assert [turn["reason"] for turn in report["turns"]] == ["pause", "pause"]
    for turn, end in zip(report["turns"], ends):
        assert turn["speech_start_s"] < end < turn["turn_end_s"] <= end + 0.7 + 0.25 + 0.2
    assert report["vad_cpu_ms_per_audio_s"] > 0

    bad = subprocess.run(
        [sys.executable, str(bench), "--wav", str(tmp_path / "missing.wav")], capture_output=True, text=True
    )
    assert bad.returncode != 0 and "cannot use" in bad.stderr and "Traceback" not in bad.stderr


def test_options_are_validated() -> None:
    assert VadOptions().pause_secs == 0.8 and VadOptions().start_secs == 0.25
    for bad in (
        {"pause_secs": 0},
        {"start_secs": -1},
        {"pre_roll_secs": -0.1},
        {"tail_secs": 1.0},
        {"threshold": 0.3, "off_threshold": 0.5},
        {"threshold": 1.0},
    ):
        with pytest.raises(ValueError):
            VadOptions(**bad)


def test_over_a_reply_speech_must_clear_the_raised_bar_and_the_stream_runs_on(question: np.ndarray) -> None:
    """next_turn keeps one clock across turns; over a reply a turn starts later (0.8 in every window for
    0.3 s rather than 0.5 then 0.35 for 0.25 s), and it still keeps its first syllable."""
    audio = join(silence(1.0), trim(question), silence(1.0))
    started_at = {}
    for over_reply in (False, True):
        detector = PauseDetector()
        detector.feed(RATE, silence(2.0))
        detector.next_turn(over_reply=over_reply)
        for start in range(0, len(audio), 512):
            detector.feed(RATE, audio[start : start + 512])
            if detector.speech_started:
                started_at[over_reply] = detector.heard_s
                break
        assert detector.speech_so_far().size > 0
        assert detector.heard_s > 3.0, "the clock counts the audio before next_turn"
    assert started_at[True] - started_at[False] >= 0.06, started_at
