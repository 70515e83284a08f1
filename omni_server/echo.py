"""The echo engine: answers with the user's own speech, paced like mini-omni.

It lets the whole app (streaming, queueing, history) run on machines without the model. The reply is the
request audio resampled 16 → 24 kHz with soxr, cut into `stream_stride` SNAC frames per piece (8192 samples =
341 ms at the default stride 4) and released one piece per piece-duration after a short "thinking" delay,
which is how the model's stream arrives. Unlike the reference it also sends the last, partial piece.
`real_time_factor` above 1 paces it like a model slower than real time (mini-omni in fp32 on a 2-core CPU
is about 1.34), so the app's player can be tried against a reply that arrives late.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import soxr

from omni_server.engine import (
    AudioPiece,
    ChatRequest,
    ProgressCallback,
    ReplyPiece,
    TextPiece,
)
from omni_server.protocol import INPUT_SAMPLE_RATE, OUTPUT_SAMPLE_RATE

SNAC_FRAME_SAMPLES = 2048


DEFAULT_MAX_BATCH = 4  # stateless, so replies run side by side; a bound keeps threads and memory in check


class EchoEngine:
    name = "echo"

    def __init__(
        self,
        *,
        thinking_s: float = 0.3,
        realtime: bool = True,
        real_time_factor: float = 1.0,
        max_batch: int = DEFAULT_MAX_BATCH,
    ) -> None:
        self.max_batch = max_batch
        self._thinking_s = thinking_s
        self._realtime = realtime
        self._seconds_per_second = real_time_factor

    def load(self, progress: ProgressCallback) -> None:
        progress("echo engine needs no weights")

    def check(self, request: ChatRequest) -> None:
        """Every validated request can be echoed."""

    def generate(self, request: ChatRequest) -> Iterator[ReplyPiece]:
        reply = soxr.resample(request.audio, INPUT_SAMPLE_RATE, OUTPUT_SAMPLE_RATE)
        pcm = (np.clip(reply, -1.0, 1.0) * 32767.0).round().astype("<i2")
        piece_samples = request.stream_stride * SNAC_FRAME_SAMPLES
        start = time.monotonic() + self._thinking_s
        self._sleep_until(start)
        if request.stream_text:
            yield TextPiece(f"(echo) {request.audio.size / INPUT_SAMPLE_RATE:.1f} s of speech")
        for index, offset in enumerate(range(0, pcm.size, piece_samples)):
            self._sleep_until(start + index * self._seconds_per_second * piece_samples / OUTPUT_SAMPLE_RATE)
            yield AudioPiece(pcm[offset : offset + piece_samples].tobytes())

    def _sleep_until(self, deadline: float) -> None:
        if self._realtime:
            time.sleep(max(0.0, deadline - time.monotonic()))
