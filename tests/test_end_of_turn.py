"""The end of a turn judged by the end-of-turn model (end_of_turn.py, vad.py), its weights (turn_weights.py)
and what the page says without it.

The detector's mechanics are driven by scripted verdicts (the model is an edge here: what matters is what the
detector does with an answer); what the model itself hears is tested on espeak-ng speech it judges correctly
and on real recordings (bench/real_speech.py fetches them; .ci/run does), skipping where those are absent.
Synthetic speech fools the model in places: README's "When does a turn end" has the figures.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import end_of_turn
import turn_weights
from end_of_turn import WINDOW_SAMPLES, SharedTurnModel, TurnModel, turn_features
from tests.speech import espeak_available, join, silence, speak, trim, write_wav
from vad import PauseDetector, TurnEndReason, VadOptions, turns_in_recording

REPO_ROOT = Path(__file__).resolve().parent.parent
REAL_SPEECH = REPO_ROOT / "test-output" / "real_speech"
RATE = 16_000
FRAME_S = 0.032  # the live page's frames
needs_espeak = pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed")


def said(text: str, voice: str = "en-us") -> np.ndarray:
    return trim(speak(text, voice=voice))


def ends(audio: np.ndarray, options: VadOptions = VadOptions(), completion=None):
    """The turns of `audio` fed in the page's frames, and the detector (for its model calls)."""
    detector = PauseDetector(options, completion)
    return turns_in_recording(RATE, audio, FRAME_S, detector), detector


class Scripted:
    """Verdicts given in turn (the last one repeats), recording the audio each call was given."""

    def __init__(self, *verdicts: float | None) -> None:
        self.verdicts = list(verdicts)
        self.heard: list[int] = []

    def __call__(self, audio: np.ndarray) -> float | None:
        self.heard.append(len(audio))
        return self.verdicts.pop(0) if len(self.verdicts) > 1 else self.verdicts[0]


@pytest.fixture(scope="module")
def question() -> np.ndarray:
    return said("What time does the museum open on Saturday?")


# -- the detector with scripted verdicts ----------------------------------------------------------------------


@needs_espeak
def test_a_finished_turn_ends_at_the_first_check(question: np.ndarray) -> None:
    verdicts = Scripted(0.9)
    (turn,), detector = ends(join(silence(0.5), question, silence(2.5)), completion=verdicts)
    speech_end = 0.5 + len(question) / RATE
    assert turn.utterance.reason is TurnEndReason.COMPLETE
    assert speech_end < turn.turn_end_s < speech_end + 0.5, "answered a breath after the last word"
    assert detector.model_calls == 1 and verdicts.heard[0] <= WINDOW_SAMPLES


@needs_espeak
def test_an_unfinished_turn_waits_for_the_fallback_and_is_asked_once_per_pause(question: np.ndarray) -> None:
    verdicts = Scripted(0.2)
    (turn,), detector = ends(join(silence(0.5), question, silence(3.0)), completion=verdicts)
    speech_end = 0.5 + len(question) / RATE
    assert turn.utterance.reason is TurnEndReason.PAUSE
    fallback = VadOptions().fallback_secs
    assert speech_end + fallback <= turn.turn_end_s < speech_end + fallback + 0.4
    assert detector.model_calls == len(verdicts.heard) == 1

    options = VadOptions(recheck_secs=(0.6, 1.2), fallback_secs=2.0)
    (turn,), detector = ends(join(silence(0.5), question, silence(3.0)), options, Scripted(0.2))
    assert detector.model_calls == 3 and speech_end + 2.0 <= turn.turn_end_s < speech_end + 2.4


