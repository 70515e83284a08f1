"""mini-omni's audio side: the 7 delayed token streams → SNAC frames → 24 kHz PCM pieces.

See docs/mini-omni.md §8 (the delay pattern), §12 (frames, schedule) and §13 (the two decode modes).

The model emits one local id per audio layer per step; layer L runs L + 1 steps late, so SNAC frame g takes
layer L's id from step g + 1 + L. Frames are decoded with the `snac` package in windows of `stream_stride`
frames, at the iterations where the reference yields. Two streamers share that schedule:

- `ReferenceStreamer` reproduces the reference: each window decoded on its own, PCM truncated toward zero
  without clipping, the incomplete tail window dropped.
- `SeamlessStreamer` (what users get) decodes each window with enough frames of left context, holds back
  the samples that still depend on frames not generated yet, rounds and clips, and sends the tail: the
  concatenated pieces equal one whole-utterance decode (to float rounding).

SNAC's NoiseBlocks are re-wired so the noise comes from a `Noise` policy: the package's global RNG (the
reference), zero, given vectors (to replay a recorded run), or a per-request seeded field indexed by frame
(so a window re-decoded with context sees the same noise as before).
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Self

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from omni_server.mini_omni.config import AUDIO_CODES, AUDIO_LAYERS

SNAC_HUB_REPO = "hubertsiuzdak/snac_24khz"
FRAME_SAMPLES = 2048  # one SNAC frame: 4 latent steps × hop 512 at 24 kHz (85.33 ms)

# How far a window's edge disturbs its decoded audio: the zero padding of SNAC's decoder convolutions
# changes samples up to 4713 (left edge) and 4723 (right edge) samples away, measured in float64 where any
# dependence shows; it is a property of the architecture, not of the weights. In float32 on the recipe SNAC:
# 2 frames from an edge the error is still 124-136 LSB, at 2.5 frames 0.026 LSB (rounding).
SEAM_CONTEXT_SAMPLES = 5 * FRAME_SAMPLES // 2

Frame = tuple[int, ...]  # the 7 local ids of one SNAC frame, layers 0..6


class FrameAssembler:
    """Collects the per-step audio ids and regroups them into SNAC frames (delay pattern: docs/mini-omni.md §8)."""

    def __init__(self) -> None:
        self._layers: list[list[int]] = [[] for _ in range(AUDIO_LAYERS)]

    def push(self, audio: Sequence[int]) -> None:
        """Append one step's 7 local ids (step 0 is the prefill; its ids never reach a frame)."""
        if len(audio) != AUDIO_LAYERS:
            raise ValueError(f"expected {AUDIO_LAYERS} audio ids per step, got {len(audio)}")
        for layer, token in zip(self._layers, audio):
            layer.append(int(token))

    def __len__(self) -> int:
        """Complete frames: frame g needs layer 6's id from step g + 7."""
        return max(0, len(self._layers[0]) - AUDIO_LAYERS)

    def frame(self, index: int) -> Frame:
        if not 0 <= index < len(self):
            raise IndexError(f"frame {index} is not complete ({len(self)} are)")
        return tuple(self._layers[layer][index + 1 + layer] for layer in range(AUDIO_LAYERS))

    def frames(self, start: int, stop: int) -> list[Frame]:
        return [self.frame(g) for g in range(start, stop)]


def is_codable(frame: Frame) -> bool:
    """False if the frame holds a special id (eoa, pad, ...), which SNAC's codebooks cannot look up."""
    return all(0 <= token < AUDIO_CODES for token in frame)


def frame_codes(frames: Sequence[Frame]) -> list[list[int]]:
    """SNAC's three codebooks for consecutive frames: [L0], [L1, L4], [L2, L3, L5, L6] per frame."""
    coarse = [f[0] for f in frames]
    medium = [token for f in frames for token in (f[1], f[4])]
    fine = [token for f in frames for token in (f[2], f[3], f[5], f[6])]
    return [coarse, medium, fine]


def pcm_reference(audio: np.ndarray) -> bytes:
    """The reference's conversion: ×32768 in float64, truncated toward zero, no clipping (+1.0 wraps)."""
    scaled = np.trunc(audio.astype(np.float64) * 32768.0).astype(np.int64)
    wrapped = (scaled + 32768) % 65536 - 32768
    return wrapped.astype("<i2").tobytes()


def pcm_rounded(audio: np.ndarray) -> bytes:
    """×32768, rounded to nearest and clipped to the int16 range."""
    scaled = np.rint(audio.astype(np.float64) * 32768.0)
    return np.clip(scaled, -32768, 32767).astype("<i2").tobytes()


