"""Test speech made on the spot with espeak-ng, so tests need no recorded data."""

from __future__ import annotations

import io
import shutil
import subprocess
import wave
from pathlib import Path

import numpy as np

RATE = 16_000


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def speak(text: str, *, voice: str = "en-us", words_per_minute: int = 160, rate: int = RATE) -> np.ndarray:
    """Synthesize `text` and return float32 mono samples at `rate` (espeak's own 22.05 kHz resampled by ffmpeg).
    `text` may hold SSML breaks, `<break time="700ms"/>`: a pause inside one sentence keeps the sentence's
    intonation (it goes on), where phrases spoken separately would each sound finished."""
    wav = subprocess.run(
        ["espeak-ng", "-m", "-v", voice, "-s", str(words_per_minute), "--stdout", text],
        check=True,
        capture_output=True,
    ).stdout
    pcm = subprocess.run(
        [
            "ffmpeg",
            "-nostdin",
            "-loglevel",
            "error",
            "-i",
            "pipe:0",
            "-f",
            "s16le",
            "-ac",
            "1",
            "-ar",
            str(rate),
            "pipe:1",
        ],
        input=wav,
        check=True,
        capture_output=True,
    ).stdout
    return np.frombuffer(pcm, dtype=np.int16).astype(np.float32) / 32768.0


def trim(samples: np.ndarray, floor: float = 1e-3) -> np.ndarray:
    """Drop leading and trailing silence (espeak ends each phrase with about 0.35 s of it), so a gap put
    between phrases is the real pause."""
    audible = np.nonzero(np.abs(samples) > floor)[0]
    if len(audible) == 0:
        return samples[:0]
    return samples[audible[0] : audible[-1] + 1]


def silence(seconds: float, rate: int = RATE) -> np.ndarray:
    return np.zeros(round(seconds * rate), dtype=np.float32)


def join(*parts: np.ndarray) -> np.ndarray:
    return np.concatenate(parts).astype(np.float32)


def to_int16(samples: np.ndarray) -> np.ndarray:
    return (np.clip(samples, -1.0, 1.0) * 32767.0).round().astype(np.int16)


def wav_bytes(samples: np.ndarray, rate: int = RATE) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(to_int16(samples).tobytes())
    return buffer.getvalue()


def write_wav(path: Path, samples: np.ndarray, rate: int = RATE) -> Path:
    path.write_bytes(wav_bytes(samples, rate))
    return path


def float_wav(samples: np.ndarray, rate: int = RATE) -> bytes:
    """A 32-bit IEEE float mono WAV, written by hand (the stdlib writes integer PCM only)."""
    body = samples.astype("<f4").tobytes()
    fmt = (
        (3).to_bytes(2, "little")
        + (1).to_bytes(2, "little")
        + rate.to_bytes(4, "little")
        + (4 * rate).to_bytes(4, "little")
        + (4).to_bytes(2, "little")
        + (32).to_bytes(2, "little")
    )
    chunks = b"fmt " + len(fmt).to_bytes(4, "little") + fmt + b"data" + len(body).to_bytes(4, "little") + body
    return b"RIFF" + (4 + len(chunks)).to_bytes(4, "little") + b"WAVE" + chunks
