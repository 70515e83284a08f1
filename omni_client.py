"""Talking to a mini-omni-compatible server: send one utterance, stream the spoken reply; ask its health.

Works with the original mini-omni server (HTTP/1.0, raw PCM, close-delimited, failures as HTML 500s or a body
that just stops), with mini-omni2's multipart answer (audio and text parts), and with our `omni_server`
(JSON errors, /health, queue-position parts, cut-short chunked streams). Every failure reaches the caller as
a `ReplyError` carrying a `FailureKind` and a plain sentence for the user; audio that arrived before a
failure has already been yielded, so the caller can keep it.
"""

from __future__ import annotations

import base64
import enum
import json
import logging
import queue
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import requests
import soxr
import urllib3

from audio_files import float_to_pcm16, wav_bytes
from omni_server import protocol
from omni_server.protocol import INPUT_SAMPLE_RATE, Health, HealthStatus

log = logging.getLogger(__name__)

READ_SIZE = 4096  # at most this many bytes are read (and held) before being handed on
ERROR_BODY_LIMIT = 64 * 1024


@dataclass(frozen=True)
class ReplyAudio:
    """The next piece of the reply: s16le mono PCM at 24 kHz, always an even number of bytes."""

    pcm: bytes


@dataclass(frozen=True)
class ReplyText:
    """The next piece of the reply's text (only from servers that send it: mini-omni2, omni_server)."""

    text: str


@dataclass(frozen=True)
class ReplyQueued:
    """The server is busy with other requests; `ahead` of them come first (0: this one is being served)."""

    ahead: int


@dataclass(frozen=True)
class ReplyLoading:
    """The server is still loading its model; the question waits for it. `step` says how far it is."""

    step: str


ReplyEvent = ReplyAudio | ReplyText | ReplyQueued | ReplyLoading


class FailureKind(enum.Enum):
    UNREACHABLE = "unreachable"  # nothing listens there, or the connection could not be made
    NOT_READY = "not_ready"  # 503: the server is still loading its model, or failed to
    REJECTED = "rejected"  # 4xx: the server refused this request
    SERVER_ERROR = "server_error"  # 5xx before any audio (the reference's HTML 500 included)
    EMPTY = "empty"  # the answer ended without any audio
    CUT_SHORT = "cut_short"  # the answer stopped before its end
    STALLED = "stalled"  # no bytes for the stall timeout
    GARBAGE = "garbage"  # the answer is not audio we can read