@needs_espeak
def test_without_a_model_the_turn_ends_after_the_silence_pause(question: np.ndarray) -> None:
    speech_end = 0.5 + len(question) / RATE
    for completion in (None, Scripted(None)):
        (turn,), detector = ends(join(silence(0.5), question, silence(2.5)), completion=completion)
        assert turn.utterance.reason is TurnEndReason.PAUSE and detector.model_calls == 0
        assert speech_end + 0.8 <= turn.turn_end_s < speech_end + 0.8 + 0.4
    (turn,), _ = ends(join(silence(0.5), question, silence(2.5)), VadOptions(semantic=False), Scripted(0.9))
    assert turn.utterance.reason is TurnEndReason.PAUSE, "semantic off: silence alone, whatever a model says"


@needs_espeak
def test_a_turn_the_model_ended_too_soon_is_continued_when_the_user_goes_on() -> None:
    first, rest = said("I would like to"), said("book a table for two.")
    audio = join(silence(0.5), first, silence(0.9), rest, silence(2.5))
    turns, _ = ends(audio, completion=Scripted(0.9, 0.9))
    assert [turn.utterance.continues for turn in turns] == [False, True]
    early, whole = turns
    assert early.turn_end_s < 0.5 + len(first) / RATE + 0.5
    assert whole.utterance.start_s == early.utterance.start_s, "the continued turn holds the first words"
    assert whole.speech_end_s > 0.5 + (len(first) + len(rest)) / RATE + 0.8

    separate, _ = ends(audio, VadOptions(resume_secs=0.0), Scripted(0.9, 0.9))
    assert [turn.utterance.continues for turn in separate] == [False, False]
    assert separate[1].utterance.start_s > early.speech_end_s

    later = join(silence(0.5), first, silence(2.5), rest, silence(2.5))
    turns, _ = ends(later, completion=Scripted(0.9, 0.9))
    assert [turn.utterance.continues for turn in turns] == [False, False], "past resume_secs it is a new turn"


@needs_espeak
def test_model_calls_stay_bounded_and_short_in_a_long_monologue() -> None:
    phrase = said("and then we walked along the river")
    audio = join(silence(0.5), *[join(phrase, silence(0.5)) for _ in range(25)], silence(2.0))  # about 50 s
    verdicts = Scripted(0.1)
    detector = PauseDetector(VadOptions(), verdicts)
    frame = round(FRAME_S * RATE)
    turn = next(
        filter(None, (detector.feed(RATE, audio[start : start + frame]) for start in range(0, len(audio), frame)))
    )
    assert turn.reason is TurnEndReason.MAX_LENGTH, "max_utterance_secs still holds"
    pauses_in_30_s = 30 / (len(phrase) / RATE + 0.5)
    assert detector.model_calls <= pauses_in_30_s + 1, "one call per pause"
    assert max(verdicts.heard) <= WINDOW_SAMPLES, "each call hears at most the last 8 s"


def test_options_are_validated() -> None:
    for bad in (
        {"check_secs": 0},
        {"fallback_secs": 0.1},
        {"recheck_secs": (0.1,)},
        {"recheck_secs": (0.8, 0.5)},
        {"recheck_secs": (2.5,)},
        {"completion_threshold": 1.0},
        {"resume_secs": -1},
        {"tail_secs": 0.3},
    ):
        with pytest.raises(ValueError):
            VadOptions(**bad)
    assert VadOptions(semantic=False, tail_secs=0.3).tail_secs == 0.3, "without the model only pause_secs bounds it"


# -- the model's features and weights -----------------------------------------------------------------------


def test_features_hear_the_last_8_seconds_padded_in_front() -> None:
    rng = np.random.default_rng(0)
    long = rng.normal(0, 0.1, 10 * RATE).astype(np.float32)
    features = turn_features(long)
    assert features.shape == (80, 800) and features.dtype == np.float32
    np.testing.assert_array_equal(features, turn_features(long[-WINDOW_SAMPLES:]))
    short = long[: 2 * RATE]
    np.testing.assert_array_equal(
        turn_features(short), turn_features(np.concatenate([np.zeros(6 * RATE, np.float32), short]))
    )
    assert not np.array_equal(turn_features(short), turn_features(long[-2 * RATE :]))


