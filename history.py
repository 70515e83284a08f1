"""Chat history entries for one turn, in the messages format gr.Chatbot takes (plain dicts, no Gradio).

A user turn is its WAV; an assistant turn is its MP3, then the reply's text when the server sent one, then
the turn's figures, so a glance at the chat shows how fast and how long each answer was.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TurnFigures:
    """`to_first_audio_s`: from the end of the user's speech to the reply becoming audible, as the browser
    measured it (or, without its report, to the reply's first audio reaching the app)."""

    to_first_audio_s: float | None
    reply_s: float
    outcome: str | None = None  # None for a complete reply; else what cut it short, in words

    def describe(self) -> str:
        first = "no reply audio" if self.to_first_audio_s is None else f"{self.to_first_audio_s:.2f} s to first sound"
        text = f"{first} · {self.reply_s:.1f} s reply"
        return text if self.outcome is None else f"{text} · {self.outcome}"


def user_turn(wav: Path) -> dict:
    return {"role": "user", "content": {"path": str(wav), "mime_type": "audio/wav"}}


def assistant_turn(mp3: Path | None, text: str, figures: TurnFigures) -> list[dict]:
    messages = []
    if mp3 is not None:
        messages.append({"role": "assistant", "content": {"path": str(mp3), "mime_type": "audio/mpeg"}})
    if text.strip():
        messages.append({"role": "assistant", "content": text.strip()})
    messages.append({"role": "assistant", "content": f"*{figures.describe()}*"})
    return messages