@dataclass(frozen=True)
class NoiseSpan:
    """The noise one NoiseBlock needs: `length` positions of decoder block `block` (0..3), starting at
    absolute position `start` (counted from the reply's first frame), `per_frame` positions a frame."""

    block: int
    start: int
    length: int
    per_frame: int
    device: torch.device


class Noise(Protocol):
    """Where a SNAC NoiseBlock's noise comes from: a [span.length] tensor, or None for no noise term."""

    def __call__(self, span: NoiseSpan) -> torch.Tensor | None: ...


class ZeroNoise:
    """No noise: deterministic audio (the golden files' mode)."""

    def __call__(self, span: NoiseSpan) -> torch.Tensor | None:
        return None


class GlobalRngNoise:
    """What the package does: fresh `torch.randn` from the global RNG (of the decoder's device) at every
    block of every decode."""

    def __call__(self, span: NoiseSpan) -> torch.Tensor | None:
        return torch.randn(span.length, device=span.device)


class GivenNoise:
    """Replays recorded noise: `vectors[call][block]`, one list of 4 vectors per decode call, in order."""

    def __init__(self, vectors: Sequence[Sequence[np.ndarray]]) -> None:
        self._vectors = list(vectors)
        self._call = -1

    def __call__(self, span: NoiseSpan) -> torch.Tensor | None:
        if span.block == 0:
            self._call += 1
        vector = torch.as_tensor(np.asarray(self._vectors[self._call][span.block], dtype=np.float32))
        if vector.numel() != span.length:
            raise ValueError(f"recorded noise {self._call}/{span.block} has {vector.numel()} values, not {span.length}")
        return vector


class SeededNoise:
    """A reproducible noise field: each (frame, block) slice drawn from its own generator seeded from `seed`.

    The noise at a position depends only on the seed and the position, so a frame decoded again (as context
    of the next window) gets exactly the noise it had before, and a window-by-window decode equals a
    whole-utterance decode. The global RNG is never touched."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __call__(self, span: NoiseSpan) -> torch.Tensor | None:
        first, last = span.start // span.per_frame, (span.start + span.length - 1) // span.per_frame
        field = torch.cat([self._frame(g, span.block, span.per_frame) for g in range(first, last + 1)])
        offset = span.start - first * span.per_frame
        return field[offset : offset + span.length]

    def _frame(self, frame: int, block: int, length: int) -> torch.Tensor:
        generator = torch.Generator("cpu").manual_seed(derive_seed(f"{self.seed}:{frame}:{block}"))
        return torch.randn(length, generator=generator)


def derive_seed(text: str) -> int:
    """A 63-bit seed from a string (stable across processes, unlike `hash`)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little") & (2**63 - 1)


class _PolicyNoiseBlock(nn.Module):
    """Stands in for snac's NoiseBlock (x + n ⊙ W x) with n taken from the codec's current `Noise`."""

    def __init__(self, linear: nn.Module, block: int, codec: SnacCodec) -> None:
        super().__init__()
        self.linear = linear
        self.block = block
        self._codec = [codec]  # a list, so the codec is not registered as a submodule (no cycle)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codec = self._codec[0]
        noise = codec.noise(NoiseSpan(self.block, codec.noise_start, x.shape[-1], codec.noise_per_frame, x.device))
        if noise is None:
            return x
        noise = noise.to(device=x.device, dtype=x.dtype).reshape(1, 1, -1)
        return x + noise * self.linear(x)


@dataclass(frozen=True)
class _Stage:
    """A run of SNAC decoder layers that changes the rate once (a DecoderBlock) or not at all."""

    layers: nn.Sequential
    upsample: int  # output positions per input position
    scale: int  # output samples (24 kHz) per position of this stage's output
    reach: int  # output samples on either side across which this stage's convolutions look (upper bound)


def _decoder_stages(decoder: nn.Sequential, hop: int) -> list[_Stage]:
    """Split `decoder.model` into stages, with each stage's scale and convolution reach.

    The layers before the first upsampling form one stage (its local attention's windows are anchored to
    the input's start, so its input must not be trimmed); after that each layer, down to the residual units
    inside the decoder blocks, is a stage of its own, so every unit runs only where it is still needed."""
    layers = [child for layer in decoder for child in _block_layers(layer)]
    first_upsampling = next(i for i, layer in enumerate(layers) if _upsampling(layer) > 1)
    groups = [layers[:first_upsampling], *([layer] for layer in layers[first_upsampling:])]
    stages, scale = [], hop
    for group in filter(None, groups):
        upsample = math.prod(_upsampling(layer) for layer in group)
        scale //= upsample
        stages.append(_Stage(nn.Sequential(*group), upsample, scale, _reach(group, scale)))
    return stages


