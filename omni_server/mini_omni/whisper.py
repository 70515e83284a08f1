"""Whisper front end (docs/mini-omni.md §5) and audio encoder (§6), loading openai-whisper's `.pt` checkpoints.

Written from the spec so the server does not pull in openai-whisper (and with it numba and triton) for the
encoder alone. The encoder always sees the padded 30 s, as the reference does: attention is global, so the
padding changes every output row, and the tokens depend on it.
"""

from __future__ import annotations

import math
from collections.abc import Generator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from omni_server.mini_omni.config import WhisperDims
from omni_server.mini_omni.layers import Linear
from omni_server.mini_omni.mapped import load_mapped
from omni_server.mini_omni.parts import run_to_end

SAMPLE_RATE = 16_000
N_FFT = 400
HOP = 160
N_MELS = 80
CHUNK_SAMPLES = 30 * SAMPLE_RATE  # 480000
N_FRAMES = CHUNK_SAMPLES // HOP  # 3000
MAX_FEATURES = 1500


def feature_length(num_samples: int) -> int:
    """Encoder rows kept for an input of `num_samples` (docs/mini-omni.md §5): floor(ms / 20) + 1, at most 1500."""
    duration_ms = num_samples / SAMPLE_RATE * 1000
    return min(math.floor(duration_ms / 20) + 1, MAX_FEATURES)


# Slaney's mel scale: linear below 1 kHz, logarithmic above (the constants both directions share).
_HZ_PER_MEL = 200.0 / 3
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _HZ_PER_MEL
_LOG_STEP = math.log(6.4) / 27.0


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    hz = np.asarray(hz, dtype=np.float64)
    mel = hz / _HZ_PER_MEL
    log_region = hz >= _MIN_LOG_HZ
    mel[log_region] = _MIN_LOG_MEL + np.log(hz[log_region] / _MIN_LOG_HZ) / _LOG_STEP
    return mel


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    hz = mel * _HZ_PER_MEL
    log_region = mel >= _MIN_LOG_MEL
    hz[log_region] = _MIN_LOG_HZ * np.exp(_LOG_STEP * (mel[log_region] - _MIN_LOG_MEL))
    return hz


def mel_filterbank(
    sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT, n_mels: int = N_MELS, dtype: type = np.float32
) -> np.ndarray:
    """The [n_mels, n_fft/2+1] Slaney-normalised triangular filterbank (librosa's `mel` defaults). float32 is
    openai-whisper's table; float64 is Hugging Face's WhisperFeatureExtractor's (what Smart Turn was trained on)."""
    fft_freqs = np.linspace(0, sample_rate / 2, 1 + n_fft // 2)
    mel_points = np.linspace(_hz_to_mel(np.array([0.0]))[0], _hz_to_mel(np.array([sample_rate / 2]))[0], n_mels + 2)
    mel_freqs = _mel_to_hz(mel_points)
    widths = np.diff(mel_freqs)
    ramps = mel_freqs[:, None] - fft_freqs[None, :]
    # Stored in `dtype` with the normalisation applied in place: in float32, rounding as librosa's own table does.
    weights: np.ndarray = np.zeros((n_mels, len(fft_freqs)), dtype=dtype)
    for i in range(n_mels):
        lower = -ramps[i] / widths[i]
        upper = ramps[i + 2] / widths[i + 1]
        weights[i] = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_freqs[2 : n_mels + 2] - mel_freqs[:n_mels]))[:, None]
    return weights


_MEL_FILTERS = torch.from_numpy(mel_filterbank())


