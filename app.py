"""omni-voice-chat: talk in the browser, hear a speech-to-speech model answer, turn after turn.

UI and wiring only. The logic lives in state.py (one conversation's phases), vad.py (when a turn ends, with
end_of_turn.py's model, whose weights turn_weights.py fetches), replying.py (one reply, streamed),
live_link.py / live_route.py (the tab's live audio channel), backend.py (the model server) and history.py /
audio_files.py.

Audio does not go through Gradio: the page streams the microphone to the app and plays the reply over one
WebSocket per conversation (`/live`, on the same port: `create_app` puts the Gradio page and that route on
one FastAPI app). Gradio carries the rest: the Start and Stop clicks, the token that binds the socket to the
tab, and the chat and status line, which a Start handler streams as the conversation changes.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: it reads this once
# Everything this process writes (conversations' audio, API replies, Gradio's copies of them) lives here and is
# removed when it exits.
RUN_DIR = Path(tempfile.mkdtemp(prefix="omni-voice-chat-"))
atexit.register(shutil.rmtree, RUN_DIR, ignore_errors=True)
os.environ.setdefault("GRADIO_TEMP_DIR", str(RUN_DIR / "gradio"))
# API replies, and Gradio's copies of what the chat shows, are removed this long after they were written.
FILE_TTL_S = float(os.environ.get("OMNI_FILE_TTL_S", "600"))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import html  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import AsyncIterator  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Literal, NamedTuple, TypedDict  # noqa: E402

import gradio as gr  # noqa: E402
import uvicorn  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from fastapi.staticfiles import StaticFiles  # noqa: E402

import live_protocol  # noqa: E402
import omni_client  # noqa: E402
import turn_weights  # noqa: E402
from audio_files import TurnFiles  # noqa: E402
from backend import Backend  # noqa: E402
from end_of_turn import SharedTurnModel  # noqa: E402
from live_link import LiveLink, Send, status_line  # noqa: E402
from live_route import LiveTokens, add_live_route  # noqa: E402
from omni_server.audio_decode import DecoderUnavailable, UndecodableAudio  # noqa: E402
from replying import ReplySettings, end_conversation, whole_reply  # noqa: E402
from state import Conversation, Phase  # noqa: E402
from vad import PATIENCE, VadOptions, turn_options  # noqa: E402

WEB_DIR = Path(__file__).resolve().parent / "web"
DEFAULT_VAD = VadOptions()
DEFAULT_PATIENCE = "balanced"  # VadOptions' own defaults
SERVER_CHECK_S = 1.0  # how often a tab refreshes the model server's line (loading progress, restarts)
NO_LIVE_CHANNEL = (
    "The page could not open its live audio connection to the app (the microphone was refused, or a proxy "
    "blocks WebSockets). Click **Start** to try again."
)
CONNECT_TIMEOUT_S = 10.0  # the page has this long to open its live channel after Start
FOLLOW_POLL_S = 0.05  # how often a conversation's follower looks for changes to show (a version number)
MAX_UPLOAD_BYTES = 16 * 1024 * 1024  # a question for the `chat` API: 30 s of 48 kHz stereo float WAV is 11.5 MB
STOP_GRACE_S = 1.0  # Stop waits this long for the page's own stop over the socket (which knows what was heard)

PREPARE_JS = "() => window.omniLive.prepare()"
CONNECT_JS = "(token) => window.omniLive.connect(token)"
STOP_JS = "() => window.omniLive.stop()"

WELCOME = "Click **Start** and speak; the answer plays when you pause, and you can talk over it to cut in."


class PageOpened(NamedTuple):
    """`page_loaded`'s outputs, in `build_demo`'s order (it wires them by these names)."""

    session: Session
    status: str
    server: str


class ServerView(NamedTuple):
    """`server_tick`'s outputs: the main status line (only before a conversation) and the server line."""

    status: object
    server: object


class ConversationView(NamedTuple):
    """`start`'s outputs: the live channel's token (once), the chat and the status line."""

    token: object
    chatbot: object
    status: object


class StoppedView(NamedTuple):
    """`stop`'s outputs."""

    chatbot: list[dict]
    status: str


