"""One request's "AT" decoding of mini-omni v1: prompt, prefill, decode iterations, stop (docs/mini-omni.md §7-§11).

A request takes two rows: item 0 answers with audio, item 1 with text only; each step takes 7 audio ids from
item 0 and one text id from item 1. A `Generation` yields every step that the reference appends to its 8
output lists; `batch.Batcher` runs its forwards beside other requests' (docs/mini-omni.md §17). The SNAC
regrouping and PCM are the engine's business.
"""

from __future__ import annotations

import enum
import queue
import threading
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from omni_server.mini_omni.config import (
    ANSWER_A,
    ANSWER_T,
    AUDIO_LAYERS,
    EOA,
    EOT,
    INPUT_A,
    INPUT_T,
    PAD_A,
    PAD_T,
    STREAMS,
    audio_offset,
)
from omni_server.mini_omni.gpt import ITEMS, MiniOmniModel, Selection
from omni_server.mini_omni.parts import run_to_end
from omni_server.mini_omni.whisper import feature_length, log_mel

DEFAULT_BLOCK_SIZE = 2048


@dataclass(frozen=True)
class Step:
    """One appended step: element `index` of the 8 output lists (0 = prefill, k = decode iteration k)."""

    index: int
    audio: tuple[int, ...]  # the 7 local audio ids (0..4159) appended to lists 0..6
    text: int  # the recorded text id (after forcing) appended to list 7


class StopReason(enum.Enum):
    EOA = "eoa_layer6"
    MAX_TOKENS = "max_tokens"


def prompt_length(audio_16k: np.ndarray) -> int:
    """T, the prompt's positions for this audio: the kept encoder rows plus 3 (docs/mini-omni.md §7)."""
    return feature_length(len(audio_16k)) + 3


def max_tokens_error(prompt_length: int, max_tokens: int, block_size: int = DEFAULT_BLOCK_SIZE) -> str | None:
    """Why `max_tokens` leaves no room to generate, or None. It counts the prompt (docs/mini-omni.md §11)."""
    if max_tokens <= prompt_length:
        return (
            f"max_tokens ({max_tokens}) counts the prompt, which takes {prompt_length} positions for this audio: "
            f"it must be more than {prompt_length}"
        )
    if max_tokens - 1 > block_size:
        return f"max_tokens ({max_tokens}) is more than the model's {block_size + 1} (its context is {block_size})"
    return None


def prompt_ids(audio_rows: int) -> torch.Tensor:
    """The [2, 8, T] prompt ids (docs/mini-omni.md §7); positions 1..T_a of the audio streams become features."""
    t = audio_rows + 3
    ids = torch.empty(ITEMS, STREAMS, t, dtype=torch.long)
    for layer in range(AUDIO_LAYERS):
        shift = audio_offset(layer)
        ids[:, layer] = shift + PAD_A
        ids[:, layer, 0] = shift + INPUT_A
        ids[:, layer, t - 2] = shift + EOA
        ids[0, layer, t - 1] = shift + ANSWER_A
    ids[:, AUDIO_LAYERS] = PAD_T
    ids[:, AUDIO_LAYERS, 0] = INPUT_T
    ids[:, AUDIO_LAYERS, t - 2] = EOT
    ids[:, AUDIO_LAYERS, t - 1] = ANSWER_T
    return ids


def decode_ids(step: Step) -> torch.Tensor:
    """The [2, 8, 1] ids fed after `step`: item 0 its audio (layer-shifted), item 1 pad_a; both its text."""
    ids = torch.empty(ITEMS, STREAMS, 1, dtype=torch.long)
    for layer in range(AUDIO_LAYERS):
        ids[0, layer] = step.audio[layer] + audio_offset(layer)
        ids[1, layer] = PAD_A + audio_offset(layer)
    ids[:, AUDIO_LAYERS] = step.text
    return ids


@torch.inference_mode()
def audio_embeddings(model: MiniOmniModel, audio_16k: np.ndarray) -> torch.Tensor:
    """Whisper encoder + adapter: [2, T_a, n_embd], the same features for both items (docs/mini-omni.md §5-§6)."""
    return run_to_end(audio_embeddings_in_parts(model, audio_16k))


def audio_embeddings_in_parts(model: MiniOmniModel, audio_16k: np.ndarray) -> Generator[None, None, torch.Tensor]:
    """`audio_embeddings`, pausing between the encoder's blocks (see `WhisperEncoder.in_parts`)."""
    rows = feature_length(len(audio_16k))
    mel = log_mel(audio_16k).to(device=model.device, dtype=model.dtype)
    # fp32 is the exact mode: there the encoder runs whole, as the reference's (identical output on this CPU);
    # otherwise its last block computes only the kept rows (the same values to ~1e-6, 5% less work).
    keep_rows = None if model.dtype == torch.float32 else rows
    features = (yield from model.encoder.in_parts(mel[None], keep_rows=keep_rows))[:, :rows]
    # Both items get the same features: the adapter runs once and its output is shared, not recomputed.
    return model.gpt.whisper_adapter(features).expand(ITEMS, -1, -1)


