"""The audio files a conversation keeps: each user turn as a WAV, each reply as ONE MP3.

The reply is encoded once, from the whole reply, when its stream is over: encoding piece by piece would
leave a gap at every boundary, and the player in the chat history wants one file per turn anyway.
"""

from __future__ import annotations

import shutil
import struct
import tempfile
import time
import uuid
from pathlib import Path

import lameenc
import numpy as np

REPLY_MP3_KBPS = 64  # speech at 24 kHz mono: transparent enough, 8 kB per second of reply


class TurnFiles:
    """A private folder of one conversation's audio, removed with `delete()` when the session ends."""

    def __init__(self, parent: Path | None = None) -> None:
        base = Path(parent) if parent is not None else Path(tempfile.gettempdir()) / "omni-voice-chat"
        base.mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(prefix=f"{uuid.uuid4().hex[:8]}-", dir=base))

    def user_wav(self, turn: int, samples: np.ndarray, sample_rate: int) -> Path:
        """Write float samples in [-1, 1] as 16-bit mono WAV."""
        return self._write(f"turn-{turn:03d}-user.wav", wav_bytes(float_to_pcm16(samples), sample_rate))

    def reply_mp3(self, turn: int, pcm: bytes, sample_rate: int) -> Path:
        """Encode the whole reply (s16le mono) as one MP3."""
        return self._write(f"turn-{turn:03d}-reply.mp3", encode_mp3(pcm, sample_rate))

    def _write(self, name: str, data: bytes) -> Path:
        """Write one file, re-making the folder if a temp-file cleaner removed it during a long conversation."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / name
        path.write_bytes(data)
        return path

    def delete(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def remove_older_than(self, seconds: float) -> None:
        """Remove the files written more than `seconds` ago (the API's replies, once their callers have them)."""
        cutoff = time.time() - seconds
        for path in self.folder.glob("*"):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
            except FileNotFoundError:  # removed meanwhile
                pass


def float_to_pcm16(samples: np.ndarray) -> bytes:
    """Float samples in [-1, 1] as s16le bytes; NaN becomes silence and overshoot is clipped, never wrapped."""
    clipped = np.clip(np.nan_to_num(np.asarray(samples, dtype=np.float32)), -1.0, 1.0)
    return (clipped * 32767.0).round().astype("<i2").tobytes()


def wav_bytes(pcm: bytes, sample_rate: int) -> bytes:
    """A complete in-memory WAV of s16le mono PCM (stdlib, no subprocess): the app's one WAV writer (user
    turns, the utterance sent to the server)."""
    size = len(pcm) - len(pcm) % 2
    header = struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF",
        36 + size,
        b"WAVE",
        b"fmt ",
        16,
        1,
        1,
        sample_rate,
        sample_rate * 2,
        2,
        16,
        b"data",
        size,
    )
    return header + pcm[:size]


def encode_mp3(pcm: bytes, sample_rate: int) -> bytes:
    encoder = lameenc.Encoder()
    encoder.set_bit_rate(REPLY_MP3_KBPS)
    encoder.set_in_sample_rate(sample_rate)
    encoder.set_channels(1)
    encoder.set_quality(5)
    usable = pcm[: len(pcm) - len(pcm) % 2]
    return bytes(encoder.encode(usable)) + bytes(encoder.flush())