class ApiReply(NamedTuple):
    """`api_chat`'s outputs: the reply's MP3 (None when the server sent no audio) and its text."""

    answer: str | None
    text: str


@dataclass
class Session:
    """One browser tab: its conversation, its audio files and its live channel, when one is open."""

    conversation: Conversation = field(default_factory=Conversation)
    files: TurnFiles = field(default_factory=TurnFiles)
    link: LiveLink | None = None
    server_line_shown: str = ""

    def close(self) -> None:
        """The tab is gone: end the conversation (freeing the server) and delete its audio."""
        if self.link is not None:
            self.link.close()
        self.conversation.stop()
        self.files.delete()


class Handlers:
    """The page's event handlers and the live channel's sessions. Plain methods, so tests call them
    directly without a browser."""

    def __init__(
        self,
        backend: Backend,
        settings: ReplySettings = ReplySettings(),
        turn_model: SharedTurnModel | None = None,
        files_root: Path = RUN_DIR,
    ) -> None:
        self.backend = backend
        self.settings = settings
        self.turn_model = turn_model
        self.files_root = files_root
        self._open_tabs: dict[str, Session] = {}  # by Gradio's session hash, to close a tab's session at once
        self.tokens: LiveTokens[Session] = LiveTokens()
        self._api_files: TurnFiles | None = None
        self._api_lock = threading.Lock()
        self._api_replies = itertools.count(1)

    def page_loaded(self, request: gr.Request | None = None) -> PageOpened:
        """A new tab: its own session (made here, not by a gr.State factory, which Gradio would publish as an
        API endpoint), and the server's state."""
        self.backend.start()
        completion = self.turn_model.completion if self.turn_model is not None else None
        session = Session(
            conversation=Conversation(completion),
            files=TurnFiles(self.files_root / "tabs"),
            server_line_shown=self._server_line(),
        )
        if request is not None and request.session_hash:
            self._open_tabs[request.session_hash] = session
        return PageOpened(session, self._idle_status(), session.server_line_shown)

    def page_closed(self, request: gr.Request | None = None) -> None:
        """The tab was closed or reloaded (Gradio's unload): its conversation ends and its audio goes now."""
        if request is not None and request.session_hash:
            self.close_session(self._open_tabs.pop(request.session_hash, None))

    def close_session(self, session: Session | None) -> None:
        """End a tab's session: at its close (`page_closed`), or when Gradio drops its state (an hour later)."""
        if session is not None:
            for tab, open_session in list(self._open_tabs.items()):
                if open_session is session:
                    del self._open_tabs[tab]
            self.tokens.revoke(session)
            session.close()

    def server_tick(self, session: Session | None) -> ServerView:
        """Keep the server line current (loading progress, a restart, an error). The main status line
        follows it only before a conversation, so it never hides what the conversation is doing."""
        line = self._server_line()
        if session is None or line == session.server_line_shown:  # None: the page has not loaded yet
            return ServerView(gr.skip(), gr.skip())
        session.server_line_shown = line
        idle = session.conversation.phase is Phase.IDLE
        return ServerView(self._idle_status() if idle else gr.skip(), line)

    def options_changed(
        self,
        session: Session | None,
        patience: str,
        semantic: bool,
        pause_secs: float,
        start_secs: float,
        barge_in: bool,
    ) -> None:
        """The turn options, for this tab's next turn."""
        if session is not None:
            options = turn_options(str(patience), bool(semantic), float(pause_secs), float(start_secs))
            session.conversation.set_options(options, bool(barge_in))

    async def start(self, session: Session) -> AsyncIterator[ConversationView]:
        """Start clicked: hand the page a token for its live channel, then stream the chat and the status line
        as the conversation changes, until it stops. Async, so a conversation
        holds no worker thread while it lasts: it looks for changes every FOLLOW_POLL_S."""
        conversation = session.conversation
        if conversation.phase not in (Phase.IDLE, Phase.STOPPED):
            return  # a double click: the running conversation's follower is at work
        yield ConversationView(self.tokens.issue(session), gr.skip(), "Opening the microphone…")
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while conversation.phase in (Phase.IDLE, Phase.STOPPED):
            if time.monotonic() > deadline:
                self.tokens.revoke(session)
                yield ConversationView("", gr.skip(), NO_LIVE_CHANNEL)
                return
            await asyncio.sleep(FOLLOW_POLL_S)
        shown: StoppedView | None = None
        seen = -1
        while True:
            stopped = conversation.phase is Phase.STOPPED
            link = session.link
            if stopped and link is not None:  # it files the replies it stopped, then is closed
                grace = time.monotonic() + STOP_GRACE_S
                while not link.closed.is_set() and time.monotonic() < grace:
                    await asyncio.sleep(FOLLOW_POLL_S)
            if conversation.version != seen:
                seen = conversation.version
                view = StoppedView(self._chat(conversation), self._status(conversation))
                if view != shown:
                    shown = view
                    yield ConversationView(gr.skip(), *view)
            if stopped:
                return
            await asyncio.sleep(FOLLOW_POLL_S)

    def stop(self, session: Session) -> StoppedView:
        """Stop clicked: end the conversation, keeping everything heard and said so far. The page stops its
        side over the socket first (which knows how much of the reply was heard); this is the fallback."""
        link = session.link
        if link is not None:
            link.closed.wait(STOP_GRACE_S)
            link.close()
        end_conversation(session.conversation, session.files)  # a no-op when the link has ended it already
        self.tokens.revoke(session)
        return StoppedView(self._chat(session.conversation), self._status(session.conversation))

    def open_link(self, session: Session, send: Send) -> LiveLink | None:
        """The live route found `session` by its token: the tab's channel to a new conversation, or None when
        one is going on already."""
        link = LiveLink(session, self.backend, self.settings, send)
        if not link.open():
            return None
        session.link = link
        return link

    def api_chat(self, question_path: str | None) -> ApiReply:
        """For programs: a whole spoken question (an audio file) in, the whole spoken reply (MP3) and its text
        out. Gradio hands over the file undecoded; its size, rate and length are checked before decoding."""
        if question_path is None:
            raise gr.Error("Send an audio file with the question.")
        path = Path(question_path)
        if path.stat().st_size > MAX_UPLOAD_BYTES:
            raise gr.Error(f"The audio file is larger than {MAX_UPLOAD_BYTES // (1024 * 1024)} MiB.")
        try:
            mp3, text = whole_reply(self.backend, path.read_bytes(), self._next_api_mp3, self.settings)
        except omni_client.ReplyError as error:
            raise gr.Error(error.message) from error
        except (UndecodableAudio, DecoderUnavailable) as error:
            raise gr.Error(str(error)) from error
        return ApiReply(str(mp3) if mp3 is not None else None, text)

    @staticmethod
    def _chat(conversation: Conversation) -> list[dict]:
        """The history, plus the text of the reply being spoken as it streams in."""
        chat = list(conversation.history)
        reply = conversation.reply
        if reply is not None and reply.text.strip():
            chat.append({"role": "assistant", "content": reply.text.strip()})
        return chat

    def _next_api_mp3(self) -> Path:
        """A name for the next API reply; replies older than FILE_TTL_S are removed (the caller downloaded them)."""
        with self._api_lock:
            if self._api_files is None:
                self._api_files = TurnFiles(self.files_root / "api")
            self._api_files.remove_older_than(FILE_TTL_S)
            return self._api_files.folder / f"api-reply-{next(self._api_replies):05d}.mp3"

    def _status(self, conversation: Conversation) -> str:
        """The conversation's line, saying so when turns end on silence because the turn model is missing."""
        line = status_line(conversation, self.backend.description)
        problem = self.turn_model.problem if self.turn_model is not None else None
        if problem and conversation.options.semantic and conversation.phase is not Phase.STOPPED:
            return f"{line} ({problem}: your turn ends after {conversation.options.pause_secs:g} s of silence.)"
        return line

    def _server_line(self) -> str:
        """The model server's state, and the end-of-turn model's."""
        return f"{self.backend.status_line()}  \nEnd of turn: {self._turn_model_line()}"

    def _turn_model_line(self) -> str:
        model = self.turn_model
        if model is None:
            return "after a pause of silence (no end-of-turn model in this app)."
        if model.problem:
            return f"after a pause of silence. {model.problem}."
        if model.loading:
            return "the end-of-turn model is loading; until then, after a pause of silence."
        return "Smart Turn v3.2 hears when you have finished (BSD-2-Clause, by Daily)."

    def _idle_status(self) -> str:
        if not self.backend.ready:
            return self.backend.status_line()
        if self.backend.engine == "echo":
            return (
                f"{WELCOME} ({self.backend.description}: it speaks your own words back; "
                "*Turn options and server* says why the model is not used.)"
            )
        return f"{WELCOME} ({self.backend.description})"


