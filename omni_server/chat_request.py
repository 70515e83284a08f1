"""Turn a POST /chat body into a validated `ChatRequest`, or a `BadRequest` with a plain sentence.

Pure request logic, apart from the ffmpeg call in `audio_decode`: the HTTP layer only maps `BadRequest` to a
JSON error response. Every check here happens before any audio is sent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from omni_server.audio_decode import UndecodableAudio, decode_audio_file, decode_base64
from omni_server.engine import MAX_INPUT_SECONDS, ChatRequest
from omni_server.protocol import INPUT_SAMPLE_RATE

# 30 s of 48 kHz stereo float32 WAV is 11.5 MB; base64 makes it 15.4 MB. 16 MiB admits that and little more.
MAX_BODY_BYTES = 16 * 1024 * 1024
STREAM_STRIDE_RANGE = (1, 64)
MAX_TOKENS_RANGE = (1, 2048)


class BadRequest(Exception):
    """The client sent something we cannot serve; `status` is the 4xx to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class ChatFields:
    """The JSON body, checked for shape and type, with the audio file's bytes not yet decoded."""

    upload: bytes
    stream_stride: int
    max_tokens: int
    stream_text: bool


def parse_fields(body: bytes) -> ChatFields:
    """Check the JSON body's shape and base64; cheap, so it runs before the server looks at its engine."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BadRequest(400, "The request body is not valid JSON.") from error
    except RecursionError as error:  # nested thousands of levels deep
        raise BadRequest(400, "The request body is nested too deeply.") from error
    except ValueError as error:  # an integer of thousands of digits (Python's conversion limit)
        raise BadRequest(400, "The request body holds a number too long to read.") from error
    if not isinstance(data, dict):
        raise BadRequest(400, "The request body must be a JSON object.")
    audio = data.get("audio")
    if audio is None:
        raise BadRequest(400, 'The request has no "audio" field.')
    if not isinstance(audio, str):
        raise BadRequest(400, 'The "audio" field must be a base64 string.')
    stream_text = data.get("stream_text", False)
    if not isinstance(stream_text, bool):
        raise BadRequest(400, 'The "stream_text" field must be true or false.')
    try:
        upload = decode_base64(audio)
    except UndecodableAudio as error:
        raise BadRequest(400, str(error)) from error
    return ChatFields(
        upload=upload,
        stream_stride=_integer(data, "stream_stride", 4, STREAM_STRIDE_RANGE),
        max_tokens=_integer(data, "max_tokens", 2048, MAX_TOKENS_RANGE),
        stream_text=stream_text,
    )


def decode_request(fields: ChatFields) -> ChatRequest:
    """Decode the audio (blocking: runs ffmpeg). A question over 30 s is cut to its first 30 s, as the reference
    does (its own client plays a 413 as noise); the response says so."""
    try:
        audio = decode_audio_file(fields.upload, max_seconds=MAX_INPUT_SECONDS, trim=True)
    except UndecodableAudio as error:
        raise BadRequest(422, str(error)) from error
    if audio.size == 0:
        raise BadRequest(422, "The audio file contains no sound samples.")
    limit = round(MAX_INPUT_SECONDS * INPUT_SAMPLE_RATE)
    return ChatRequest(
        audio=np.ascontiguousarray(audio[:limit], dtype=np.float32),
        stream_stride=fields.stream_stride,
        max_tokens=fields.max_tokens,
        stream_text=fields.stream_text,
        trimmed=audio.size > limit,
    )


def _integer(data: dict, key: str, default: int, bounds: tuple[int, int]) -> int:
    value = data.get(key, default)
    # bool is an int subclass in Python; JSON true is not a stride.
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(400, f'The "{key}" field must be a whole number.')
    low, high = bounds
    if not low <= value <= high:
        raise BadRequest(422, f'The "{key}" field must be between {low} and {high}.')
    return value