class ReplyError(Exception):
    """A failed reply: `message` is a plain sentence to show the user; `kind` says which failure it was."""

    def __init__(self, kind: FailureKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


def utterance_wav(samples: np.ndarray, sample_rate: int = INPUT_SAMPLE_RATE) -> bytes:
    """A 16 kHz mono 16-bit WAV of `samples` (float in [-1, 1], or int16), resampled if needed.

    16 kHz is what the model's encoder works at, so sending it saves the server a resampling step.
    """
    audio = np.asarray(samples)
    floats = audio.astype(np.float32) / 32768.0 if audio.dtype == np.int16 else audio.astype(np.float32)
    if floats.ndim == 2:  # (samples, channels), as Gradio gives stereo
        floats = floats.mean(axis=1)
    if sample_rate != INPUT_SAMPLE_RATE:
        floats = soxr.resample(floats, sample_rate, INPUT_SAMPLE_RATE)
    return wav_bytes(float_to_pcm16(floats), INPUT_SAMPLE_RATE)


def stream_reply(
    server_url: str,
    wav: bytes,
    *,
    stall_timeout_s: float = 30.0,
    connect_timeout_s: float = 5.0,
    stream_text: bool = True,
    cancel: threading.Event | None = None,
) -> Iterator[ReplyEvent]:
    """POST one utterance (an audio file, normally `utterance_wav`) to `/chat` and yield the reply as it comes.

    Yields each server read (at most 4096 bytes) at once. Raises `ReplyError` on any failure, after yielding
    whatever audio arrived. When `cancel` is set, the generator returns at once (no error) and the connection
    is closed, which frees the server for the next request.
    """
    payload: dict[str, object] = {"audio": base64.b64encode(wav).decode("ascii")}
    if stream_text:
        payload["stream_text"] = True
    exchange = _Exchange(f"{server_url.rstrip('/')}/chat", payload, connect_timeout_s, stall_timeout_s)
    try:
        yield from _interpret(exchange.events(cancel), server_url, stall_timeout_s)
    finally:
        exchange.abandon()


# --- the HTTP exchange, on a worker thread so that cancelling never waits for the network ------------------

_HEAD, _DATA, _END = "head", "data", "end"


class _Exchange:
    def __init__(self, url: str, payload: dict, connect_timeout_s: float, stall_timeout_s: float) -> None:
        self._events: queue.Queue[tuple[str, object]] = queue.Queue()
        self._abandoned = threading.Event()
        self._response: requests.Response | None = None
        args = (url, payload, (connect_timeout_s, stall_timeout_s))
        threading.Thread(target=self._run, args=args, name="omni-client-reply", daemon=True).start()

    def events(self, cancel: threading.Event | None) -> Iterator[tuple[str, object]]:
        """(kind, value) pairs: one `head` (the Response), `data` (bytes) pieces, then `end`. Errors are raised."""
        while True:
            try:
                kind, value = self._events.get(timeout=0.05)
            except queue.Empty:
                if cancel is not None and cancel.is_set():
                    return
                continue
            if cancel is not None and cancel.is_set():
                return
            if isinstance(value, BaseException):
                raise value
            yield kind, value
            if kind == _END:
                return

    def abandon(self) -> None:
        """Stop reading and drop the connection now, so the server learns at once that nobody listens (and a
        queued request leaves the line) rather than at its next piece."""
        self._abandoned.set()
        connection = self._response.raw._connection if self._response is not None else None  # urllib3 2.x
        sock = getattr(connection, "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the worker's blocked read; close() alone would not
            except OSError:
                pass  # already closed

    def _run(self, url: str, payload: dict, timeout: tuple[float, float]) -> None:
        try:
            with requests.post(url, json=payload, stream=True, timeout=timeout) as response:
                self._response = response
                self._events.put((_HEAD, response))
                while not self._abandoned.is_set():
                    data = response.raw.read1(READ_SIZE)
                    if not data:
                        break
                    self._events.put((_DATA, data))
            self._events.put((_END, None))
        except Exception as error:
            self._events.put((_END, error))


def _interpret(events: Iterator[tuple[str, object]], server_url: str, stall_timeout_s: float) -> Iterator[ReplyEvent]:
    answered = False
    parser: _RawPcmParser | _MultipartParser | None = None
    try:
        for kind, value in events:
            if kind == _HEAD:
                answered = True
                response = value
                assert isinstance(response, requests.Response)  # the worker's head is the Response
                if response.status_code != 200:
                    raise _http_error(response.status_code, response.reason, response.headers, _rest(events))
                parser = _parser_for(response.headers.get("Content-Type", ""))
            elif kind == _DATA:
                assert parser is not None and isinstance(value, bytes)  # data comes after the head, as bytes
                yield from parser.feed(value)
            else:
                assert parser is not None  # the end comes after the head
                yield from parser.finish()
    except (requests.exceptions.ConnectTimeout, requests.exceptions.ConnectionError) as error:
        if isinstance(error, requests.exceptions.ConnectTimeout) or _never_connected(error):
            raise ReplyError(
                FailureKind.UNREACHABLE, f"Could not reach the model server at {server_url}. Is it running?"
            ) from error
        raise ReplyError(
            FailureKind.SERVER_ERROR, "The model server closed the connection without answering."
        ) from error
    except (requests.exceptions.Timeout, urllib3.exceptions.ReadTimeoutError) as error:
        raise ReplyError(
            FailureKind.STALLED, f"The model server stopped answering (nothing for {stall_timeout_s:g} s)."
        ) from error
    except (urllib3.exceptions.ProtocolError, urllib3.exceptions.DecodeError) as error:
        if not answered:
            raise ReplyError(
                FailureKind.SERVER_ERROR, "The model server closed the connection without answering."
            ) from error
        raise _cut_short(parser.server_reason() if parser is not None else "") from error
    except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError) as error:
        raise ReplyError(FailureKind.UNREACHABLE, f"Could not talk to the model server ({error}).") from error


def _never_connected(error: requests.exceptions.ConnectionError) -> bool:
    """Whether the connection itself failed (refused, unresolvable), as opposed to a dropped answer."""
    reason = getattr(error.args[0], "reason", None) if error.args else None
    return isinstance(reason, (urllib3.exceptions.NewConnectionError, urllib3.exceptions.ConnectTimeoutError))


def _cut_short(reason: str = "") -> ReplyError:
    detail = f" ({reason})" if reason else ""
    return ReplyError(FailureKind.CUT_SHORT, f"The reply was cut off: the model server stopped before the end{detail}.")


def _rest(events: Iterator[tuple[str, object]]) -> bytes:
    """The body of an error answer, up to a limit (a failure to read it leaves what came)."""
    body = bytearray()
    try:
        for kind, value in events:
            if kind == _DATA:
                assert isinstance(value, bytes)  # data pieces are bytes
                body += value
                if len(body) >= ERROR_BODY_LIMIT:
                    break
    except Exception:
        pass
    return bytes(body)


def _http_error(status: int, reason: str, headers: requests.structures.CaseInsensitiveDict, body: bytes) -> ReplyError:
    said = _server_sentence(headers.get("Content-Type", ""), body)
    if status == 503:
        return ReplyError(FailureKind.NOT_READY, said or "The model server is not ready yet. Try again in a moment.")
    if 400 <= status < 500:
        return ReplyError(
            FailureKind.REJECTED, said or f"The model server refused the request (HTTP {status} {reason})."
        )
    because = f": {said}" if said else f" (HTTP {status} {reason})"
    return ReplyError(FailureKind.SERVER_ERROR, f"The model server failed to answer{because}")


def _server_sentence(content_type: str, body: bytes) -> str:
    """The `error` sentence of an omni_server JSON error; "" for anything else (HTML pages are not shown)."""
    if "json" not in content_type.lower():
        return ""
    try:
        error = json.loads(body).get(protocol.ERROR)
    except (ValueError, AttributeError):
        return ""
    return error.strip() if isinstance(error, str) else ""


# --- reading the body ---------------------------------------------------------------------------------------


class _PcmJoiner:
    """Hands on whole 16-bit samples, carrying an odd trailing byte into the next piece."""

    def __init__(self) -> None:
        self._carry = b""
        self.total = 0

    def push(self, data: bytes) -> ReplyAudio | None:
        self.total += len(data)
        data = self._carry + data
        even = len(data) - len(data) % 2
        self._carry = data[even:]
        return ReplyAudio(data[:even]) if even else None

    def check_end(self) -> None:
        if self.total == 0:
            raise ReplyError(FailureKind.EMPTY, "The model server answered without any audio.")
        if self._carry:
            raise ReplyError(
                FailureKind.GARBAGE, "The reply audio ended in the middle of a sample, so it is not 16-bit audio."
            )


class _RawPcmParser:
    """The mini-omni v1 answer: the body is headerless s16le PCM."""

    def __init__(self) -> None:
        self._pcm = _PcmJoiner()

    def feed(self, data: bytes) -> Iterator[ReplyEvent]:
        if self._pcm.total == 0 and data.lstrip()[:15].lower().startswith((b"<!doctype", b"<html")):
            raise ReplyError(FailureKind.GARBAGE, "The model server sent a web page instead of audio.")
        piece = self._pcm.push(data)
        if piece is not None:
            yield piece

    def finish(self) -> Iterator[ReplyEvent]:
        self._pcm.check_end()
        return iter(())

    def server_reason(self) -> str:
        return ""  # raw PCM has no way to say why it stopped


class _PartKind(enum.Enum):
    AUDIO = "audio"
    TEXT = "text"
    JSON = "json"
    OTHER = "other"


class _MultipartParser:
    """The mini-omni2 answer: parts, each preceded by CRLF--boundary CRLF, a Content-Type line, a blank line.

    Audio is handed on as it arrives, holding back only what could be the start of the next delimiter;
    text and JSON parts are handed on when complete.
    """

    HEADER_LIMIT = 1024
    PART_LIMIT = 64 * 1024

    def __init__(self, boundary: str) -> None:
        self._delimiter = b"\r\n--" + boundary.encode("latin-1") + b"\r\n"
        self._closing = b"\r\n--" + boundary.encode("latin-1") + b"--"
        self._buffer = b""
        self._kind: _PartKind | None = None  # None: before the first part or inside a part's headers
        self._in_headers = False
        self._part = b""
        self._pcm = _PcmJoiner()
        self._server_error = ""

    def feed(self, data: bytes) -> Iterator[ReplyEvent]:
        self._buffer += data
        while True:
            if self._kind is None and not self._in_headers:
                if not self._take_first_delimiter():
                    return
            if self._in_headers:
                if not self._take_headers():
                    return
            end = self._buffer.find(self._delimiter)
            if end < 0:
                keep = len(self._delimiter) - 1
                if self._kind is _PartKind.AUDIO and len(self._buffer) > keep:
                    yield from self._part_data(self._buffer[:-keep])
                    self._buffer = self._buffer[-keep:]
                return
            yield from self._part_data(self._buffer[:end])
            yield from self._close_part()
            self._buffer = self._buffer[end + len(self._delimiter) :]
            self._in_headers = True

    def finish(self) -> Iterator[ReplyEvent]:
        if self._in_headers or (self._kind is None and self._buffer):
            raise ReplyError(FailureKind.GARBAGE, "The model server's multipart reply is malformed.")
        tail = self._buffer
        closing = tail.find(self._closing)
        if closing >= 0:
            tail = tail[:closing]
        yield from self._part_data(tail)
        self._buffer = b""
        yield from self._close_part()
        if self._server_error:
            raise _cut_short(self._server_error)
        self._pcm.check_end()

    def server_reason(self) -> str:
        """The server's `{"error": ...}` part, if it sent one before cutting the stream short."""
        if self._kind is _PartKind.JSON:
            self._buffer, pending = b"", self._part + self._buffer
            self._part = b""
            self._kind = None
            try:
                list(self._status(pending))
            except ReplyError:
                pass
        return self._server_error

    def _take_first_delimiter(self) -> bool:
        for opening in (self._delimiter, self._delimiter[2:]):  # tolerate RFC-style "--frame" at the very start
            if self._buffer.startswith(opening):
                self._buffer = self._buffer[len(opening) :]
                self._in_headers = True
                return True
            if opening.startswith(self._buffer):
                return False  # not enough bytes yet to tell
        raise ReplyError(FailureKind.GARBAGE, "The model server's multipart reply is malformed.")

    def _take_headers(self) -> bool:
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > self.HEADER_LIMIT:
                raise ReplyError(FailureKind.GARBAGE, "The model server's multipart reply is malformed.")
            return False
        content_type = ""
        for line in self._buffer[:end].split(b"\r\n"):
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "content-type":
                content_type = value.strip().lower()
        if not content_type:
            raise ReplyError(FailureKind.GARBAGE, "A part of the model server's reply has no content type.")
        self._kind = _part_kind(content_type)
        self._buffer = self._buffer[end + 4 :]
        self._in_headers = False
        return True

    def _part_data(self, data: bytes) -> Iterator[ReplyEvent]:
        if not data:
            return
        if self._kind is _PartKind.AUDIO:
            piece = self._pcm.push(data)
            if piece is not None:
                yield piece
        elif self._kind in (_PartKind.TEXT, _PartKind.JSON):
            self._part += data
            if len(self._part) > self.PART_LIMIT:
                raise ReplyError(FailureKind.GARBAGE, "A text part of the model server's reply is too long.")

    def _close_part(self) -> Iterator[ReplyEvent]:
        part, self._part = self._part, b""
        kind, self._kind = self._kind, None
        if kind is _PartKind.TEXT and part:
            yield ReplyText(part.decode("utf-8", "replace"))
        elif kind is _PartKind.JSON:
            yield from self._status(part)

    def _status(self, part: bytes) -> Iterator[ReplyEvent]:
        try:
            status = json.loads(part)
        except ValueError as error:
            raise ReplyError(FailureKind.GARBAGE, "A status part of the model server's reply is not JSON.") from error
        if isinstance(status, dict) and isinstance(status.get(protocol.QUEUE_POSITION), int):
            yield ReplyQueued(status[protocol.QUEUE_POSITION])
        if isinstance(status, dict) and isinstance(status.get(protocol.LOADING), str):
            yield ReplyLoading(status[protocol.LOADING])
        if isinstance(status, dict) and isinstance(status.get(protocol.ERROR), str):
            self._server_error = status[protocol.ERROR]


def _part_kind(content_type: str) -> _PartKind:
    if content_type.startswith("audio/"):
        return _PartKind.AUDIO
    if content_type.startswith("text/plain"):
        return _PartKind.TEXT
    if content_type.startswith("application/json"):
        return _PartKind.JSON
    return _PartKind.OTHER


def _parser_for(content_type: str) -> _RawPcmParser | _MultipartParser:
    media_type, _, parameters = content_type.partition(";")
    media_type = media_type.strip().lower()
    if media_type.startswith("multipart/"):
        for parameter in parameters.split(";"):
            name, _, value = parameter.partition("=")
            if name.strip().lower() == "boundary" and value.strip().strip('"'):
                return _MultipartParser(value.strip().strip('"'))
        raise ReplyError(FailureKind.GARBAGE, "The model server's multipart reply names no boundary.")
    if media_type.startswith("audio/") or media_type in ("application/octet-stream", ""):
        return _RawPcmParser()
    if media_type == "text/html":
        raise ReplyError(FailureKind.GARBAGE, "The model server sent a web page instead of audio.")
    raise ReplyError(FailureKind.GARBAGE, f"The model server sent {media_type} instead of audio.")


# --- health ---------------------------------------------------------------------------------------------------


def fetch_health(server_url: str, timeout_s: float = 3.0) -> Health:
    """GET /health. Raises `ReplyError(UNREACHABLE)` if nothing answers; a server without /health is UNKNOWN."""
    try:
        response = requests.get(f"{server_url.rstrip('/')}/health", timeout=timeout_s)
    except requests.exceptions.RequestException as error:
        raise ReplyError(FailureKind.UNREACHABLE, f"Could not reach the model server at {server_url}.") from error
    try:
        return Health.from_json(response.json() if response.status_code == 200 else None)
    except (ValueError, KeyError, TypeError):
        return Health(HealthStatus.UNKNOWN, "", "the server has no health endpoint (a reference mini-omni server?)")