LIVE_PANEL = f"""
<div data-live-settings="{html.escape(json.dumps(live_protocol.page_settings()))}">
  <div id="level" title="Microphone level"><div class="fill"></div></div>
  <p id="live-note" role="alert" hidden></p>
</div>
"""
LIVE_CSS = """
#level { height: 8px; border-radius: 4px; background: var(--block-border-color); overflow: hidden; }
#level .fill { height: 100%; width: 0%; background: var(--color-accent); transition: width 60ms linear; }
#live-note { color: var(--error-text-color); margin: 6px 0 0; }
"""


def outputs(fields: tuple[str, ...], components: dict[str, gr.components.Component]) -> list[gr.components.Component]:
    """A handler's output components, in the order of its named outputs' `_fields`."""
    return [components[name] for name in fields]


class QuietEvent(TypedDict):
    """Event options of the page's own events: kept out of the API, shown without a progress overlay."""

    api_visibility: Literal["private"]
    show_progress: Literal["hidden"]


def build_demo(handlers: Handlers) -> gr.Blocks:
    """The page, wired to `handlers`; a function so tests can build it around a backend of their own."""
    ttl = round(FILE_TTL_S)
    with gr.Blocks(title="omni-voice-chat", analytics_enabled=False, delete_cache=(ttl, ttl)) as demo:
        session = gr.State(None, delete_callback=handlers.close_session)
        gr.Markdown("# omni-voice-chat\nTalk, pause, and hear the model answer. Talk over it to cut in.")
        with gr.Row():
            with gr.Column(scale=2):
                with gr.Row():
                    start = gr.Button("Start conversation", variant="primary", elem_id="start")
                    stop = gr.Button("Stop conversation", variant="stop", elem_id="stop")
                gr.HTML(LIVE_PANEL, js_on_load=(WEB_DIR / "live.js").read_text(), css_template=LIVE_CSS, elem_id="live")
                status = gr.Markdown(WELCOME, elem_id="status")
                with gr.Accordion("Turn options and server", open=False):
                    patience = gr.Radio(
                        [(name.capitalize(), name) for name in PATIENCE],
                        value=DEFAULT_PATIENCE,
                        label="When to answer",
                        info="Quick answers as soon as you sound finished; patient waits longer through your pauses.",
                    )
                    semantic = gr.Checkbox(
                        DEFAULT_VAD.semantic,
                        label="Listen for the end of your sentence (off: answer after a fixed pause)",
                    )
                    pause_secs = gr.Slider(
                        0.3,
                        2.0,
                        value=DEFAULT_VAD.pause_secs,
                        step=0.05,
                        label="Fixed pause that ends your turn, when not listening for the "
                        "end of your sentence (seconds)",
                    )
                    start_secs = gr.Slider(
                        0.1,
                        1.0,
                        value=DEFAULT_VAD.start_secs,
                        step=0.05,
                        label="Speech needed to start a turn (seconds)",
                    )
                    barge_in = gr.Checkbox(True, label="Talking over a reply cuts it off (barge-in)")
                    server_info = gr.Markdown(elem_id="server")
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Conversation", elem_id="chatbot", height=520)
        token = gr.Textbox(visible="hidden", elem_id="live-token")
        server_timer = gr.Timer(SERVER_CHECK_S)

        quiet: QuietEvent = {"api_visibility": "private", "show_progress": "hidden"}
        shown = {"session": session, "status": status, "server": server_info, "chatbot": chatbot, "token": token}
        demo.load(handlers.page_loaded, None, outputs(PageOpened._fields, shown), **quiet)
        demo.unload(handlers.page_closed)
        server_timer.tick(handlers.server_tick, [session], outputs(ServerView._fields, shown), **quiet)
        changeable: list[gr.Radio | gr.Checkbox | gr.Slider] = [patience, semantic, pause_secs, start_secs, barge_in]
        options = [session, *changeable]
        for option in changeable:
            option.change(handlers.options_changed, options, None, **quiet)
        start.click(None, None, None, js=PREPARE_JS)
        following = start.click(
            handlers.start, [session], outputs(ConversationView._fields, shown), concurrency_limit=None, **quiet
        )
        token.change(None, [token], None, js=CONNECT_JS)
        stop.click(None, None, None, js=STOP_JS)
        stop.click(handlers.stop, [session], outputs(StoppedView._fields, shown), cancels=[following], **quiet)

        api_question = gr.Audio(type="filepath", format=None, visible=False)  # undecoded: api_chat checks it
        api_answer = gr.Audio(type="filepath", visible=False)
        api_text = gr.Textbox(visible=False)
        api_trigger = gr.Button(visible=False)
        api_outputs = outputs(ApiReply._fields, {"answer": api_answer, "text": api_text})
        api_trigger.click(
            handlers.api_chat,
            [api_question],
            api_outputs,
            api_name="chat",
            api_description="Send a spoken question (an audio file); get the spoken reply (MP3) "
            "and its text (empty when the server sends none).",
        )
    return demo


