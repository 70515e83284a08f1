"""omni-voice-chat: talk in the browser, hear a speech-to-speech model answer, turn after turn.

UI and wiring only. The logic lives in state.py (one conversation's phases), vad.py (when a turn ends),
replying.py (one reply, streamed), backend.py (the model server) and history.py / audio_files.py.

Microphone control. Gradio 6 reads a streaming microphone's `recording` prop only when it mounts, so a
handler cannot switch it off or on by returning `gr.Audio(recording=...)`. Handlers therefore write a
never-repeating command ("stop:7", "record:8") into a hidden textbox, and that textbox's change event runs a
line of JavaScript that clicks the microphone's own stop or record button, as the user would.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: it reads this once

import argparse  # noqa: E402
import atexit  # noqa: E402
import itertools  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402

import omni_client  # noqa: E402

from audio_files import TurnFiles  # noqa: E402
from backend import Backend  # noqa: E402
from replying import LISTENING_STATUS, ReplySettings, answer, file_reply, file_user_turn, whole_reply  # noqa: E402
from state import Conversation, MicAction, Phase  # noqa: E402
from vad import AudioInputError, TurnEndReason, VadOptions  # noqa: E402

# Seconds of microphone audio per chunk sent to the server. Shorter ends turns sooner (the pause is noticed
# at the next chunk boundary) at the cost of more requests. 0.25 s is what the pause-detection trade-off in
# README.md recommends: about 0.1 s sooner than 0.5 s chunks, for a small extra CPU cost.
STREAM_EVERY_S = 0.25
DEFAULT_VAD = VadOptions()
SERVER_CHECK_S = 1.0  # how often a tab refreshes the model server's line (loading progress, restarts)

MIC_COMMAND_JS = """
(command) => {
    const action = (command || "").split(":")[0];
    const selector = {stop: "#mic .stop-button", record: "#mic .record-button"}[action];
    const button = selector && document.querySelector(selector);
    if (button) button.click();
}
"""

# Stop means quiet at once, in the browser, before the server has answered. Pausing the player is not
# enough: Gradio's stream player may still be buffering the stopped reply and calls play() when its playlist
# loads. So Stop also sets a page-wide "quiet" flag that pauses any reply that starts, until the user records
# again.
PAGE_JS = """
() => {
    window.omniVoiceChat = {quiet: false};
    document.addEventListener("play", (event) => {
        if (window.omniVoiceChat.quiet && event.target.closest && event.target.closest("#reply")) event.target.pause();
    }, true);
}
"""
QUIET_REPLY_JS = """
() => {
    window.omniVoiceChat.quiet = true;
    document.querySelector("#reply audio")?.pause();
}
"""
ALLOW_REPLY_JS = "() => { window.omniVoiceChat.quiet = false; }"

WELCOME = "Click **Record** on the microphone and speak; the answer plays when you pause."


@dataclass
class Session:
    """One browser tab: its conversation and its audio files (deleted when Gradio drops the tab's state)."""

    conversation: Conversation = field(default_factory=Conversation)
    files: TurnFiles = field(default_factory=TurnFiles)
    server_line_shown: str = ""

    def close(self) -> None:
        self.conversation.stop()  # cancels a reply in flight, so its request frees the server
        self.files.delete()


def close_session(session: Session | None) -> None:
    """gr.State's delete callback: Gradio drops a tab's state some time after the tab closes."""
    if session is not None:
        session.close()


class Handlers:
    """The page's event handlers. Plain methods, so tests call them directly without a browser."""

    def __init__(self, backend: Backend, settings: ReplySettings = ReplySettings()) -> None:
        self.backend = backend
        self.settings = settings
        self._api_files: TurnFiles | None = None
        self._api_lock = threading.Lock()
        self._api_replies = itertools.count(1)

    def page_loaded(self) -> tuple[Session, str, str]:
        """A new tab: its own session (made here, not by a gr.State factory, which Gradio would publish as an
        API endpoint), and the server's state."""
        self.backend.start()
        session = Session(server_line_shown=self.backend.status_line())
        return session, self._idle_status(), session.server_line_shown

    def server_tick(self, session: Session | None) -> tuple[object, object]:
        """Keep the server line current (loading progress, a restart, an error). The main status line
        follows it only while the tab is idle, so it never hides what the conversation is doing."""
        line = self.backend.status_line()
        if session is None or line == session.server_line_shown:  # None: the page has not loaded yet
            return gr.skip(), gr.skip()
        session.server_line_shown = line
        idle = session.conversation.phase is Phase.IDLE
        return (self._idle_status() if idle else gr.skip()), line

    def recording_started(self, session: Session, pause_secs: float, start_secs: float) -> object:
        """Record was clicked, by the user or by the app re-arming: a new turn with the page's turn options.
        Skipped while the last turn is still being answered, so the status keeps saying what happens."""
        options = VadOptions(pause_secs=float(pause_secs), start_secs=float(start_secs))
        if not session.conversation.listen(options):
            return gr.skip()
        return LISTENING_STATUS

    def chunk(self, chunk: tuple[int, np.ndarray] | None, session: Session) -> tuple[object, object, object]:
        """One microphone chunk. At the end of a turn: file the user's audio and stop the microphone."""
        conversation = session.conversation
        if chunk is None:
            return gr.skip(), gr.skip(), gr.skip()
        try:
            heard = conversation.hear(*chunk)
        except AudioInputError as error:
            conversation.stop_listening()
            gr.Warning(str(error))
            return gr.skip(), f"{error} The microphone was switched off.", conversation.mic_command(MicAction.STOP)
        if heard is None:
            return gr.skip(), gr.skip(), gr.skip()
        try:
            file_user_turn(conversation, heard, session.files)
        except OSError as error:  # e.g. a full disk: the turn is still answered, only its file is missing
            gr.Warning(f"Your words could not be saved to the chat ({error.strerror or error}); answering anyway.")
        status = f"Thinking… ({heard.utterance.duration_s:.1f} s of speech heard)"
        if heard.utterance.reason is TurnEndReason.MAX_LENGTH:
            status = (f"Thinking… you spoke for {heard.utterance.duration_s:.0f} s without a pause, the longest "
                      "turn the model takes, so your turn ends here.")
        return list(conversation.history), status, conversation.mic_command(MicAction.STOP)

    def recording_stopped(self, session: Session) -> Iterator[tuple[object, object, object, object]]:
        """The microphone stopped: answer the heard turn (streaming the reply), or just idle if the user
        switched it off themselves."""
        conversation = session.conversation
        reply = conversation.start_reply()
        if reply is None:
            if conversation.stop_listening():
                yield gr.skip(), gr.skip(), "Microphone off. Click **Record** to talk.", gr.skip()
            return
        for step in answer(conversation, reply, self.backend, session.files, self.settings):
            if reply.cancel.is_set():
                return  # Stopped: the Stop handler has the last word on the page
            if step.warning:
                gr.Warning(step.warning)
            yield (
                step.audio if step.audio is not None else gr.skip(),
                list(conversation.history) if step.history_changed else gr.skip(),
                step.status if step.status is not None else gr.skip(),
                conversation.mic_command(MicAction.RECORD) if step.rearm_mic else gr.skip(),
            )

    def playback_ended(self, session: Session) -> tuple[object, object]:
        """The player reached the reply's end: re-arm the microphone, unless the reply is still streaming (the
        player only caught up with it) or the user pressed Stop."""
        conversation = session.conversation
        if not conversation.playback_ended():
            return gr.skip(), gr.skip()
        return LISTENING_STATUS, conversation.mic_command(MicAction.RECORD)

    def stop(self, session: Session) -> tuple[object, object, str, str]:
        """Stop the conversation: cancel a reply in flight, keep everything heard and said so far."""
        conversation = session.conversation
        reply = conversation.stop()
        if reply is not None:
            file_reply(conversation, reply, session.files, outcome="stopped")
        status = "Stopped. Click **Record** to talk again."
        return None, list(conversation.history), status, conversation.mic_command(MicAction.STOP)

    def api_chat(self, audio: tuple[int, np.ndarray] | None) -> tuple[str | None, str]:
        """For programs: a whole spoken turn in, the whole spoken reply (MP3) and its text out."""
        if audio is None:
            raise gr.Error("Send an audio file with the question.")
        try:
            mp3, text = whole_reply(self.backend, *audio, self._next_api_mp3, self.settings)
        except omni_client.ReplyError as error:
            raise gr.Error(error.message) from error
        except AudioInputError as error:
            raise gr.Error(str(error)) from error
        return (str(mp3) if mp3 is not None else None), text

    def _next_api_mp3(self) -> Path:
        with self._api_lock:
            if self._api_files is None:
                self._api_files = TurnFiles()
            return self._api_files.folder / f"api-reply-{next(self._api_replies):05d}.mp3"

    def _idle_status(self) -> str:
        if not self.backend.ready:
            return self.backend.status_line()
        if self.backend.engine == "echo":
            return (f"{WELCOME} ({self.backend.description}: it speaks your own words back; "
                    "*Turn options and server* says why the model is not used.)")
        return f"{WELCOME} ({self.backend.description})"


def build_demo(handlers: Handlers) -> gr.Blocks:
    """The page, wired to `handlers`; a function so tests can build it around a backend of their own."""
    with gr.Blocks(title="omni-voice-chat", analytics_enabled=False) as demo:
        session = gr.State(None, delete_callback=close_session)
        gr.Markdown("# omni-voice-chat\nTalk, pause, and hear the model answer. It listens again after each reply.")
        with gr.Row():
            with gr.Column(scale=2):
                mic = gr.Audio(sources=["microphone"], streaming=True, label="Your microphone", elem_id="mic")
                reply = gr.Audio(streaming=True, autoplay=True, label="Reply", elem_id="reply", interactive=False)
                status = gr.Markdown(WELCOME, elem_id="status")
                stop = gr.Button("Stop conversation", variant="stop", elem_id="stop")
                with gr.Accordion("Turn options and server", open=False):
                    pause_secs = gr.Slider(0.3, 2.0, value=DEFAULT_VAD.pause_secs, step=0.05,
                                           label="Pause that ends your turn (seconds)")
                    start_secs = gr.Slider(0.1, 1.0, value=DEFAULT_VAD.start_secs, step=0.05,
                                           label="Speech needed to start a turn (seconds)")
                    server_info = gr.Markdown(elem_id="server")
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Conversation", elem_id="chatbot", height=520)
        mic_command = gr.Textbox(visible="hidden", elem_id="mic-command")
        server_timer = gr.Timer(SERVER_CHECK_S)

        demo.load(None, None, None, js=PAGE_JS)
        demo.load(handlers.page_loaded, None, [session, status, server_info], api_visibility="private",
                  show_progress="hidden")
        server_timer.tick(handlers.server_tick, [session], [status, server_info], api_visibility="private",
                          show_progress="hidden")
        mic_command.change(None, [mic_command], None, js=MIC_COMMAND_JS)
        mic.start_recording(None, None, None, js=ALLOW_REPLY_JS)
        mic.start_recording(handlers.recording_started, [session, pause_secs, start_secs], [status],
                            api_visibility="private", show_progress="hidden")
        mic.stream(handlers.chunk, [mic, session], [chatbot, status, mic_command], stream_every=STREAM_EVERY_S,
                   concurrency_limit=None, api_visibility="private", show_progress="hidden",
                   show_progress_on=[mic_command])
        answering = mic.stop_recording(handlers.recording_stopped, [session], [reply, chatbot, status, mic_command],
                                       concurrency_limit=None, api_visibility="private", show_progress="hidden")
        reply.stop(handlers.playback_ended, [session], [status, mic_command], api_visibility="private",
                   show_progress="hidden")
        stop.click(None, None, None, js=QUIET_REPLY_JS)
        stop.click(handlers.stop, [session], [reply, chatbot, status, mic_command], cancels=[answering],
                   api_visibility="private", show_progress="hidden")

        api_question = gr.Audio(type="numpy", visible=False)
        api_answer = gr.Audio(type="filepath", visible=False)
        api_text = gr.Textbox(visible=False)
        api_trigger = gr.Button(visible=False)
        api_trigger.click(handlers.api_chat, [api_question], [api_answer, api_text], api_name="chat",
                          api_description="Send a spoken question (an audio file); get the spoken reply (MP3) "
                                          "and its text (empty when the server sends none).")
    return demo


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="omni-voice-chat: a voice chat with a speech-to-speech model.")
    parser.add_argument("--server-url", default=os.environ.get("OMNI_SERVER_URL") or None,
                        help="use this running mini-omni-compatible server instead of launching one "
                             "(env OMNI_SERVER_URL)")
    parser.add_argument("--engine", choices=["auto", "echo", "mini-omni"],
                        default=os.environ.get("OMNI_ENGINE", "auto"),
                        help="engine of the launched server: auto (mini-omni when a checkpoint can be had, "
                             "else echo), echo or mini-omni (env OMNI_ENGINE)")
    parser.add_argument("--checkpoint-dir", type=Path,
                        default=Path(os.environ.get("OMNI_CHECKPOINT_DIR", "checkpoint")),
                        help="mini-omni checkpoint directory (default ./checkpoint; env OMNI_CHECKPOINT_DIR)")
    return parser.parse_args(argv)


SETTINGS = parse_args(sys.argv[1:] if __name__ == "__main__" else [])
backend = Backend(server_url=SETTINGS.server_url, engine=SETTINGS.engine, checkpoint_dir=SETTINGS.checkpoint_dir)
demo = build_demo(Handlers(backend))


def main() -> None:
    atexit.register(backend.close)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # so atexit stops the launched server
    backend.start()
    demo.queue(default_concurrency_limit=4).launch()


if __name__ == "__main__":
    main()
