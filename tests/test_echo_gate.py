"""The echo gate: speech heard while a reply plays is the reply's echo only when it is a delayed, scaled copy
of some stretch of the reply. Real espeak-ng speech, so the margins are those of speech, not of tones."""

from __future__ import annotations

import numpy as np
import pytest
import soxr

from echo_gate import ECHO_CORRELATION, REFERENCE_S, echo_likeness, is_reply_echo
from tests.speech import espeak_available, join, silence, speak, trim

pytestmark = pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed")

ECHO_GAIN = 0.1  # -20 dB: what leaks past a browser's echo canceller from loud speakers
DELAY = 4_000  # 250 ms at 16 kHz into the reply: the player's buffer plus the room
HEARD = 8_000  # 0.5 s: about what the detector has when speech starts over a reply


@pytest.fixture(scope="module")
def reply() -> np.ndarray:
    """What the app said (16 kHz): the reference an echo comes from."""
    return trim(speak("The capital of France is Paris, a city on the river Seine."))


@pytest.fixture(scope="module")
def user() -> np.ndarray:
    """The user talking over it: another sentence in the same voice, the hardest case for the gate."""
    return trim(speak("Wait, tell me about the weather instead."))


def echo_of(reply: np.ndarray) -> np.ndarray:
    return ECHO_GAIN * reply[DELAY : DELAY + HEARD]


def reply_pcm_24k(reply: np.ndarray) -> bytes:
    """The reply as the app holds it: s16le at the model's 24 kHz."""
    return (np.clip(soxr.resample(reply, 16_000, 24_000), -1, 1) * 32767).astype("<i2").tobytes()


def test_a_delayed_scaled_copy_is_the_reply(reply: np.ndarray) -> None:
    assert echo_likeness(echo_of(reply), reply) == pytest.approx(1.0, abs=1e-6)
    assert echo_likeness(-echo_of(reply), reply) == pytest.approx(1.0, abs=1e-6), "a phase-inverting speaker"


def test_other_speech_is_not(reply: np.ndarray, user: np.ndarray) -> None:
    assert echo_likeness(user[:HEARD], reply) < ECHO_CORRELATION


def test_the_user_talking_over_the_echo_is_not_the_echo(reply: np.ndarray, user: np.ndarray) -> None:
    over = user[:HEARD] + echo_of(reply)
    likeness = echo_likeness(over, reply)
    assert 0 < likeness < ECHO_CORRELATION, "a tenth of the amplitude cannot make the user's words an echo"


def test_noise_is_not_echo(reply: np.ndarray) -> None:
    noise = np.random.default_rng(7).normal(0, 0.05, HEARD)
    assert echo_likeness(noise, reply) < 0.2


def test_silence_and_too_long_a_stretch_are_not_echo(reply: np.ndarray) -> None:
    assert echo_likeness(np.zeros(HEARD), reply) == 0.0
    assert echo_likeness(np.zeros(0), reply) == 0.0
    assert echo_likeness(reply[:HEARD], np.zeros(len(reply))) == 0.0, "a silent reply matches nothing"
    longer = np.concatenate([reply, reply[:100]])
    assert echo_likeness(longer, reply) == 0.0, "heard longer than the reply cannot be its echo"


def test_the_replys_pcm_at_its_own_rate_gates_its_echo(reply: np.ndarray, user: np.ndarray) -> None:
    pcm = reply_pcm_24k(reply)
    assert is_reply_echo(echo_of(reply), 16_000, pcm, 24_000)
    assert not is_reply_echo(user[:HEARD], 16_000, pcm, 24_000)
    assert not is_reply_echo(user[:HEARD] + echo_of(reply), 16_000, pcm, 24_000)
    assert is_reply_echo(echo_of(reply), 16_000, pcm + b"\x00", 24_000), "a stray odd byte is ignored"
    assert not is_reply_echo(echo_of(reply), 16_000, b"", 24_000), "no reply yet: nothing to echo"


def test_only_the_replys_recent_audio_is_searched(reply: np.ndarray, user: np.ndarray) -> None:
    """An echo comes back within the player's buffer and the room's delay: what the reply said more than
    REFERENCE_S ago is not searched (which keeps each check to a few milliseconds on a long reply)."""
    long_reply = join(reply, silence(REFERENCE_S - len(user) / 16_000 + 0.5), user)
    pcm = reply_pcm_24k(long_reply)
    assert not is_reply_echo(echo_of(reply), 16_000, pcm, 24_000)
    assert is_reply_echo(ECHO_GAIN * user[:HEARD], 16_000, pcm, 24_000)
