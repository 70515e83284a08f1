"""The mini-omni engine behind the server: the model's steps → streamed PCM pieces and text pieces.

Two decode modes share the model's tokens and the reference's piece schedule (a piece whenever `stream_stride`
new frames are complete; docs/mini-omni.md §12-§13):

- `default`: seamless pieces (left context, held-back right edge), the tail sent, rounded and clipped
  samples, SNAC noise seeded from the request's audio, so the same request gives the same reply;
- `reference`: the reference's bytes exactly (independent windows, truncation, dropped tail, the package's
  global-RNG noise).

A frame holding a special audio id (which would crash SNAC in the reference) ends the reply cleanly.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from omni_server.engine import (
    MAX_INPUT_SECONDS,
    AudioPiece,
    ChatRequest,
    ProgressCallback,
    ReplyPiece,
    RequestRejected,
    TextPiece,
)
from omni_server.mini_omni.batch import Batcher, StepLog, generate_steps
from omni_server.mini_omni.checkpoint import locate
from omni_server.mini_omni.codec import (
    AudioStreamer,
    GlobalRngNoise,
    Noise,
    ReferenceStreamer,
    SeamlessStreamer,
    SeededNoise,
    SnacCodec,
    derive_seed,
)
from omni_server.mini_omni.config import AUDIO_LAYERS
from omni_server.mini_omni.generate import DEFAULT_BLOCK_SIZE, Generation, Step, max_tokens_error, prompt_length
from omni_server.mini_omni.gpt import ITEMS, MiniOmniModel
from omni_server.mini_omni.text import TextStreamer, load_tokenizer
from omni_server.mini_omni.whisper import feature_length
from omni_server.protocol import INPUT_SAMPLE_RATE, OUTPUT_SAMPLE_RATE

log = logging.getLogger(__name__)

MAX_STREAM_STRIDE = 64  # frames per piece: 5.5 s of audio; more only delays the first sound
WARM_UP_SECONDS = 1.0


class DecodeMode(str, enum.Enum):
    DEFAULT = "default"
    REFERENCE = "reference"


_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def pick_device(device: str | None) -> torch.device:
    """CUDA when available, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cpu_computes_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU does bf16 arithmetic natively (AVX512-BF16 or AMX): there bf16 runs the model faster
    than real time where fp32 does not (measured on a 2-core machine: 0.83 against 1.34). Linux only: elsewhere
    False, and fp32."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = {
        flag for line in cpuinfo.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()
    }
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def pick_dtype(dtype: str | None, device: torch.device, native_bf16: bool | None = None) -> torch.dtype:
    """bf16 on CUDA and on a CPU that computes it natively (`native_bf16`, detected when None), else fp32 (the
    exact mode); `dtype` overrides."""
    if dtype is None:
        if device.type == "cuda":
            return torch.bfloat16
        native = cpu_computes_bf16() if native_bf16 is None else native_bf16
        return torch.bfloat16 if device.type == "cpu" and native else torch.float32
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype!r}: use fp32 or bf16") from None


# Requests decoded at once when `--max-batch` is not given. A step reads every weight once whatever the batch,
# so more requests cost little until the GEMMs turn compute-bound: on a 2-core AVX2 CPU a 4864x896 fp32 GEMM
# of 2, 4 or 8 rows takes the same 2.2-2.6 ms and 16 rows 3.7 ms, hence 4 requests (8 rows). CUDA: 8 (16
# rows; the KV cache takes 50 MB a request in bf16), a guess not yet measured on a GPU.
MAX_BATCH_BY_DEVICE = {"cpu": 4, "cuda": 8}


def default_max_batch(device: torch.device) -> int:
    return MAX_BATCH_BY_DEVICE.get(device.type, 1)


def first_piece_steps(mode: DecodeMode, stride: int) -> int:
    """Decode iterations after the prefill before audio can come: the first window (reference) or frame."""
    frames = stride if mode is DecodeMode.REFERENCE else 1
    return AUDIO_LAYERS - 1 + frames


def request_seed(request: ChatRequest) -> int:
    """The SNAC noise seed of a request: a function of its audio only, so a repeated turn sounds the same."""
    digest = hashlib.sha256(np.ascontiguousarray(request.audio, dtype=np.float32).tobytes()).hexdigest()
    return derive_seed(f"mini-omni-noise:{digest}")


