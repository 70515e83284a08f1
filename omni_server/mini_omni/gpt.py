"""The mini-omni GPT with its whisper adapter, and `MiniOmniModel`, which loads both encoders.

The model is described in docs/mini-omni.md §6-§10.

Plain PyTorch in the gpt-fast manner: one readable forward, a KV cache that stores only the grouped K/V
heads and is allocated once per model (two rows per slot, block_size positions), and a head that computes
only the logits the decoder reads (item 0's audio slices, item 1's text slice).

Slots serve several requests at once (docs/mini-omni.md §17): a request's prompt is prefilled into its own
slot's rows, and `decode` runs one position of every busy slot in one forward, shaped so that no row's
numbers depend on who else is being served.
"""

from __future__ import annotations

import threading
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from omni_server.mini_omni.config import AUDIO_LAYERS, STREAMS, GPTConfig
from omni_server.mini_omni.head import HeadSlice
from omni_server.mini_omni.layers import Linear, rows_are_independent
from omni_server.mini_omni.mapped import load_mapped
from omni_server.mini_omni.parts import run_to_end
from omni_server.mini_omni.whisper import WhisperEncoder

ITEMS = 2  # a request's rows: item 0 answers with audio, item 1 with text only (docs/mini-omni.md §7)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = x * rsqrt(mean(x^2) + eps) * w, computed in fp32 (no +1 offset)."""
    x32 = x.float()
    y = x32 * torch.rsqrt((x32 * x32).mean(dim=-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def rope_table(config: GPTConfig, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [block_size, head_size] in fp32, columns [theta_0..theta_{n/2-1}, theta_0..theta_{n/2-1}]."""
    n = config.head_size
    freqs = 1.0 / (config.rope_base ** (torch.arange(0, n, 2, device=device).float() / n))
    angles = torch.outer(torch.arange(config.block_size, device=device).float(), freqs)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE: element d pairs with d + n/2. x: [B, heads, T, n]; cos/sin: [T, n] fp32."""
    half = x.shape[-1] // 2
    x32 = x.float()
    rotated = torch.cat([-x32[..., half:], x32[..., :half]], dim=-1)
    return (x32 * cos + rotated * sin).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class GatedMLP(nn.Module):
    """proj(silu(fc_1 x) * fc_2 x), no biases: blocks' LLaMAMLP and the whisper adapter (docs/mini-omni.md §6, §9)."""

    def __init__(self, n_in: int, n_hidden: int, n_out: int) -> None:
        super().__init__()
        self.fc_1 = Linear(n_in, n_hidden)
        self.fc_2 = Linear(n_in, n_hidden)
        self.proj = Linear(n_hidden, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.silu(self.fc_1(x)) * self.fc_2(x))


@dataclass(frozen=True)
class SlotRows:
    """A busy slot in a decode step: where its two rows are in the step's input, where in the cache, and
    the position they are at."""

    row: int
    cache_row: int
    position: int


@dataclass(frozen=True)
class RowPositions:
    """The static decode's positions, as tensors of fixed shape (what CUDA graphs and torch.compile want):
    `index` [R], each row's position (idle rows: the cache's scratch position `block_size`), and `visible`
    [R, 1, 1, block_size + 1], the cache positions each row attends to."""

    index: torch.Tensor
    visible: torch.Tensor


class Attention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        # Fused QKV in litgpt's layout: per group g, [q heads gQ..gQ+Q-1 | k_g | v_g] (docs/mini-omni.md §9).
        self.attn = Linear(config.n_embd, config.qkv_rows, bias=config.add_qkv_bias)
        self.proj = Linear(config.n_head * config.head_size, config.n_embd, bias=False)
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def allocate_cache(self, batch: int, device: torch.device, dtype: torch.dtype) -> None:
        """K/V of the G groups only, for every position plus a scratch one (position block_size, where the
        static decode writes idle rows). Zeroed once here, never again: a request reads only positions it
        wrote, and the static decode's masked reads meet finite numbers (0 x NaN would be NaN)."""
        c = self.config
        shape = (batch, c.n_query_groups, c.block_size + 1, c.head_size)
        self.k_cache = torch.zeros(shape, device=device, dtype=dtype)
        self.v_cache = torch.zeros(shape, device=device, dtype=dtype)

    def cache(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The K and V caches, once `allocate_cache` has made them."""
        if self.k_cache is None or self.v_cache is None:
            raise RuntimeError("the KV cache is not allocated: GPT.prepare has not run")
        return self.k_cache, self.v_cache

    def _qkv(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B, H, T, n] and k, v [B, G, T, n] of x [B, T, d], RoPE applied."""
        c = self.config
        b, t, _ = x.shape
        groups, per_group, n = c.n_query_groups, c.q_per_kv, c.head_size
        qkv = self.attn(x).view(b, t, groups, per_group + 2, n)
        q = qkv[:, :, :, :per_group].reshape(b, t, c.n_head, n).transpose(1, 2)
        k = qkv[:, :, :, per_group].transpose(1, 2)
        v = qkv[:, :, :, per_group + 1].transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def _attend_one(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """One new position [B, H, 1, n] against its cached keys: each group's query heads fold into the query axis."""
        b, _, _, n = q.shape
        groups = self.config.n_query_groups
        return F.scaled_dot_product_attention(q.view(b, groups, self.config.q_per_kv, n), keys, values)

    def _project(self, out: torch.Tensor, b: int, t: int) -> torch.Tensor:
        c = self.config
        return self.proj(out.reshape(b, c.n_head, t, c.head_size).transpose(1, 2).reshape(b, t, c.n_head * c.head_size))

    def forward(self, x: torch.Tensor, start: int, cos: torch.Tensor, sin: torch.Tensor, row: int = 0) -> torch.Tensor:
        """x: [B, T, d] at positions start..start+T-1, in cache rows row..row+B-1; attends causally to the
        cache and itself."""
        b, t, _ = x.shape
        q, k, v = self._qkv(x, cos, sin)
        end = start + t
        k_cache, v_cache = self.cache()
        rows = slice(row, row + b)
        k_cache[rows, :, start:end] = k
        v_cache[rows, :, start:end] = v
        keys, values = k_cache[rows, :, :end], v_cache[rows, :, :end]
        if t == 1:
            out = self._attend_one(q, keys, values)
        else:
            per_group = self.config.q_per_kv
            keys = keys.repeat_interleave(per_group, dim=1)
            values = values.repeat_interleave(per_group, dim=1)
            causal = torch.ones(t, end, dtype=torch.bool, device=x.device).tril(diagonal=start)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=causal)
        return self._project(out, b, t)

    def decode(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: list[SlotRows] | RowPositions
    ) -> torch.Tensor:
        """x: [R, 1, d], two rows per slot in the step. With `SlotRows`, each busy slot writes and attends to its
        own cache rows exactly as alone, and other rows attend to nothing; with `RowPositions`, all rows at
        once over the whole cache."""
        r = x.shape[0]
        q, k, v = self._qkv(x, cos, sin)
        k_cache, v_cache = self.cache()
        if isinstance(positions, RowPositions):
            rows = torch.arange(r, device=x.device)
            k_cache[rows, :, positions.index] = k[:, :, 0]
            v_cache[rows, :, positions.index] = v[:, :, 0]
            out = F.scaled_dot_product_attention(
                q.view(r, self.config.n_query_groups, self.config.q_per_kv, -1),
                k_cache,
                v_cache,
                attn_mask=positions.visible,
            )
            return self._project(out, r, 1)
        out = torch.zeros_like(q)
        for slot in positions:
            mine, cached = slice(slot.row, slot.row + ITEMS), slice(slot.cache_row, slot.cache_row + ITEMS)
            k_cache[cached, :, slot.position] = k[mine, :, 0]
            v_cache[cached, :, slot.position] = v[mine, :, 0]
            keys, values = k_cache[cached, :, : slot.position + 1], v_cache[cached, :, : slot.position + 1]
            out[mine] = self._attend_one(q[mine], keys, values).view(ITEMS, -1, 1, q.shape[-1])
        return self._project(out, r, 1)


class Block(nn.Module):
    """Pre-norm, non-parallel residuals: x += attn(norm_1 x); x += mlp(norm_2 x)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.norm_1 = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = Attention(config)
        self.norm_2 = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = GatedMLP(config.n_embd, config.intermediate_size, config.n_embd)

    def forward(self, x: torch.Tensor, start: int, cos: torch.Tensor, sin: torch.Tensor, row: int = 0) -> torch.Tensor:
        x = x + self.attn(self.norm_1(x), start, cos, sin, row)
        return x + self.mlp(self.norm_2(x))

    def decode(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: list[SlotRows] | RowPositions
    ) -> torch.Tensor:
        x = x + self.attn.decode(self.norm_1(x), cos, sin, positions)
        return x + self.mlp(self.norm_2(x))


@dataclass(frozen=True)
class Selection:
    """The tokens chosen from one forward: item 0's 7 local audio ids and item 1's global text id."""

    audio: tuple[int, ...]
    text: int


class Transformer(nn.Module):
    """The GPT's `transformer`: token embeddings (`wte`), the blocks (`h`) and the final norm (`ln_f`)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(config.padded_vocab_size, config.n_embd)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = RMSNorm(config.n_embd, config.norm_eps)

    def blocks(self) -> Iterator[Block]:
        """The blocks of `h`, typed: nn.ModuleList is not generic, so its stubs type every item as a Module."""
        return cast(Iterator[Block], iter(self.h))


class GPT(nn.Module):
    """State-dict names follow `lit_model.pth`; `lm_head.weight` is the tied `transformer.wte.weight`."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = Transformer(config)
        self.whisper_adapter = GatedMLP(config.whisper_adapter_dim, config.intermediate_size, config.n_embd)
        self.rope_cos: torch.Tensor | None = None
        self.rope_sin: torch.Tensor | None = None
        self.head_audio: HeadSlice | None = None
        self.head_text: HeadSlice | None = None
        self.slots = 1
        self.static_decode = False
        self.compact_decode = False

    def prepare(self, device: torch.device, dtype: torch.dtype, slots: int = 1) -> None:
        """Once per model, after loading: RoPE table, the KV cache of `slots` requests, fast weight layouts and
        the two head slices. CUDA decodes with fixed-shape tensors only (see `decode`)."""
        self.slots = slots
        self.static_decode = device.type == "cuda"
        self.rope_cos, self.rope_sin = rope_table(self.config, device)
        decode_path = [module for module in self.transformer.h.modules() if isinstance(module, Linear)]
        for linear in decode_path:  # the adapter runs once per request: it keeps its layout
            linear.relayout(rows=ITEMS * slots)
        for block in self.transformer.blocks():
            block.attn.allocate_cache(ITEMS * slots, device, dtype)
        # On this 2-core CPU a oneDNN-packed fp32 GEMM of 8 rows takes 1.27 ms against 0.87 ms for 2: a step
        # over every slot's rows would cost a lone request 50% more, unless the rows may be left out.
        self.compact_decode = not self.static_decode and rows_are_independent(decode_path, ITEMS * slots)
        # The decoder reads only item 0's audio logits and item 1's text logits (docs/mini-omni.md §10).
        wte, text_vocab = self.transformer.wte.weight.data, self.config.text_vocab_size
        self.head_audio = HeadSlice(wte[text_vocab:], groups=AUDIO_LAYERS)
        self.head_text = HeadSlice(wte[:text_vocab], groups=1)

    def embed(self, ids: torch.Tensor, audio_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """ids [B, 8, T] -> [B, T, d]: the mean of the 8 stream embeddings (docs/mini-omni.md §8).

        With `audio_embeddings` [B, T_a, d] (the prefill), positions 1..T_a of the 7 audio streams carry the
        adapter output instead of their token embedding. Summed left to right, then divided by 8.
        """
        e = self.transformer.wte(ids)  # [B, 8, T, d]
        if audio_embeddings is not None:
            e[:, :AUDIO_LAYERS, 1 : 1 + audio_embeddings.shape[1]] = audio_embeddings[:, None]
        x = e[:, 0]
        for stream in range(1, STREAMS):
            x = x + e[:, stream]
        return x / STREAMS

    def rope(self, positions: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor]:
        if self.rope_cos is None or self.rope_sin is None:
            raise RuntimeError("the RoPE table is not computed: GPT.prepare has not run")
        return self.rope_cos[positions], self.rope_sin[positions]

    def forward(
        self, ids: torch.Tensor, start: int, audio_embeddings: torch.Tensor | None = None, slot: int = 0
    ) -> torch.Tensor:
        """Run positions start..start+T-1 of `slot`'s rows through the blocks (filling its cache); final-norm
        hidden at the last."""
        return run_to_end(self.forward_in_parts(ids, start, audio_embeddings, slot))

    def forward_in_parts(
        self, ids: torch.Tensor, start: int, audio_embeddings: torch.Tensor | None = None, slot: int = 0
    ) -> Generator[None, None, torch.Tensor]:
        """`forward`, pausing after each block (a prefill is long: its blocks are the batch's admission parts)."""
        x = self.embed(ids, audio_embeddings)
        cos, sin = self.rope(slice(start, start + x.shape[1]))
        for block in self.transformer.blocks():
            x = block(x, start, cos, sin, row=ITEMS * slot)
            yield
        return self.transformer.ln_f(x[:, -1])

    def prefill(self, ids: torch.Tensor, audio_embeddings: torch.Tensor, slot: int = 0) -> torch.Tensor:
        """Both items' prompts [2, 8, T] at positions 0..T-1 of `slot`; final-norm hidden at the last position."""
        return run_to_end(self.prefill_in_parts(ids, audio_embeddings, slot))

    def prefill_in_parts(
        self, ids: torch.Tensor, audio_embeddings: torch.Tensor, slot: int = 0
    ) -> Generator[None, None, torch.Tensor]:
        """`prefill`, pausing after each block of the shared prefix.

        The two prompts differ only at the last position (docs/mini-omni.md §7, §9), so the shared prefix runs
        once, at batch 1, and its keys and values are copied to item 1: half the prefill's work for the same result.
        """
        if not (torch.equal(ids[0, :, :-1], ids[1, :, :-1]) and torch.equal(audio_embeddings[0], audio_embeddings[1])):
            raise ValueError("prefill wants the batch-2 prompt: items that differ only at the last position")
        shared = ids.shape[-1] - 1
        yield from self.forward_in_parts(ids[:1, :, :shared], 0, audio_embeddings[:1], slot)
        audio_row = ITEMS * slot
        for block in self.transformer.blocks():
            k_cache, v_cache = block.attn.cache()
            k_cache[audio_row + 1, :, :shared] = k_cache[audio_row, :, :shared]
            v_cache[audio_row + 1, :, :shared] = v_cache[audio_row, :, :shared]
        return self(ids[:, :, shared:], shared, slot=slot)

    def decode(self, ids: torch.Tensor, positions: dict[int, int]) -> torch.Tensor:
        """One step of every slot: ids [2 * slots, 8, 1] (idle slots' rows any valid ids); `positions`: busy
        slot -> its position. Final-norm hidden [2 * slots, d]; idle slots' rows mean nothing.

        Three shapes of one step, each batch invariant (docs/mini-omni.md §17):
        - `static_decode` (CUDA): every row, attention for all at once over the whole cache under a mask;
        - `compact_decode` (CPU weights whose GEMM rows come out the same at any row count): the busy
          slots' rows only, attention per slot;
        - otherwise every row (a fixed shape), attention per busy slot."""
        if self.static_decode:
            return self._decode_static(ids, positions)
        busy = sorted(positions)
        if self.compact_decode:
            taken = torch.tensor([ITEMS * slot + item for slot in busy for item in range(ITEMS)])
            slots = [SlotRows(ITEMS * k, ITEMS * slot, positions[slot]) for k, slot in enumerate(busy)]
            hidden = self._decode_rows(ids[taken], slots)
            full = hidden.new_zeros(ids.shape[0], hidden.shape[-1])
            full[taken.to(full.device)] = hidden
            return full
        slots = [SlotRows(ITEMS * slot, ITEMS * slot, positions[slot]) for slot in busy]
        return self._decode_rows(ids, slots)

    def _decode_rows(self, ids: torch.Tensor, slots: list[SlotRows]) -> torch.Tensor:
        index = torch.zeros(ids.shape[0], dtype=torch.long)
        for slot in slots:
            index[slot.row : slot.row + ITEMS] = slot.position
        x = self.embed(ids)
        cos, sin = self.rope(index.to(x.device))
        cos, sin = cos[:, None, None], sin[:, None, None]  # [R, 1, 1, n]: one position per row
        for block in self.transformer.blocks():
            x = block.decode(x, cos, sin, slots)
        return self.transformer.ln_f(x[:, -1])

    def _decode_static(self, ids: torch.Tensor, positions: dict[int, int]) -> torch.Tensor:
        scratch = self.config.block_size
        index = torch.full((ids.shape[0],), scratch, dtype=torch.long)
        for slot, position in positions.items():
            index[ITEMS * slot : ITEMS * slot + ITEMS] = position
        x = self.embed(ids)
        index = index.to(x.device)
        cos, sin = self.rope(index.clamp(max=scratch - 1))
        visible = torch.arange(scratch + 1, device=x.device)[None] <= index[:, None]
        rows = RowPositions(index, visible[:, None, None])
        for block in self.transformer.blocks():
            x = block.decode(x, cos[:, None, None], sin[:, None, None], rows)
        return self.transformer.ln_f(x[:, -1])

    def select(self, hidden: torch.Tensor) -> Selection:
        """Greedy picks from one request's last hidden state [2, d]: what the reference's top-1 sampling always
        returns (docs/mini-omni.md §10)."""
        return self.select_slots(hidden, [0])[0]

    def select_slots(self, hidden: torch.Tensor, slots: Iterable[int]) -> dict[int, Selection]:
        """Greedy picks of `slots` from hidden [2 * N, d] of N slots; the head runs over all N (a fixed shape)."""
        if self.head_audio is None or self.head_text is None:
            raise RuntimeError("the output head is not split: GPT.prepare has not run")
        wanted = list(slots)
        audio = self.head_audio.argmax(hidden[0::ITEMS], wanted)
        text = self.head_text.argmax(hidden[1::ITEMS], wanted)
        return {slot: Selection(tuple(audio[slot]), text[slot][0]) for slot in wanted}


def load_gpt(path: Path, config: GPTConfig, device: str | torch.device, dtype: torch.dtype, slots: int = 1) -> GPT:
    """Load `lit_model.pth` tensor by tensor onto `device`/`dtype`, never holding two full copies.

    The file is memory-mapped; `lm_head.weight` is never read (the tied `transformer.wte.weight` wins, as in
    the reference). When a tensor is converted, its mapped pages are released again.
    """
    checkpoint = load_mapped(path)
    state = checkpoint.content
    with torch.device("meta"):
        model = GPT(config)
    converted: dict[str, torch.Tensor] = {}
    expected = set(model.state_dict()) | {"lm_head.weight"}
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"{path}: state dict does not match the config (missing {missing}, unexpected {unexpected})")
    for key in list(state):
        source = state.pop(key)
        if key == "lm_head.weight":
            continue
        wanted = tuple(model.get_parameter(key).shape)
        if tuple(source.shape) != wanted:
            raise ValueError(f"{path}: {key} has shape {tuple(source.shape)}, the config wants {wanted}")
        converted[key] = source.to(device=device, dtype=dtype, copy=True)
        checkpoint.release(source)
    model.load_state_dict(converted, strict=True, assign=True)
    del converted  # the model holds the only references now, so re-laid-out weights replace, not double
    model.prepare(torch.device(device), dtype, slots)
    return model.eval()


class MiniOmniModel:
    """GPT + whisper encoder + adapter on one device and dtype; the whole model the decoder needs.

    `cache_lock` is held by whoever runs generations on the KV cache (a `batch.Batcher`'s loop), so two
    batchers on one model take turns instead of overwriting each other's slots."""

    def __init__(self, gpt: GPT, encoder: WhisperEncoder, device: torch.device, dtype: torch.dtype) -> None:
        self.gpt = gpt
        self.encoder = encoder
        self.device = device
        self.dtype = dtype
        self.cache_lock = threading.Lock()

    @property
    def config(self) -> GPTConfig:
        return self.gpt.config

    @classmethod
    def load(
        cls,
        gpt_checkpoint: Path,
        config_yaml: Path,
        whisper_checkpoint: Path,
        device: str,
        dtype: torch.dtype,
        slots: int = 1,
    ) -> MiniOmniModel:
        """`slots`: requests decoded at once (the KV cache holds two rows for each)."""
        config = GPTConfig.from_yaml(config_yaml)
        gpt = load_gpt(gpt_checkpoint, config, device, dtype, slots)
        encoder = WhisperEncoder.load(whisper_checkpoint, device, dtype).eval()
        if encoder.dims.n_audio_state != config.whisper_adapter_dim:
            raise ValueError(
                f"whisper width {encoder.dims.n_audio_state} != whisper_adapter_dim {config.whisper_adapter_dim}"
            )
        return cls(gpt, encoder, torch.device(device), dtype)