def _block_layers(layer: nn.Module) -> list[nn.Module]:
    """A decoder block's own layers in order (snac's DecoderBlock keeps them in `block`), else the layer."""
    block = getattr(layer, "block", None)
    return list(block) if _upsampling(layer) > 1 and isinstance(block, nn.Sequential) else [layer]


def _upsampling(layer: nn.Module) -> int:
    return math.prod(m.stride[0] for m in layer.modules() if isinstance(m, nn.ConvTranspose1d))


def _reach(layers: list[nn.Module], scale: int) -> int:
    reach = 0
    for m in (m for layer in layers for m in layer.modules()):
        if isinstance(m, nn.ConvTranspose1d):  # an output position sees ceil(k / stride) inputs
            reach += math.ceil(m.kernel_size[0] / m.stride[0]) * m.stride[0] * scale
        elif isinstance(m, nn.Conv1d):
            reach += m.dilation[0] * (m.kernel_size[0] - 1) // 2 * scale
    return reach


class _Snake(nn.Module):
    """snac's Snake1d, x + sin²(αx)/(α + 1e-9), in eager mode: the package's TorchScript version re-profiles
    for every new input length, which made each context-window decode (lengths vary) several times slower.
    The same operations on the same values, so the same results, but in place on one new tensor: each fresh
    multi-megabyte tensor costs page faults, which made the out-of-place chain several times slower."""

    def __init__(self, alpha: nn.Parameter) -> None:
        super().__init__()
        self.alpha = alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.mul(self.alpha, x).sin_().pow_(2)
        return y.mul_((self.alpha + 1e-9).reciprocal()).add_(x)


class _SnacQuantizer(Protocol):
    def from_codes(self, codes: list[torch.Tensor]) -> torch.Tensor: ...


class _SnacDecoder(Protocol):
    model: nn.Sequential


class SnacModel(Protocol):
    """What the codec uses of snac's `SNAC` (an nn.Module; the package ships no type information)."""

    encoder: nn.Module | None
    decoder: _SnacDecoder
    quantizer: _SnacQuantizer
    vq_strides: list[int]

    def modules(self) -> Iterator[nn.Module]: ...

    def to(self, device: str | torch.device) -> Self: ...

    def eval(self) -> Self: ...


