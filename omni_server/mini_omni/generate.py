"""The batch-2 "AT" decoding of mini-omni v1: prompt, prefill, decode iterations, stop (docs/mini-omni.md §7-§11).

Item 0 of the batch answers with audio, item 1 with text only; each step takes 7 audio ids from item 0 and
one text id from item 1. `generate_steps` yields every step that the reference appends to its 8 output
lists; the SNAC regrouping and PCM are the engine's business.

One generation at a time per model: the model owns a single KV cache (the engine serialises requests).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Iterator
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
from omni_server.mini_omni.gpt import BATCH, MiniOmniModel, Selection
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
    ids = torch.empty(BATCH, STREAMS, t, dtype=torch.long)
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
    ids = torch.empty(BATCH, STREAMS, 1, dtype=torch.long)
    for layer in range(AUDIO_LAYERS):
        ids[0, layer] = step.audio[layer] + audio_offset(layer)
        ids[1, layer] = PAD_A + audio_offset(layer)
    ids[:, AUDIO_LAYERS] = step.text
    return ids


@torch.inference_mode()
def audio_embeddings(model: MiniOmniModel, audio_16k: np.ndarray) -> torch.Tensor:
    """Whisper encoder + adapter: [2, T_a, n_embd], the same features for both items (docs/mini-omni.md §5-§6)."""
    rows = feature_length(len(audio_16k))
    mel = log_mel(audio_16k).to(device=model.device, dtype=model.dtype)
    # fp32 is the exact mode: there the encoder runs whole, as the reference's (identical output on this CPU);
    # otherwise its last block computes only the kept rows (the same values to ~1e-6, 5% less work).
    keep_rows = None if model.dtype == torch.float32 else rows
    features = model.encoder(mel[None], keep_rows=keep_rows)[:, :rows]
    # Both items get the same features: the adapter runs once and its output is shared, not recomputed.
    return model.gpt.whisper_adapter(features).expand(BATCH, -1, -1)


@dataclass
class Generation:
    """Iterate for the appended `Step`s; when exhausted, `stop_reason` says why it ended.

    Also kept for inspection: `selections[k]`, the raw picks of forward k (the discarded eoa step included,
    text before forcing), and the seconds spent in the whisper encoder and the prefill.
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
        error = max_tokens_error(prompt_length(self.audio_16k), self.max_tokens, self.model.config.block_size)
        if error is not None:
            raise ValueError(error)
        self._steps = self._run()

    def __iter__(self) -> Iterator[Step]:
        return self

    def __next__(self) -> Step:
        return next(self._steps)

    def _keep(self, selection: Selection) -> Selection:
        self.selections.append(selection)
        return selection

    @torch.inference_mode()
    def _run(self) -> Iterator[Step]:
        began = time.perf_counter()
        embeddings = self.features if self.features is not None else audio_embeddings(self.model, self.audio_16k)
        _synchronize(self.model.device)
        self.encode_seconds = time.perf_counter() - began

        began = time.perf_counter()
        prompt = prompt_ids(embeddings.shape[1])
        gpt = self.model.gpt
        first = self._keep(gpt.select(gpt.prefill(prompt.to(self.model.device), embeddings)))
        self.prefill_seconds = time.perf_counter() - began
        # No stop and no text-end check at the prefill: an eot here is recorded but forces nothing.
        step = Step(0, first.audio, first.text)
        yield step

        t = prompt.shape[-1]
        text_ended = False
        for k in range(1, self.max_tokens - t):
            picked = self._keep(gpt.select(gpt(decode_ids(step).to(self.model.device), t + k - 1)))
            text = PAD_T if text_ended else picked.text
            if picked.audio[AUDIO_LAYERS - 1] == EOA:
                self.stop_reason = StopReason.EOA
                return
            text_ended = text_ended or text == EOT
            step = Step(k, picked.audio, text)
            yield step
        self.stop_reason = StopReason.MAX_TOKENS


def generate_steps(
    model: MiniOmniModel, audio_16k: np.ndarray, max_tokens: int, features: torch.Tensor | None = None
) -> Generation:
    """Start a generation (raises ValueError if `max_tokens` leaves no room); iterate it for the steps."""
    return Generation(model, audio_16k, max_tokens, features)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