class Phase(enum.Enum):
    """A generation's life in the `Batcher`: waiting for a slot, encoding and prefilling its question in
    parts between the batch's steps, decoding one step per batch step, then done (its slot freed)."""

    WAITING = "waiting"
    ADMITTING = "admitting"
    DECODING = "decoding"
    DONE = "done"


class _End:
    """Put on a generation's channel after its last step."""


@dataclass
class Generation:
    """One request's decoding; a `Batcher` runs it, and the consumer iterates it for the appended `Step`s.
    When exhausted, `stop_reason` says why it ended (None: cancelled). `cancel` frees its slot at the batch's
    next step.

    Also kept for inspection: `selections[k]`, the raw picks of forward k (the discarded eoa step included,
    text before forcing), and the wall seconds its whisper encoding and prefill took.
    """

    model: MiniOmniModel
    audio_16k: np.ndarray
    max_tokens: int
    features: torch.Tensor | None = None  # the encoder's output given instead of computed (the warm-up's zeros)
    stop_reason: StopReason | None = None
    selections: list[Selection] = field(default_factory=list)
    encode_seconds: float | None = None
    prefill_seconds: float | None = None

    def __post_init__(self) -> None:
        self._prompt_length = prompt_length(self.audio_16k)
        error = max_tokens_error(self._prompt_length, self.max_tokens, self.model.config.block_size)
        if error is not None:
            raise ValueError(error)
        self.phase = Phase.WAITING
        self._channel: queue.SimpleQueue[Step | _End | BaseException] = queue.SimpleQueue()
        self._cancelled = threading.Event()
        self._last: Step | None = None
        self._text_ended = False

    # ------------------------------------------------------------------ the consumer's side

    def __iter__(self) -> Iterator[Step]:
        return self

    def __next__(self) -> Step:
        item = self._channel.get()
        if isinstance(item, _End):
            self._channel.put(item)  # exhausted for good
            raise StopIteration
        if isinstance(item, BaseException):
            self._channel.put(_End())
            raise item
        return item

    def cancel(self) -> None:
        """Stop generating (the consumer is gone); idempotent, and harmless once done."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    # ------------------------------------------------------------------ the batcher's side

    def admit(self, slot: int) -> Iterator[None]:
        """Encode the question and prefill it into `slot`, pausing between parts (whisper's blocks, then the
        GPT's); then the first step is out and the generation decodes. No stop and no text-end check at the
        prefill (docs/mini-omni.md §11)."""
        self.phase = Phase.ADMITTING
        began = time.perf_counter()
        if self.features is not None:
            embeddings = self.features
        else:
            embeddings = yield from audio_embeddings_in_parts(self.model, self.audio_16k)
        _synchronize(self.model.device)
        self.encode_seconds = time.perf_counter() - began
        yield
        began = time.perf_counter()
        gpt = self.model.gpt
        prompt = prompt_ids(embeddings.shape[1]).to(self.model.device)
        hidden = yield from gpt.prefill_in_parts(prompt, embeddings, slot)
        picked = self._keep(gpt.select(hidden))
        self.prefill_seconds = time.perf_counter() - began
        self.phase = Phase.DECODING
        self._emit(Step(0, picked.audio, picked.text))

    def decode_input(self) -> tuple[torch.Tensor, int]:
        """The next forward's ids [2, 8, 1] and its position."""
        if self._last is None:
            raise RuntimeError("the generation has not been prefilled")
        return decode_ids(self._last), self._prompt_length + self._last.index

    def advance(self, picked: Selection) -> None:
        """Take the picks of the forward fed by `decode_input`: append a step, or stop (docs/mini-omni.md §11)."""
        if self._last is None:
            raise RuntimeError("the generation has not been prefilled")
        self._keep(picked)
        if picked.audio[AUDIO_LAYERS - 1] == EOA:
            self.finish(StopReason.EOA)
            return
        text = PAD_T if self._text_ended else picked.text
        self._text_ended = self._text_ended or text == EOT
        self._emit(Step(self._last.index + 1, picked.audio, text))

    def finish(self, reason: StopReason | None) -> None:
        self.stop_reason = reason
        self.phase = Phase.DONE
        self._channel.put(_End())

    def fail(self, error: BaseException) -> None:
        self.phase = Phase.DONE
        self._channel.put(error)

    def _emit(self, step: Step) -> None:
        self._last = step
        self._channel.put(step)
        # max_tokens counts the prompt's T positions and one per step: the step at index max_tokens - T - 1 is
        # the last (docs/mini-omni.md §11).
        if step.index == self.max_tokens - self._prompt_length - 1:
            self.finish(StopReason.MAX_TOKENS)

    def _keep(self, selection: Selection) -> Selection:
        self.selections.append(selection)
        return selection


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
