"""The live audio channel's WebSocket route, on the same FastAPI app (and port) as the Gradio page.

A socket is bound to one tab's session by a token the tab got from its own Gradio event: 32 random bytes,
single use, and only the latest one of a session is valid, so no tab can hear or feed another's conversation
and a token seen once (in a log, say) opens nothing. Frames are handled on worker threads one at a time, in
order, so a busy tab never holds up another tab's audio; replies go out through an outbox the reply threads
fill without blocking.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from fastapi import FastAPI, WebSocket, WebSocketDisconnect

import live_protocol as wire
from live_link import LiveLink, Send

log = logging.getLogger(__name__)

S = TypeVar("S")
LOST = "The live audio connection closed."


class LiveTokens(Generic[S]):
    """Tokens that bind one WebSocket to one session: unguessable, single use, one live token per session."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sessions: dict[str, S] = {}

    def issue(self, session: S) -> str:
        """A new token for `session`; any unclaimed token it had before stops working."""
        with self._lock:
            self._forget(session)
            token = secrets.token_urlsafe(32)
            self._sessions[token] = session
            return token

    def claim(self, token: str) -> S | None:
        """The session of an issued, unused token (which is used up now); None for anything else."""
        with self._lock:
            return self._sessions.pop(token, None)

    def revoke(self, session: S) -> None:
        with self._lock:
            self._forget(session)

    def _forget(self, session: S) -> None:
        for token in [token for token, owner in self._sessions.items() if owner is session]:
            del self._sessions[token]


MakeLink = Callable[[S, Send], LiveLink | None]  # an opened link, or None when the session refuses one


def add_live_route(app: FastAPI, tokens: LiveTokens[S], make_link: MakeLink[S], path: str = "/live") -> None:
    @app.websocket(path)
    async def live(socket: WebSocket) -> None:
        await socket.accept()
        session = await _greeted_session(socket, tokens)
        if session is None:
            return
        loop = asyncio.get_running_loop()
        outbox: asyncio.Queue[str | bytes] = asyncio.Queue()

        def send(message: str | bytes) -> None:
            loop.call_soon_threadsafe(outbox.put_nowait, message)

        link = await asyncio.to_thread(make_link, session, send)
        if link is None:
            await _refuse(socket, "This tab's conversation is already running in another connection.")
            return
        sender = asyncio.create_task(_send_all(socket, outbox))
        problem: str | None = None
        try:
            problem = await _receive_all(socket, link)
        except WebSocketDisconnect:
            pass
        finally:
            sender.cancel()
            await asyncio.to_thread(link.close, None if link.closed.is_set() else problem or LOST)
        await _close(socket, problem)


async def _greeted_session(socket: WebSocket, tokens: LiveTokens[S]) -> S | None:
    """The session named by the socket's first message, or None after refusing the socket."""
    try:
        text = await asyncio.wait_for(socket.receive_text(), wire.HELLO_TIMEOUT_S)
        hello = wire.parse_client_message(text)
    except (TimeoutError, WebSocketDisconnect, KeyError, wire.ProtocolError):
        hello = None
    session = tokens.claim(hello.token) if isinstance(hello, wire.Hello) else None
    if session is None:
        await _refuse(socket, "This page's live audio link is not valid any more: reload the page to talk.")
    return session


async def _refuse(socket: WebSocket, sentence: str) -> None:
    await _close(socket, sentence, wire.REFUSED_CODE)


async def _close(socket: WebSocket, problem: str | None, code: int = wire.UNUSABLE_CODE) -> None:
    """Close the socket: normally, or after telling the page what went wrong in a sentence."""
    try:
        if problem is None:
            await socket.close(code=1000)
        else:
            await socket.send_text(wire.server_message("error", message=problem))
            await socket.close(code=code)
    except (WebSocketDisconnect, RuntimeError):
        pass  # the page left first


async def _receive_all(socket: WebSocket, link: LiveLink) -> str | None:
    """Feed the page's messages to the link until the socket closes or the user stops. Returns a sentence
    for the user when the page sent something unusable."""
    while not link.closed.is_set():  # closed by Stop from the page or from the Gradio handler
        message = await socket.receive()
        if message["type"] == "websocket.disconnect":
            return None
        try:
            if message.get("bytes") is not None:
                await asyncio.to_thread(link.hear, message["bytes"])
                continue
            parsed = wire.parse_client_message(message.get("text") or "")
        except wire.ProtocolError as error:
            log.warning("live channel: %s", error)
            return f"The page sent something the app could not use ({error}); the conversation was stopped."
        if isinstance(parsed, wire.Stop):
            await asyncio.to_thread(link.close)
            return None
        if isinstance(parsed, wire.Sounding):
            await asyncio.to_thread(link.sounding, parsed.turn, parsed.after_s)
        elif isinstance(parsed, wire.Played):
            await asyncio.to_thread(link.played, parsed.turn, parsed.samples, parsed.complete)
    return None


async def _send_all(socket: WebSocket, outbox: asyncio.Queue[str | bytes]) -> None:
    """Send what the link queues, in order; a ping when nothing was sent for a while keeps proxies open."""
    try:
        while True:
            try:
                message = await asyncio.wait_for(outbox.get(), wire.PING_INTERVAL_S)
            except TimeoutError:
                message = wire.server_message("ping")
            if isinstance(message, bytes):
                await socket.send_bytes(message)
            else:
                await socket.send_text(message)
    except (WebSocketDisconnect, RuntimeError):
        pass  # the socket closed; the receiver ends the conversation