@dataclass
class ReplyStats:
    """Where one reply's time went: logged after each reply, read by bench/engine.py.

    Model time is the time spent producing steps, SNAC time the time spent producing PCM pieces; the time
    the consumer spends between pieces counts only in `total_s`."""

    started: float = field(default_factory=time.perf_counter)
    encode_s: float = 0.0
    prefill_s: float = 0.0
    decode_steps: int = 0
    decode_s: float = 0.0
    snac_s: float = 0.0
    first_audio_s: float | None = None
    audio_samples: int = 0
    total_s: float = 0.0
    stop: str = ""

    def timed(self, steps: Iterable[Step]) -> Iterator[Step]:
        iterator = iter(steps)
        while True:
            began = time.perf_counter()
            step = next(iterator, None)
            if step is None:
                return
            if step.index > 0:
                self.decode_steps += 1
                self.decode_s += time.perf_counter() - began
            yield step

    def timed_audio(self, pieces: Iterable[bytes]) -> Iterator[bytes]:
        began = time.perf_counter()
        produced = list(pieces)
        self.snac_s += time.perf_counter() - began
        for pcm in produced:
            if self.first_audio_s is None:
                self.first_audio_s = time.perf_counter() - self.started
            self.audio_samples += len(pcm) // 2
            yield pcm

    def finish(self, generation: Generation) -> None:
        self.encode_s = generation.encode_seconds or 0.0
        self.prefill_s = generation.prefill_seconds or 0.0
        self.total_s = time.perf_counter() - self.started
        self.stop = generation.stop_reason.value if generation.stop_reason else "stopped early"

    @property
    def audio_seconds(self) -> float:
        return self.audio_samples / OUTPUT_SAMPLE_RATE

    def summary(self) -> str:
        per_step = 1000 * self.decode_s / max(1, self.decode_steps)
        first = f"{self.first_audio_s:.2f} s" if self.first_audio_s is not None else "none"
        return (
            f"{self.decode_steps} steps ({self.stop}) at {per_step:.0f} ms, whisper {1000 * self.encode_s:.0f} ms, "
            f"prefill {1000 * self.prefill_s:.0f} ms, SNAC {1000 * self.snac_s:.0f} ms; first audio {first}, "
            f"{self.audio_seconds:.2f} s of audio in {self.total_s:.2f} s"
        )