def log_mel(audio_16k: np.ndarray) -> torch.Tensor:
    """[80, 3000] float32 log-mel of the audio padded (or cut) to 30 s (docs/mini-omni.md §5)."""
    audio = torch.from_numpy(np.ascontiguousarray(audio_16k, dtype=np.float32))[:CHUNK_SAMPLES]
    audio = F.pad(audio, (0, CHUNK_SAMPLES - audio.shape[0]))
    window = torch.hann_window(N_FFT)
    spectrum = torch.stft(audio, N_FFT, HOP, window=window, return_complex=True)
    power = spectrum[..., :-1].abs() ** 2
    mel = _MEL_FILTERS @ power
    log_spec = torch.clamp(mel, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


class _EncoderBlock(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.attn_ln = nn.LayerNorm(width)
        self.query = Linear(width, width, bias=True)
        self.key = Linear(width, width)
        self.value = Linear(width, width, bias=True)
        self.out = Linear(width, width, bias=True)
        self.mlp_ln = nn.LayerNorm(width)
        self.mlp_in = Linear(width, 4 * width, bias=True)
        self.mlp_out = Linear(4 * width, width, bias=True)

    def forward(self, x: torch.Tensor, keep_rows: int | None = None) -> torch.Tensor:
        """x: [B, T, d]. With `keep_rows`, only the first rows are computed past the attention's keys/values."""
        h = self.attn_ln(x)
        rows = x if keep_rows is None else x[:, :keep_rows]
        q = self.query(h if keep_rows is None else h[:, :keep_rows])
        k, v = self.key(h), self.value(h)
        b, t, d = q.shape
        split = lambda z: z.view(b, z.shape[1], self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        if q.device.type == "cpu" and q.dtype == torch.bfloat16:
            # PyTorch's CPU attention kernel is slower in bf16 than in fp32 (measured: 123 vs 102 ms a layer).
            attended = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
        else:
            attended = F.scaled_dot_product_attention(q, k, v)
        x = rows + self.out(attended.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp_out(F.gelu(self.mlp_in(self.mlp_ln(x))))


class WhisperEncoder(nn.Module):
    """openai-whisper's AudioEncoder: two convs with GELU, sinusoidal positions, pre-LN blocks, final LN."""

    positional_embedding: torch.Tensor  # a buffer (registered in __init__)

    def __init__(self, dims: WhisperDims) -> None:
        super().__init__()
        width = dims.n_audio_state
        self.dims = dims
        self.conv1 = nn.Conv1d(dims.n_mels, width, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(width, width, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positional_embedding", torch.empty(dims.n_audio_ctx, width))
        self.blocks = nn.ModuleList(_EncoderBlock(width, dims.n_audio_head) for _ in range(dims.n_audio_layer))
        self.ln_post = nn.LayerNorm(width)

    def forward(self, mel: torch.Tensor, keep_rows: int | None = None) -> torch.Tensor:
        """mel: [B, 80, 3000] -> [B, 1500, d], or only its first `keep_rows` rows (same values)."""
        return run_to_end(self.in_parts(mel, keep_rows))

    def in_parts(self, mel: torch.Tensor, keep_rows: int | None = None) -> Generator[None, None, torch.Tensor]:
        """`forward`, pausing after the convolutions and after each block (a twelfth of whisper-small's 3 s on a
        2-core CPU), so a batch of running replies can take its steps in between; returns the output."""
        x = F.gelu(self.conv1(mel))
        x = F.gelu(self.conv2(x)).transpose(1, 2)
        x = x + self.positional_embedding.to(x.dtype)
        for i, block in enumerate(self.blocks):
            yield
            last = i == len(self.blocks) - 1
            x = block(x, keep_rows if last else None)
        return self.ln_post(x)

    @staticmethod
    def state_dict_key(whisper_key: str) -> str | None:
        """Map an openai-whisper state-dict key to this module's key (None for the decoder)."""
        if not whisper_key.startswith("encoder."):
            return None
        key = whisper_key.removeprefix("encoder.")
        for theirs, ours in (
            (".attn.query.", ".query."),
            (".attn.key.", ".key."),
            (".attn.value.", ".value."),
            (".attn.out.", ".out."),
            (".mlp.0.", ".mlp_in."),
            (".mlp.2.", ".mlp_out."),
        ):
            key = key.replace(theirs, ours)
        return key

    @classmethod
    def from_whisper_state_dict(
        cls, dims: WhisperDims, state: dict[str, torch.Tensor], device: str | torch.device, dtype: torch.dtype
    ) -> WhisperEncoder:
        """Build on `device`/`dtype` from whisper's state dict, converting tensor by tensor (no second copy)."""
        with torch.device("meta"):
            encoder = cls(dims)
        ours = {}
        for key, tensor in state.items():
            mapped = cls.state_dict_key(key)
            if mapped is not None:
                ours[mapped] = tensor.to(device=device, dtype=dtype)
        encoder.load_state_dict(ours, strict=True, assign=True)
        if dtype == torch.bfloat16:  # fp32 keeps the checkpoint's layout: its output matches the reference bit for bit
            for module in encoder.modules():
                if isinstance(module, Linear):
                    module.relayout()
        return encoder

    @classmethod
    def load(cls, path: Path, device: str | torch.device, dtype: torch.dtype) -> WhisperEncoder:
        """Load the encoder from an openai-whisper checkpoint file (`small.pt`: {"dims", "model_state_dict"})."""
        checkpoint = load_mapped(path).content
        dims = WhisperDims(**checkpoint["dims"])
        return cls.from_whisper_state_dict(dims, checkpoint["model_state_dict"], device, dtype)
