"""The reply's text, decoded incrementally from the text stream with the checkpoint's `tokenizer.json`.

Qwen2's byte-level tokens can split one UTF-8 character over several ids, so a piece is only released once
the decoded text no longer ends in an incomplete character (U+FFFD). Special ids (eot, pad_t, ... ≥ 151936)
and the tokenizer's own special tokens are skipped, as are ids the tokenizer does not know.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from omni_server.mini_omni.config import EOT

_INCOMPLETE = "\ufffd"


def load_tokenizer(path: Path) -> Tokenizer:
    return Tokenizer.from_file(str(path))


class TextStreamer:
    """Feed recorded text ids one by one; get back the text they add (often "" while a character is split).

    Only a short window of ids is re-decoded per push: `_prefix` marks where the last released piece's
    decoding context starts, `_read` where the released text ends.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def push(self, token: int) -> str:
        if token >= EOT or token < 0:
            return ""
        self._ids.append(token)
        released = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        if len(text) <= len(released) or text.endswith(_INCOMPLETE):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(released) :]

    def flush(self) -> str:
        """Whatever is still held back at the end (an incomplete character decodes as U+FFFD)."""
        released = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return text[len(released) :] if len(text) > len(released) else ""

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True) if ids else ""