def test_missing_or_wrong_weights_are_refused_in_a_sentence(tmp_path: Path) -> None:
    missing = tmp_path / "absent.onnx"
    with pytest.raises(turn_weights.WeightsUnavailable, match="absent.onnx is missing, and fetching is off"):
        turn_weights.ensure(missing, sources=())
    wrong = tmp_path / "wrong.onnx"
    wrong.write_bytes(b"not a model")
    model = SharedTurnModel(wrong, fetch=False).load_now()
    assert not model.loading and "not the expected file" in (model.problem or "")
    assert model.completion(np.zeros(RATE, np.float32)) is None
    with pytest.raises(turn_weights.WeightsUnavailable, match="does not match its SHA-256"):
        turn_weights.install_verified(open(wrong, "rb"), tmp_path / "installed.onnx")
    assert not (tmp_path / "installed.onnx").exists() and not (tmp_path / "installed.onnx.partial").exists()


# -- the real model -------------------------------------------------------------------------------------------


def test_the_model_runs_on_its_own_thread(turn_model: SharedTurnModel, monkeypatch: pytest.MonkeyPatch) -> None:
    model = TurnModel(turn_weights.default_path())
    threads = []
    features = end_of_turn.turn_features  # computed where the model runs, just before it
    monkeypatch.setattr(
        end_of_turn, "turn_features", lambda audio: threads.append(threading.current_thread().name) or features(audio)
    )
    probability = model.completion(np.zeros(RATE, np.float32))
    assert 0.0 <= probability <= 1.0 and threads == [threads[0]] and threads[0].startswith("turn-model")
    assert threading.current_thread().name != threads[0]


@pytest.mark.slow
@needs_espeak
@pytest.mark.parametrize("voice", ["en-us", "en-gb", "en-us+f3"])
def test_a_clear_question_ends_well_before_the_fallback(turn_model: SharedTurnModel, voice: str) -> None:
    """(In en-us, "Excuse me," alone sounds finished: that turn ends at the comma and the rest continues it.)"""
    text = "Excuse me, could you tell me what the weather will be like in Paris tomorrow?"
    spoken = said(text, voice)
    turns, _ = ends(join(silence(0.5), spoken, silence(2.5)), completion=turn_model.completion)
    assert all(turn.utterance.continues for turn in turns[1:]) and turns[-1].speech_start_s <= 0.5
    assert turns[-1].utterance.reason is TurnEndReason.COMPLETE
    assert 0 < turns[-1].turn_end_s - (0.5 + len(spoken) / RATE) < 0.6


@needs_espeak
def test_a_sentence_with_a_pause_inside_is_one_turn(turn_model: SharedTurnModel) -> None:
    spoken = said('I would like to <break time="800ms"/> book a table for two.')
    turns, _ = ends(join(silence(0.5), spoken, silence(3.0)), completion=turn_model.completion)
    whole = turns[-1]
    assert all(turn.utterance.continues for turn in turns[1:])
    assert whole.speech_start_s <= 0.5 and whole.turn_end_s > 0.5 + len(spoken) / RATE


@needs_espeak
@pytest.mark.parametrize("voice", ["en-us", "en-gb"])
def test_a_hesitant_start_is_one_turn(turn_model: SharedTurnModel, voice: str) -> None:
    """en-gb's lone "Um" sounds finished to the model: that turn is ended, then continued."""
    spoken = said('Um <break time="700ms"/> which of these two laptops would you recommend?', voice)
    turns, _ = ends(join(silence(0.5), spoken, silence(3.0)), completion=turn_model.completion)
    assert all(turn.utterance.continues for turn in turns[1:])
    assert turns[-1].speech_start_s <= 0.5 and turns[-1].turn_end_s > 0.5 + len(spoken) / RATE