def create_app(handlers: Handlers) -> FastAPI:
    """The page and its live channel on one FastAPI app, so they share a port (and a Space's one URL)."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    add_live_route(app, handlers.tokens, handlers.open_link, path="/live")
    app.mount("/live-client", StaticFiles(directory=WEB_DIR), name="live-client")
    demo = build_demo(handlers).queue(default_concurrency_limit=4)
    return gr.mount_gradio_app(app, demo, path="/", max_file_size=MAX_UPLOAD_BYTES)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="omni-voice-chat: a voice chat with a speech-to-speech model.")
    parser.add_argument(
        "--server-url",
        default=os.environ.get("OMNI_SERVER_URL") or None,
        help="use this running mini-omni-compatible server instead of launching one (env OMNI_SERVER_URL)",
    )
    parser.add_argument(
        "--engine",
        choices=["auto", "echo", "mini-omni"],
        default=os.environ.get("OMNI_ENGINE", "auto"),
        help="engine of the launched server: auto (mini-omni when a checkpoint can be had, "
        "else echo), echo or mini-omni (env OMNI_ENGINE)",
    )
    parser.add_argument(
        "--turn-model",
        type=Path,
        default=None,
        help=f"the end-of-turn model's ONNX file (env {turn_weights.PATH_VARIABLE}; default: the user's "
        "cache, fetched from PyPI or the Hub on first start unless env "
        f"{turn_weights.DOWNLOAD_VARIABLE}=0)",
    )
    parser.add_argument(
        "--checkpoint-dir",
        type=Path,
        default=Path(os.environ.get("OMNI_CHECKPOINT_DIR", "checkpoint")),
        help="mini-omni checkpoint directory (default ./checkpoint; env OMNI_CHECKPOINT_DIR)",
    )
    return parser.parse_args(argv)


SETTINGS = parse_args(sys.argv[1:] if __name__ == "__main__" else [])
backend = Backend(server_url=SETTINGS.server_url, engine=SETTINGS.engine, checkpoint_dir=SETTINGS.checkpoint_dir)
turn_model = SharedTurnModel(SETTINGS.turn_model)
handlers = Handlers(backend, turn_model=turn_model)
app = create_app(handlers)


def main() -> None:
    # The app's own lines and its model server's (one summary per reply); the server keeps no access log.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    atexit.register(backend.close)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # so atexit stops the launched server
    backend.start()
    turn_model.start_loading()
    host = os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1")  # Gradio's own variables (a Space sets them)
    port = int(os.environ.get("GRADIO_SERVER_PORT", "7860"))
    print(f"omni-voice-chat on http://{host}:{port}", flush=True)
    # Open connections (a tab, an API client) get 5 s to finish at shutdown, so the app always reaches its exit
    # handlers (which stop the model server and remove its files) before a supervisor kills it.
    uvicorn.run(app, host=host, port=port, log_level="warning", ws_ping_interval=20.0, timeout_graceful_shutdown=5)


if __name__ == "__main__":
    main()