class SnacCodec:
    """The SNAC 24 kHz decoder (encoder dropped), weight norm folded in, noise from a `Noise` policy.

    `decode` can return just a region of the window: the low-rate first stages run over the whole window
    (they need the context), and each later, costlier stage only over the region plus the reach of the
    stages after it, so context costs little beyond the first stages."""

    def __init__(self, model: SnacModel, device: str | torch.device = "cpu") -> None:
        model.encoder = None  # only decoding is needed: frees the encoder's weights
        for module in model.modules():
            if parametrize.is_parametrized(module, "weight"):
                # W = g·V/‖V‖ computed once instead of on every call; the same values as the package's.
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        self._replace_layers(model)
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self._stages = _decoder_stages(model.decoder.model, FRAME_SAMPLES // model.vq_strides[0])
        self._margins = [sum(s.reach for s in self._stages[i + 1 :]) for i in range(len(self._stages))]
        self.noise: Noise = ZeroNoise()
        self.noise_start = 0
        self.noise_per_frame = 0
        self._decoding = threading.Lock()  # the noise fields above belong to one decode at a time

    @classmethod
    def load(cls, source: str | Path = SNAC_HUB_REPO, device: str | torch.device = "cpu") -> SnacCodec:
        """From a local folder (config.json + pytorch_model.bin) or a Hub repo id."""
        from snac import SNAC

        return cls(SNAC.from_pretrained(str(source)), device)

    def _replace_layers(self, model: SnacModel) -> None:
        """NoiseBlocks take their noise from `self.noise`; Snake1d runs eagerly."""
        from snac.layers import NoiseBlock, Snake1d

        count = 0
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, NoiseBlock):
                    setattr(parent, name, _PolicyNoiseBlock(child.linear, count, self))
                    count += 1
                elif isinstance(child, Snake1d):
                    setattr(parent, name, _Snake(child.alpha))

    def decode(
        self, frames: Sequence[Frame], first_frame: int, noise: Noise, region: tuple[int, int] | None = None
    ) -> np.ndarray:
        """Float audio in [-1, 1] of `frames` (which start at frame `first_frame`): all 2048 samples a frame,
        or only the absolute sample range `region` (samples counted from frame 0)."""
        if not frames:
            return np.zeros(0, dtype=np.float32)
        codes = [torch.tensor([c], dtype=torch.long, device=self.device) for c in frame_codes(frames)]
        with self._decoding, torch.inference_mode():
            self.noise = noise
            try:
                x = self.model.quantizer.from_codes(codes)
                origin = first_frame * FRAME_SAMPLES // self._stages[0].scale  # absolute index of x[..., 0]
                for stage, margin in zip(self._stages, self._margins):
                    origin *= stage.upsample
                    self.noise_start, self.noise_per_frame = origin, FRAME_SAMPLES // stage.scale
                    x = stage.layers(x)
                    if region is not None:
                        lo = max(0, (region[0] - margin) // stage.scale - 1 - origin)
                        hi = min(x.shape[-1], -(-(region[1] + margin) // stage.scale) + 1 - origin)
                        x, origin = x[..., lo:hi], origin + lo
            finally:
                self.noise = ZeroNoise()
        audio = x.reshape(-1).float().cpu().numpy()
        return audio if region is None else audio[region[0] - origin : region[1] - origin]


class AudioStreamer(Protocol):
    """Turns steps' audio ids into PCM pieces on the reference's schedule."""

    stopped: bool  # a special id reached a frame: nothing after it can be decoded

    def push(self, audio: Sequence[int]) -> Iterator[bytes]: ...

    def finish(self) -> Iterator[bytes]: ...


class ReferenceStreamer:
    """The reference exactly: whenever the complete frames reach a multiple of `stride`, the last `stride`
    frames are decoded on their own and sent truncated; leftover tail frames are dropped.

    Where the reference would crash on a special id inside a window (SNAC IndexError), this stops instead:
    the bytes sent are the same as the reference's, and `stopped` tells the caller to end generation."""

    def __init__(self, codec: SnacCodec, stride: int, noise: Noise) -> None:
        self._codec, self._stride, self._noise = codec, stride, noise
        self._frames = FrameAssembler()
        self._sent = 0
        self.stopped = False

    def push(self, audio: Sequence[int]) -> Iterator[bytes]:
        self._frames.push(audio)
        complete = len(self._frames)
        if self.stopped or complete == self._sent or complete % self._stride:
            return
        window = self._frames.frames(complete - self._stride, complete)
        if not all(is_codable(f) for f in window):
            self.stopped = True
            return
        self._sent = complete
        yield pcm_reference(self._codec.decode(window, complete - self._stride, self._noise))

    def finish(self) -> Iterator[bytes]:
        return iter(())


class SeamlessStreamer:
    """Same schedule, fixed defects: each window is decoded with `SEAM_CONTEXT_SAMPLES` of left context,
    and the last `SEAM_CONTEXT_SAMPLES` (which still depend on frames not generated yet) are held back
    until the next window or the end; the tail is sent; samples are rounded and clipped.

    A frame holding a special id ends the audio cleanly: everything before it is sent, `stopped` is set."""

    def __init__(self, codec: SnacCodec, stride: int, noise: Noise) -> None:
        self._codec, self._stride, self._noise = codec, stride, noise
        self._frames = FrameAssembler()
        self._usable = 0  # leading frames without special ids
        self._sent_samples = 0
        self.stopped = False

    def push(self, audio: Sequence[int]) -> Iterator[bytes]:
        self._frames.push(audio)
        complete = len(self._frames)
        if self.stopped or complete == self._usable:
            return
        if not is_codable(self._frames.frame(complete - 1)):
            self.stopped = True
            yield from self._send_until(self._usable * FRAME_SAMPLES)
            return
        self._usable = complete
        if complete % self._stride == 0:
            yield from self._send_until(complete * FRAME_SAMPLES - SEAM_CONTEXT_SAMPLES)

    def finish(self) -> Iterator[bytes]:
        if not self.stopped:
            yield from self._send_until(self._usable * FRAME_SAMPLES)

    def _send_until(self, end: int) -> Iterator[bytes]:
        start = self._sent_samples
        if end <= start:
            return
        first = max(0, (start - SEAM_CONTEXT_SAMPLES) // FRAME_SAMPLES)
        frames = self._frames.frames(first, self._usable)
        self._sent_samples = end
        yield pcm_rounded(self._codec.decode(frames, first, self._noise, region=(start, end)))
