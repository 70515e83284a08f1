"""Is the speech the microphone hears while a reply plays the user, or the reply coming back from the speakers?

The browser's echo canceller removes most of the reply from the microphone, but not everywhere (some browsers
cancel only WebRTC peer audio, a phone on speaker leaks more) and silero-vad is blind to level: a -20 dB
copy of speech scores as speech as surely as the speech itself. The app, though, knows exactly what the reply
said. An echo is the reply delayed and scaled (plus the room), so it correlates strongly with some stretch of
the reply; a person talking over the reply does not. One check costs a few milliseconds and runs only when
speech starts over a reply, not per chunk.
"""

from __future__ import annotations

import numpy as np
import soxr

# Normalized cross-correlation at or above which speech is taken for the reply's echo. A delayed -20 dB copy
# scores 1.0; another sentence in the same espeak voice 0.26, with that -20 dB echo under it 0.26 too (the
# echo is a tenth of the amplitude), white noise 0.06 (tests/test_echo_gate.py).
ECHO_CORRELATION = 0.5
REFERENCE_S = 10.0  # how far back in the reply an echo is looked for (the player's buffer plus the room)
# Both sides are compared at 8 kHz: speech's echo is recognised as surely, and one check against 10 s of
# reply takes about 9 ms instead of 40 ms at 16 kHz (2-core machine): it is on the cut-in's critical path.
CHECK_RATE = 8_000


def echo_likeness(heard: np.ndarray, reference: np.ndarray) -> float:
    """Largest normalized cross-correlation between `heard` and any equally long stretch of `reference`
    (same sample rate): 1.0 when `heard` is an exact scaled copy of part of the reference, near 0 when unrelated."""
    heard = np.asarray(heard, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    size = len(heard)
    if size == 0 or len(reference) < size:
        return 0.0
    heard_energy = float(np.dot(heard, heard))
    if heard_energy == 0.0:
        return 0.0
    fft_size = 1 << (len(reference) + size - 1).bit_length()
    spectrum = np.fft.rfft(reference, fft_size) * np.conj(np.fft.rfft(heard, fft_size))
    lags = len(reference) - size + 1
    products = np.fft.irfft(spectrum, fft_size)[:lags]  # products[k] = sum_i heard[i] * reference[k + i]
    energy = np.concatenate([[0.0], np.cumsum(reference * reference)])
    # A nearly silent stretch of the reply cannot be what was heard; the floor (-40 dB) keeps rounding noise
    # divided by almost nothing from looking like a match.
    window_energy = np.maximum(energy[size:] - energy[:lags], 1e-4 * heard_energy)
    return float(np.max(np.abs(products) / np.sqrt(heard_energy * window_energy)))


def is_echo(heard: np.ndarray, reference: np.ndarray, threshold: float = ECHO_CORRELATION) -> bool:
    """Whether `heard` (speech that started over a reply) is that reply's own sound coming back."""
    return echo_likeness(heard, reference) >= threshold


def is_reply_echo(heard: np.ndarray, heard_rate: int, reply_pcm: bytes | bytearray, reply_rate: int) -> bool:
    """`is_echo` against the last REFERENCE_S of a reply given as s16le PCM at its own rate."""
    usable = len(reply_pcm) - len(reply_pcm) % 2
    recent = np.frombuffer(reply_pcm[max(0, usable - 2 * round(REFERENCE_S * reply_rate)) : usable], dtype="<i2")
    if len(recent) == 0:
        return False
    reference = soxr.resample(recent.astype(np.float32) / 32768.0, reply_rate, CHECK_RATE)
    return is_echo(soxr.resample(np.asarray(heard, dtype=np.float32), heard_rate, CHECK_RATE), reference)