class MiniOmniEngine:
    """mini-omni (clean-room, built from the spec; see docs/mini-omni.md) as an `omni_server.engine.Engine`."""

    name = "mini-omni"

    def __init__(
        self,
        checkpoint_dir: Path | None,
        device: str | None = None,
        dtype: str | None = None,
        mode: str = "default",
        max_batch: int | None = None,
    ) -> None:
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.mode = DecodeMode(mode)
        self.max_batch = max_batch if max_batch is not None else default_max_batch(self.device)
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {self.max_batch}")
        self._model: MiniOmniModel | None = None
        self._batcher: Batcher | None = None
        self._codec: SnacCodec | None = None
        self._tokenizer: Tokenizer | None = None
        self.last_reply: ReplyStats | None = None  # the latest reply's, for benches

    @property
    def model(self) -> MiniOmniModel:
        """The loaded model, for benches and tests that run its steps directly."""
        if self._model is None:
            raise RuntimeError("the mini-omni engine is not loaded")
        return self._model

    @property
    def codec(self) -> SnacCodec:
        """The loaded SNAC codec, for tests that decode frames directly."""
        if self._codec is None:
            raise RuntimeError("the mini-omni engine is not loaded")
        return self._codec

    @property
    def steps(self) -> StepLog:
        """The batch steps run so far, by how many replies each decoded (for tests and benches)."""
        if self._batcher is None:
            raise RuntimeError("the mini-omni engine is not loaded")
        return self._batcher.steps

    def load(self, progress: ProgressCallback) -> None:
        files = locate(self.checkpoint_dir, progress)
        progress("loading weights")
        self._model = MiniOmniModel.load(
            files.gpt, files.config, files.whisper, str(self.device), self.dtype, slots=self.max_batch
        )
        self._batcher = Batcher(self._model)
        self._codec = SnacCodec.load(files.snac, self.device)
        self._tokenizer = load_tokenizer(files.tokenizer)
        progress("warming up")
        self.warm_up()
        progress("ready")

    def warm_up(self) -> None:
        """One short reply (prefill, steps to the first frame, SNAC) to pay the first-call costs before the
        first user; the reference runs a full one. On the CPU it skips the whisper encoder (zero features):
        its fixed 30 s input costs the same every call (3.2 s each of the first three, full-size fp32 on 2
        cores), while the prefill and steps cost 0.5-0.9 s more the first time (bench/warm_up.py)."""
        audio = 0.01 * np.sin(np.arange(int(WARM_UP_SECONDS * INPUT_SAMPLE_RATE)) * 0.05).astype(np.float32)
        stride = 1
        max_tokens = prompt_length(audio) + 1 + first_piece_steps(DecodeMode.REFERENCE, stride)
        features = None
        if self.device.type == "cpu":
            shape = (ITEMS, feature_length(len(audio)), self.model.config.n_embd)
            features = torch.zeros(shape, device=self.device, dtype=self.dtype)
        request = ChatRequest(audio=audio, stream_stride=stride, max_tokens=max_tokens)
        for _ in self.generate(request, features=features):
            pass

    def check(self, request: ChatRequest) -> None:
        stride, max_tokens = request.stream_stride, request.max_tokens
        if not 1 <= stride <= MAX_STREAM_STRIDE:
            raise RequestRejected(f"stream_stride must be between 1 and {MAX_STREAM_STRIDE}, got {stride}")
        if len(request.audio) > MAX_INPUT_SECONDS * INPUT_SAMPLE_RATE:
            raise RequestRejected(f"audio is longer than {MAX_INPUT_SECONDS:g} s")
        prompt = prompt_length(request.audio)
        # The loaded model's context, so a request the generation would refuse is refused before streaming.
        block_size = self._model.config.block_size if self._model is not None else DEFAULT_BLOCK_SIZE
        problem = max_tokens_error(prompt, max_tokens, block_size)
        if problem:
            raise RequestRejected(problem)
        # max_tokens counts the prompt (T positions) and the prefill's output; the rest are decode steps.
        needed = prompt + 1 + first_piece_steps(self.mode, stride)
        if max_tokens < needed:
            raise RequestRejected(
                f"max_tokens {max_tokens} leaves no room for audio: this {prompt}-position prompt needs "
                f"max_tokens >= {needed} at stream_stride {stride}"
            )

    def generate(
        self, request: ChatRequest, *, noise: Noise | None = None, features: torch.Tensor | None = None
    ) -> Iterator[ReplyPiece]:
        """Stream the reply; `noise` overrides the mode's SNAC noise (tests replay recorded noise with it),
        `features` the whisper encoder's output (the warm-up's)."""
        if self._model is None or self._codec is None or self._tokenizer is None:
            raise RuntimeError("the mini-omni engine is not loaded")
        self.check(request)
        stats = ReplyStats()
        self.last_reply = stats
        audio = self._streamer(request, noise)
        text = TextStreamer(self._tokenizer) if request.stream_text else None
        generation = generate_steps(self._model, request.audio, request.max_tokens, features, self._batcher)
        try:
            for step in stats.timed(generation):
                if text is not None and (piece := text.push(step.text)):
                    yield TextPiece(piece)
                for pcm in stats.timed_audio(audio.push(step.audio)):
                    yield AudioPiece(pcm)
                if audio.stopped:
                    log.warning("a special audio id reached a SNAC frame at step %d: the reply ends", step.index)
                    break
            for pcm in stats.timed_audio(audio.finish()):
                yield AudioPiece(pcm)
            if text is not None and (piece := text.flush()):
                yield TextPiece(piece)
        finally:  # also when the consumer closes us (the client stopped): the slot is freed, the log says so
            generation.cancel()
            stats.finish(generation)
            log.info("reply: %s", stats.summary())

    def _streamer(self, request: ChatRequest, noise: Noise | None) -> AudioStreamer:
        if self.mode is DecodeMode.REFERENCE:
            return ReferenceStreamer(self.codec, request.stream_stride, noise or GlobalRngNoise())
        return SeamlessStreamer(self.codec, request.stream_stride, noise or SeededNoise(request_seed(request)))
