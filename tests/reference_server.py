"""A test server that answers like the original mini-omni `server.py` (Flask dev server, threaded=False), byte
for byte on the wire: HTTP/1.0, status line and headers written together with the first body bytes, no
Content-Length and no chunked encoding on success (the body ends when the connection closes), Werkzeug's
265-byte HTML page on a 500, one connection at a time. Facts from ../shared/mini-omni, summed up in
docs/protocol.md §10.
"""

from __future__ import annotations

import enum
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from email.utils import formatdate

WERKZEUG_500_PAGE = (
    b"<!doctype html>\n<html lang=en>\n<title>500 Internal Server Error</title>\n"
    b"<h1>Internal Server Error</h1>\n<p>The server encountered an internal error and was unable to complete "
    b"your request. Either the server is overloaded or there is an error in the application.</p>\n"
)
WERKZEUG_404_PAGE = (  # same template as the 500 page (not byte-checked against the reference)
    b"<!doctype html>\n<html lang=en>\n<title>404 Not Found</title>\n<h1>Not Found</h1>\n<p>The requested URL "
    b"was not found on the server. If you entered the URL manually please check your spelling and try again.</p>\n"
)
SERVER_HEADER = b"Server: Werkzeug/3.1.9 Python/3.11.7\r\n"


class Behaviour(enum.Enum):
    STREAM = "stream"  # 200, pieces `delay_s` apart, then close (also how a failed generation looks)
    HTML_500 = "html_500"  # a failure before the first chunk
    EMPTY = "empty"  # 200 and no body: generation ended before any window
    STALL = "stall"  # 200, the pieces, then silence with the connection open


@dataclass
class Script:
    behaviour: Behaviour = Behaviour.STREAM
    pieces: list[bytes] = field(default_factory=list)
    first_delay_s: float = 0.0
    delay_s: float = 0.0
    content_type: bytes = b"audio/wav"


class ReferenceServer:
    def __init__(self, script: Script) -> None:
        self.script = script
        self.bodies: list[dict] = []
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=8)
        self._listener.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="reference-server", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def __enter__(self) -> ReferenceServer:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._listener.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self._listener.accept()
            except TimeoutError:
                continue
            with connection:
                connection.settimeout(5)
                try:
                    self._answer(connection)
                except OSError:
                    pass  # the client went away

    def _answer(self, connection: socket.socket) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            request += connection.recv(65536)
        head, body = request.split(b"\r\n\r\n", 1)
        if not head.startswith(b"POST /chat "):  # no health route in the reference
            page = WERKZEUG_404_PAGE
            connection.sendall(
                self._status(b"404 NOT FOUND", b"text/html; charset=utf-8", b"Content-Length: %d\r\n" % len(page))
                + page
            )
            return
        length = next(
            int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
        )
        while len(body) < length:
            body += connection.recv(65536)
        self.bodies.append(json.loads(body))
        script = self.script
        time.sleep(script.first_delay_s)
        if script.behaviour is Behaviour.HTML_500:
            connection.sendall(
                self._status(b"500 INTERNAL SERVER ERROR", b"text/html; charset=utf-8", b"Content-Length: 265\r\n")
                + WERKZEUG_500_PAGE
            )
            return
        pieces = list(script.pieces) if script.behaviour is not Behaviour.EMPTY else []
        first = pieces.pop(0) if pieces else b""
        connection.sendall(self._status(b"200 OK", script.content_type) + first)  # headers only with the first bytes
        for piece in pieces:
            time.sleep(script.delay_s)
            connection.sendall(piece)
        if script.behaviour is Behaviour.STALL:
            self._stop.wait()

    @staticmethod
    def _status(status: bytes, content_type: bytes, extra: bytes = b"") -> bytes:
        date = formatdate(usegmt=True).encode()
        return (
            b"HTTP/1.0 "
            + status
            + b"\r\n"
            + SERVER_HEADER
            + b"Date: "
            + date
            + b"\r\n"
            + b"Content-Type: "
            + content_type
            + b"\r\n"
            + extra
            + b"Connection: close\r\n\r\n"
        )
