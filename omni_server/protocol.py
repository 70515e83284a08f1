"""What both sides of the wire share (docs/protocol.md): the server (`omni_server.http_app`), its launcher
(`server_process.py`) and the client (`omni_client.py`) import these, so they cannot drift apart.

Cheap to import: no torch, no web framework.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

# The line `python -m omni_server` prints on stdout once its socket is bound; a launcher reads the URL from it
# (with `--port 0` that is how it learns the port).
LISTENING_PREFIX = "omni_server listening on "

INPUT_SAMPLE_RATE = 16_000  # the question's audio, as the model hears it
OUTPUT_SAMPLE_RATE = 24_000  # the reply: 16-bit little-endian mono PCM

RAW_AUDIO_TYPE = "audio/wav"  # what the reference sends, although its body is headerless PCM
MULTIPART_BOUNDARY = "frame"
MULTIPART_TYPE = f"multipart/x-mixed-replace; boundary={MULTIPART_BOUNDARY}"
TRIMMED_HEADER = "x-omni-input-trimmed-to-s"  # a question over 30 s was cut to its first 30 s

# Keys of the JSON status parts of a multipart reply.
QUEUE_POSITION = "queue_position"  # requests ahead of this one, while it waits for its turn
LOADING = "loading"  # "engine: step", while it waits for the model to load
ERROR = "error"  # the reply was cut short, and why


class HealthStatus(str, enum.Enum):
    LOADING = "loading"
    READY = "ready"
    ERROR = "error"
    UNKNOWN = "unknown"  # only a client says this: a server without /health (the reference), reachable


@dataclass(frozen=True)
class Health:
    """`GET /health`: the engine's state, and the server's line of requests."""

    status: HealthStatus
    engine: str  # "mini-omni", "echo", or "" when unknown
    detail: str  # the loading step (with numbers), why this engine, or the load error
    busy: bool = False  # a reply is being generated
    waiting: int = 0  # requests queued behind the ones being served
    max_batch: int = 1  # replies the engine generates at once

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status.value,
            "engine": self.engine,
            "detail": self.detail,
            "busy": self.busy,
            "waiting": self.waiting,
            "max_batch": self.max_batch,
        }

    @classmethod
    def from_json(cls, data: Any) -> Health:
        """Raises ValueError, KeyError or TypeError when `data` is not a health answer."""
        return cls(
            HealthStatus(data["status"]),
            str(data.get("engine", "")),
            str(data.get("detail", "")),
            bool(data.get("busy", False)),
            int(data.get("waiting", 0)),
            int(data.get("max_batch", 1)),
        )
