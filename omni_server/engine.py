"""The contract between the HTTP layer and a speech-to-speech engine.

The server decodes and validates the request, then hands the engine 16 kHz mono float audio. An engine
checks its own limits in `check` (so a bad request gets a 4xx before any audio is sent) and then streams
`AudioPiece`s and `TextPiece`s from `generate`. Engines load in the background and report progress.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

MAX_INPUT_SECONDS = 30.0


@dataclass(frozen=True)
class ChatRequest:
    """One validated request: `audio` is float32 mono at 16 kHz in [-1, 1], at most 30 s."""

    audio: np.ndarray
    stream_stride: int = 4
    max_tokens: int = 2048
    stream_text: bool = False
    trimmed: bool = False  # the question was longer than 30 s: `audio` is its first 30 s (as the reference does)


@dataclass(frozen=True)
class AudioPiece:
    """Raw reply audio: signed 16-bit little-endian mono PCM at 24 kHz (even byte length)."""

    pcm: bytes


@dataclass(frozen=True)
class TextPiece:
    """The next piece of the reply's text."""

    text: str


ReplyPiece = AudioPiece | TextPiece


class RequestRejected(ValueError):
    """The request cannot be served as asked; the server answers 4xx with this message, before any audio."""


ProgressCallback = Callable[[str], None]

LoadReport = Callable[[str, str], None]
"""Called as `report(engine_name, detail)` while an engine is chosen and loaded: `("mini-omni", "loading weights")`."""


class Engine(Protocol):
    name: str
    max_batch: int  # replies it generates at once; the server queues the rest in arrival order

    def load(self, progress: ProgressCallback) -> None:
        """Load weights (blocking; run in a background thread), calling `progress("loading weights")` etc."""

    def check(self, request: ChatRequest) -> None:
        """Raise `RequestRejected` if this engine cannot serve the request (called before streaming)."""

    def generate(self, request: ChatRequest) -> Iterator[ReplyPiece]:
        """Stream the reply. Exceptions raised here after the first piece cut the HTTP stream short."""