@needs_espeak
@pytest.mark.parametrize("answer", ["Yes.", "No."])
def test_yes_and_no_still_end(turn_model: SharedTurnModel, answer: str) -> None:
    spoken = said(answer)
    (turn,), _ = ends(join(silence(0.5), spoken, silence(3.0)), completion=turn_model.completion)
    assert turn.turn_end_s <= 0.5 + len(spoken) / RATE + VadOptions().fallback_secs + 0.3


@needs_espeak
def test_interleaved_conversations_stay_independent(turn_model: SharedTurnModel, question: np.ndarray) -> None:
    audios = [join(silence(0.5), question, silence(2.5)), join(silence(1.0), said("Yes."), silence(3.0))]
    alone = [
        [(t.turn_end_s, t.utterance.reason) for t in ends(audio, completion=turn_model.completion)[0]]
        for audio in audios
    ]
    detectors = [PauseDetector(VadOptions(), turn_model.completion) for _ in audios]
    found: list[list] = [[], []]
    frame = round(FRAME_S * RATE)
    for start in range(0, max(map(len, audios)), frame):
        for index, (detector, audio) in enumerate(zip(detectors, audios)):
            if start < len(audio):
                utterance = detector.feed(RATE, audio[start : start + frame])
                if utterance is not None:
                    found[index].append((min(start + frame, len(audio)) / RATE, utterance.reason))
                    detector.next_turn()
    assert found == alone


def real_speech(name: str) -> tuple[int, np.ndarray, dict]:
    manifest = REAL_SPEECH / "cases.json"
    cases = {case["name"]: case for case in json.loads(manifest.read_text())} if manifest.exists() else {}
    if name not in cases:
        pytest.skip(f"{name} is not in {REAL_SPEECH} (python bench/real_speech.py fetches the recordings)")
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    from turn_latency import read_wav

    rate, samples = read_wav(REAL_SPEECH / cases[name]["wav"])
    return rate, samples, cases[name]["turns"][0]


@pytest.mark.parametrize("name", ["save_folder", "change_to", "weasels", "go_forward"])
def test_real_questions_and_commands_end_well_before_the_fallback(turn_model: SharedTurnModel, name: str) -> None:
    rate, samples, truth = real_speech(name)
    (turn,) = turns_in_recording(rate, samples, FRAME_S, PauseDetector(VadOptions(), turn_model.completion))
    assert turn.utterance.reason is TurnEndReason.COMPLETE
    assert 0 < turn.turn_end_s - truth["speech_end_s"] < 0.6


def test_kennedys_sentence_with_three_pauses_is_answered_whole(turn_model: SharedTurnModel) -> None:
    """ "And so my fellow Americans, [1.2 s] ask not what your country can do for you, [1.1 s] ask what you can
    do [0.6 s] for your country." The model hears the first pause as an end (it sounds like one); the words
    after it continue that turn, and the later pauses are heard as unfinished."""
    rate, samples, truth = real_speech("jfk")
    turns = turns_in_recording(rate, samples, FRAME_S, PauseDetector(VadOptions(), turn_model.completion))
    assert all(turn.utterance.continues for turn in turns[1:]) and len(turns) <= 2
    whole = turns[-1]
    assert whole.speech_start_s <= truth["speech_start_s"] and whole.turn_end_s > truth["speech_end_s"]


@pytest.mark.slow
def test_the_bench_runs_the_apps_defaults(tmp_path: Path, turn_model: SharedTurnModel) -> None:
    if not espeak_available():
        pytest.skip("espeak-ng is not installed")
    wav = write_wav(tmp_path / "q.wav", join(silence(0.5), said("Where is the station?"), silence(2.5)))
    run = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / "turn_latency.py"), "--wav", str(wav)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["chunk_secs"] == FRAME_S and report["options"]["semantic"] is True
    assert report["model_calls"] >= 1 and report["model_ms_per_call"] > 0 and len(report["turns"]) == 1
