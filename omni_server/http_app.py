"""The HTTP face of the server: POST /chat (the mini-omni protocol) and GET /health.

Differences from the reference, all chosen so a client can tell what went wrong:
- every problem found before generation (bad JSON, bad base64, undecodable or over-long audio, out-of-range
  fields, an engine's own `check`) is a 4xx JSON `{"error": sentence}`; 503 while the engine is not ready;
- HTTP/1.1 chunked: an engine failure after the first audio closes the connection without the terminating
  chunk, so the body is visibly cut short instead of looking like a normal end;
- `"stream_text": true` answers in the mini-omni2 multipart framing, with two extra JSON part kinds:
  `{"queue_position": n}` while waiting for the turn (n requests ahead, repeated every second) and
  `{"error": sentence}` right before a cut-short end.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import Message, Receive, Scope, Send

from omni_server import protocol
from omni_server.audio_decode import DecoderUnavailable
from omni_server.chat_request import MAX_BODY_BYTES, BadRequest, decode_request, parse_fields
from omni_server.engine import MAX_INPUT_SECONDS, AudioPiece, ChatRequest, Engine, RequestRejected, TextPiece
from omni_server.engine_host import EngineHost
from omni_server.protocol import MULTIPART_BOUNDARY, MULTIPART_TYPE, RAW_AUDIO_TYPE, TRIMMED_HEADER, HealthStatus
from omni_server.turns import Ticket, TurnQueue

log = logging.getLogger(__name__)

# A question over 30 s is answered from its first 30 s; the response says so in a header, and a multipart one
# also in its first text part (which clients show with the reply's text).
TRIMMED_NOTE = "(Only the first 30 seconds of your question were heard.) "
PART_DELIMITER = f"\r\n--{MULTIPART_BOUNDARY}\r\n".encode()
QUEUE_UPDATE_S = 1.0
POLL_S = 0.25
SEND_TIMEOUT_S = 20.0  # a client that does not take a piece for this long is dropped
BODY_STALL_S = 10.0  # a request body that sends nothing for this long is dropped (its place in line with it)
DISCARD_BODY_LIMIT = 4 * MAX_BODY_BYTES  # read (and drop) an oversized body up to this, so the 413 arrives


def create_app(host: EngineHost) -> FastAPI:
    # No /docs, /redoc or /openapi.json: an open server need not describe itself (PROTOCOL in the README does).
    app = FastAPI(title="omni_server", docs_url=None, redoc_url=None, openapi_url=None)
    turns = TurnQueue(lambda: host.max_batch)

    @app.exception_handler(BadRequest)
    async def bad_request(_request: Request, error: BadRequest) -> JSONResponse:
        return JSONResponse({protocol.ERROR: error.message}, status_code=error.status)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        health = dataclasses.replace(host.health, busy=turns.busy, waiting=turns.waiting, max_batch=host.max_batch)
        return health.to_json()

    @app.post("/chat", response_model=None)
    async def chat(request: Request) -> Response:
        # The place in line is taken on arrival, so a short request decoded sooner cannot overtake a long one.
        ticket = turns.join()
        try:
            fields = parse_fields(await _read_body(request))
            if host.health.status is HealthStatus.ERROR:
                turns.leave(ticket)
                return JSONResponse({protocol.ERROR: _not_ready_sentence(host)}, status_code=503)
            try:
                chat_request = await asyncio.to_thread(decode_request, fields)
            except DecoderUnavailable as error:
                turns.leave(ticket)
                return JSONResponse({protocol.ERROR: str(error)}, status_code=500)
            engine = host.ready_engine
            if engine is not None:
                _check(engine, chat_request)  # refused before any audio; while loading, once it is ready
        except BaseException:
            turns.leave(ticket)
            raise
        return ReplyStream(host, chat_request, turns, ticket)

    return app


async def _read_body(request: Request) -> bytes:
    """The body, up to MAX_BODY_BYTES; a body that stalls for BODY_STALL_S holds no place in line for long."""
    received = bytearray()
    size = 0
    chunks = request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(chunks.__anext__(), BODY_STALL_S)
        except StopAsyncIteration:
            break
        except TimeoutError as error:
            raise BadRequest(408, f"The request body stopped arriving for {BODY_STALL_S:g} s.") from error
        size += len(chunk)
        if size > DISCARD_BODY_LIMIT:
            break
        if size <= MAX_BODY_BYTES:
            received += chunk
    if size > MAX_BODY_BYTES:
        raise BadRequest(413, f"The request is larger than {MAX_BODY_BYTES // (1024 * 1024)} MiB.")
    return bytes(received)


def _check(engine: Engine, request: ChatRequest) -> None:
    try:
        engine.check(request)
    except RequestRejected as error:
        raise BadRequest(422, str(error)) from error


def _not_ready_sentence(host: EngineHost) -> str:
    state = host.health
    if state.status is HealthStatus.ERROR:
        return f"The model server could not load its engine ({state.detail})."
    return f"The model server is still starting ({state.detail}). Try again in a moment."


class _ClientGone(Exception):
    """The client disconnected or stopped reading; the response is abandoned."""


class _Finished:
    """The engine's iterator ended normally."""


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


