"""The live audio channel's wire format: one WebSocket per conversation, between a tab and the app.

Up (browser -> app):
- text `{"type": "hello", "token": T}` first: T is the single-use token the page got when Start was clicked;
  it binds the socket to that tab's conversation. Anything else first, or an unknown or used token, is
  refused with an `error` message and close code 4403 (4400 for an unusable message later on).
- binary: microphone audio, s16le mono at MIC_SAMPLE_RATE, MIC_FRAME_SAMPLES per frame (32 ms, one silero
  window), at most MAX_MIC_FRAME_SAMPLES.
- text `{"type": "sounding", "turn": n, "after_s": s}`: the reply to turn n became audible s seconds after the
  user's speech ended (the browser measures both ends on its own clock).
- text `{"type": "played", "turn": n, "samples": k, "complete": bool}`: the player stopped playing turn n's
  reply after k samples, at its end (complete) or because it was told to flush.
- text `{"type": "stop"}`: the user ended the conversation.

Down (app -> browser):
- text `{"type": "turn", "turn": n, "speech_end_s": s, "utterance_s": d}`: the user's turn n ended; its
  speech ended s seconds into the microphone stream (counted from the first frame sent), and the d seconds
  sent to the model (speech with a little before and after it) are being answered.
- binary: reply audio, a 4-byte little-endian turn number then s16le mono PCM at OUTPUT_SAMPLE_RATE. Pieces of
  one turn play gaplessly; pieces of a flushed turn are dropped.
- text `{"type": "reply_end", "turn": n, "engine_first_audio_s": s}`: no more audio for turn n (play what is
  buffered, then report); s is the model server's share of the wait (request to first audio), or null.
- text `{"type": "flush", "turn": n}`: silence turn n's reply now (the user cut in); report what was played.
- text `{"type": "ping"}` every PING_INTERVAL_S, so proxies (Hugging Face Spaces) keep an idle socket open.
- text `{"type": "error", "message": M}`: a sentence for the page, before the app closes the socket.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from omni_server.protocol import OUTPUT_SAMPLE_RATE
from vad import VAD_SAMPLE_RATE, WINDOW_SAMPLES

MIC_SAMPLE_RATE = VAD_SAMPLE_RATE  # the page records at the detector's rate, so nothing is resampled here
MIC_FRAME_SAMPLES = WINDOW_SAMPLES  # 32 ms: within the 20-40 ms a live channel wants, one silero window
MAX_MIC_FRAME_SAMPLES = 4 * 1024  # 0.26 s: shorter than any turn, so one frame never holds a whole one
PING_INTERVAL_S = 15.0
HELLO_TIMEOUT_S = 10.0
REFUSED_CODE = 4403  # WebSocket close code for a refused token (4000-4999 are the application's own)
UNUSABLE_CODE = 4400  # close code after the page sent something the app cannot use


class ProtocolError(ValueError):
    """A message the channel cannot use; the text is a sentence for the log and the page."""


@dataclass(frozen=True)
class Hello:
    token: str


@dataclass(frozen=True)
class Sounding:
    turn: int
    after_s: float


@dataclass(frozen=True)
class Played:
    turn: int
    samples: int
    complete: bool


@dataclass(frozen=True)
class Stop:
    pass


ClientMessage = Hello | Sounding | Played | Stop


def parse_client_message(text: str) -> ClientMessage:
    """One text message from the page, checked field by field."""
    try:
        message = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise ProtocolError("The page sent a message that is not JSON.") from error
    if not isinstance(message, dict):
        raise ProtocolError("The page sent a message that is not a JSON object.")
    kind = message.get("type")
    if kind == "hello":
        return Hello(_field(message, "token", str))
    if kind == "sounding":
        after_s = _field(message, "after_s", (int, float))
        if not 0 <= after_s < 3600:
            raise ProtocolError(f"'after_s' must be 0 to 3600 seconds, got {after_s!r}.")
        return Sounding(_turn(message), float(after_s))
    if kind == "played":
        samples = _field(message, "samples", int)
        if samples < 0:
            raise ProtocolError(f"'samples' must be zero or more, got {samples!r}.")
        return Played(_turn(message), samples, _field(message, "complete", bool))
    if kind == "stop":
        return Stop()
    raise ProtocolError(f"Unknown message type {kind!r}.")


def _turn(message: dict) -> int:
    turn = _field(message, "turn", int)
    if turn < 1:
        raise ProtocolError(f"'turn' must be 1 or more, got {turn!r}.")
    return turn


_T = TypeVar("_T")


def _field(message: dict, name: str, kind: type[_T] | tuple[type[_T], ...]) -> _T:
    value = message.get(name)
    if isinstance(value, bool) and kind is not bool:  # JSON true is not a number here
        value = None
    if not isinstance(value, kind):
        raise ProtocolError(f"'{message.get('type')}' needs '{name}' of type {getattr(kind, '__name__', 'number')}.")
    return value


def mic_samples(data: bytes) -> np.ndarray:
    """A binary frame from the page as int16 samples."""
    if len(data) % 2:
        raise ProtocolError("A microphone frame must hold whole 16-bit samples.")
    if not 0 < len(data) <= 2 * MAX_MIC_FRAME_SAMPLES:
        raise ProtocolError(f"A microphone frame must hold 1 to {MAX_MIC_FRAME_SAMPLES} samples, not {len(data) // 2}.")
    return np.frombuffer(data, dtype="<i2")


def server_message(kind: str, **fields: object) -> str:
    return json.dumps({"type": kind, **fields})


def reply_frame(turn: int, pcm: bytes) -> bytes:
    return struct.pack("<I", turn) + pcm


def parse_reply_frame(frame: bytes) -> tuple[int, bytes]:
    """(turn, PCM) of a binary frame from the app; what the page does, for tests and programs."""
    if len(frame) < 4:
        raise ProtocolError("A reply frame starts with a 4-byte turn number.")
    return struct.unpack("<I", frame[:4])[0], frame[4:]


def page_settings() -> dict[str, object]:
    """What the page's script needs to speak this protocol (given to it, so the numbers live here only)."""
    return {
        "micSampleRate": MIC_SAMPLE_RATE,
        "micFrameSamples": MIC_FRAME_SAMPLES,
        "replySampleRate": OUTPUT_SAMPLE_RATE,
    }