_Item = AudioPiece | TextPiece | _Finished | _Failed


class _Generation:
    """Runs `engine.generate` on a worker thread, so a blocking engine never stalls the event loop.

    `on_finished` runs on the loop once the engine has really stopped: only then may the next turn start.
    """

    def __init__(self, engine: Engine, request: ChatRequest, on_finished: Callable[[], None]) -> None:
        self._engine = engine
        self._request = request
        self._loop = asyncio.get_running_loop()
        self._items: asyncio.Queue[_Item] = asyncio.Queue()
        self._stop = threading.Event()
        self._on_finished = on_finished
        threading.Thread(target=self._run, name="generation", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    async def next_item(self, timeout: float) -> _Item | None:
        """The next piece, `_Finished` or `_Failed`; None if nothing came within `timeout`."""
        try:
            return await asyncio.wait_for(self._items.get(), timeout)
        except TimeoutError:
            return None

    def _run(self) -> None:
        pieces = None
        try:
            pieces = self._engine.generate(self._request)
            for piece in pieces:
                self._deliver(piece)
                if self._stop.is_set():
                    break
            else:
                self._deliver(_Finished())
        except Exception as error:
            log.exception("generation failed")
            self._deliver(_Failed(error))
        finally:
            close = getattr(pieces, "close", None)
            if close is not None:
                close()
            self._call_on_loop(self._on_finished)

    def _deliver(self, item: _Item) -> None:
        self._call_on_loop(self._items.put_nowait, item)

    def _call_on_loop(self, function: Callable[..., object], *args: object) -> None:
        try:
            self._loop.call_soon_threadsafe(function, *args)
        except RuntimeError:  # the loop is closed: the server is shutting down
            pass


class _Writer:
    """ASGI sends with a deadline, and a record of whether the status line went out."""

    def __init__(self, send: Send, gone: asyncio.Event) -> None:
        self._send = send
        self._gone = gone
        self.started = False

    async def start(self, status: int, content_type: str, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
        await self._deliver(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", content_type.encode()), *headers],
            }
        )
        self.started = True

    async def body(self, data: bytes) -> None:
        await self._deliver({"type": "http.response.body", "body": data, "more_body": True})

    async def part(self, content_type: str, data: bytes) -> None:
        await self.body(PART_DELIMITER + f"Content-Type: {content_type}\r\n\r\n".encode() + data)

    async def end(self) -> None:
        await self._deliver({"type": "http.response.body", "body": b"", "more_body": False})

    async def json_error(self, status: int, message: str) -> None:
        await self.start(status, "application/json")
        await self._deliver(
            {"type": "http.response.body", "body": _json({protocol.ERROR: message}), "more_body": False}
        )

    async def _deliver(self, message: Message) -> None:
        if self._gone.is_set():
            raise _ClientGone
        try:
            await asyncio.wait_for(self._send(message), SEND_TIMEOUT_S)
        except TimeoutError as error:
            raise _ClientGone from error


class ReplyStream(Response):
    """The ASGI response of one accepted /chat request: wait for the turn, then relay the engine's pieces.

    Its status and headers are decided while it runs (JSON 500 if the engine fails before any audio), so it
    subclasses Response only to be passed through by FastAPI, and replaces its `__call__`.
    """

    def __init__(self, host: EngineHost, request: ChatRequest, turns: TurnQueue, ticket: Ticket) -> None:
        super().__init__()
        self._host = host
        self._request = request
        self._turns = turns
        self._ticket = ticket  # taken when the request arrived
        self._multipart = request.stream_text
        self._extra_headers = (
            [(TRIMMED_HEADER.encode(), str(round(MAX_INPUT_SECONDS)).encode())] if request.trimmed else []
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gone = asyncio.Event()
        ticket = self._ticket
        watcher = asyncio.create_task(_watch_disconnect(receive, gone, ticket.moved))
        generation: _Generation | None = None
        try:
            writer = _Writer(send, gone)
            if self._multipart:
                await writer.start(200, MULTIPART_TYPE, self._extra_headers)
                if self._request.trimmed:
                    await writer.part("text/plain", TRIMMED_NOTE.encode())
            engine = await self._wait_ready(writer, gone)
            if engine is None:
                return
            await self._wait_turn(ticket, writer, gone)
            generation = _Generation(engine, self._request, lambda: self._turns.leave(ticket))
            await self._relay(generation, writer, gone)
        except _ClientGone:
            log.info("client went away; dropping its request")
        finally:
            watcher.cancel()
            if generation is None:
                self._turns.leave(ticket)
            else:
                generation.stop()

    async def _wait_ready(self, writer: _Writer, gone: asyncio.Event) -> Engine | None:
        """A question asked while the engine loads waits for it (a multipart client hears the loading step every
        QUEUE_UPDATE_S); None when loading failed or the engine refuses the request (the answer is written)."""
        waited = False
        while (engine := self._host.ready_engine) is None:
            if gone.is_set():
                raise _ClientGone
            health = self._host.health
            if health.status is HealthStatus.ERROR:
                await self._refuse(writer, 503, _not_ready_sentence(self._host))
                return None
            if self._multipart:
                await writer.part("application/json", _json({protocol.LOADING: f"{health.engine}: {health.detail}"}))
            waited = True
            await asyncio.sleep(QUEUE_UPDATE_S if self._multipart else POLL_S)
        if waited:
            try:
                _check(engine, self._request)
            except BadRequest as refused:
                await self._refuse(writer, refused.status, refused.message)
                return None
        return engine

    async def _refuse(self, writer: _Writer, status: int, message: str) -> None:
        """A JSON error if nothing was sent yet, else an error part and a cut-short end."""
        if not writer.started:
            await writer.json_error(status, message)
        else:
            await writer.part("application/json", _json({protocol.ERROR: message}))

    async def _wait_turn(self, ticket: Ticket, writer: _Writer, gone: asyncio.Event) -> None:
        while True:
            if gone.is_set():
                raise _ClientGone
            ahead = self._turns.ahead_of(ticket)
            if self._multipart:
                await writer.part("application/json", _json({protocol.QUEUE_POSITION: ahead}))
            if ahead == 0:
                return
            await self._turns.wait_turn(ticket, QUEUE_UPDATE_S)

    async def _relay(self, generation: _Generation, writer: _Writer, gone: asyncio.Event) -> None:
        while True:
            item = await generation.next_item(POLL_S)
            if gone.is_set():
                raise _ClientGone
            if item is None:
                continue
            if isinstance(item, AudioPiece):
                if not writer.started:
                    await writer.start(200, RAW_AUDIO_TYPE, self._extra_headers)
                await (writer.part(RAW_AUDIO_TYPE, item.pcm) if self._multipart else writer.body(item.pcm))
            elif isinstance(item, TextPiece):
                if self._multipart:
                    await writer.part("text/plain", item.text.encode())
            elif isinstance(item, _Finished):
                if writer.started:
                    await writer.end()
                else:
                    await writer.json_error(500, "The model finished without producing any audio.")
                return
            elif isinstance(item, _Failed):
                await self._fail(writer, item.error)
                return

    async def _fail(self, writer: _Writer, error: BaseException) -> None:
        message = f"The model failed while answering ({type(error).__name__}: {error})."
        if not writer.started:
            await writer.json_error(500, message)
            return
        if self._multipart:
            await writer.part("application/json", _json({protocol.ERROR: message}))
        # Returning without the final body message makes uvicorn close the connection with no
        # terminating chunk: the client sees a truncated body, not a normal end.
        log.warning("cutting the reply short: %s", message)


async def _watch_disconnect(receive: Receive, gone: asyncio.Event, waiting: asyncio.Event) -> None:
    """Set `gone` when the client disconnects, and wake its wait in line (`waiting`), so it leaves at once."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            gone.set()
            waiting.set()
            return


def _json(value: dict[str, Any]) -> bytes:
    return json.dumps(value).encode()
