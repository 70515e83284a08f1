"""Model configuration: the checkpoint's flat `model_config.yaml` and whisper's encoder dims (docs/mini-omni.md §3).

Only the fields that change the computation are typed here; the rest of the YAML is kept in `extra` so a
config read from a checkpoint can be written back unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# Vocabulary layout (docs/mini-omni.md §4): text ids 0..151999, then 7 audio layers of 4160 ids each.
TEXT_VOCAB_SIZE = 152_000
AUDIO_VOCAB_SIZE = 4_160
AUDIO_LAYERS = 7
STREAMS = AUDIO_LAYERS + 1  # 7 audio streams and the text stream

# Text specials (global ids).
EOT = 151_936
PAD_T = 151_937
INPUT_T = 151_938
ANSWER_T = 151_939

# Audio specials (local ids within one layer; global = local + audio_offset(layer)).
EOA = 4_096
PAD_A = 4_097
INPUT_A = 4_098
ANSWER_A = 4_099
AUDIO_CODES = 4_096  # local ids 0..4095 are SNAC codes


def audio_offset(layer: int) -> int:
    """Global id of local audio id 0 in `layer` (the reference's "layershift")."""
    return TEXT_VOCAB_SIZE + AUDIO_VOCAB_SIZE * layer


@dataclass(frozen=True)
class GPTConfig:
    """The GPT fields of model_config.yaml that matter for inference (defaults: the real mini-omni config)."""

    name: str = "Qwen2-0.5B"
    block_size: int = 2048
    padded_vocab_size: int = 181_120
    n_layer: int = 24
    n_head: int = 14
    head_size: int = 64
    n_embd: int = 896
    n_query_groups: int = 2
    intermediate_size: int = 4864
    norm_eps: float = 1e-6
    rope_base: float = 1_000_000
    rotary_percentage: float = 1.0
    text_vocab_size: int = TEXT_VOCAB_SIZE
    audio_vocab_size: int = AUDIO_VOCAB_SIZE
    whisper_adapter_dim: int = 768
    add_qkv_bias: bool = True
    # Every other key of the YAML, preserved verbatim (hf_config, padding_multiple, ...).
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        self._check_supported()

    def _check_supported(self) -> None:
        """Reject configs this implementation does not compute (rather than computing something else)."""
        problems = []
        if self.n_head % self.n_query_groups:
            problems.append("n_head must be a multiple of n_query_groups")
        if self.rotary_percentage != 1.0:
            problems.append("only rotary_percentage 1.0 is supported")
        if "gemma" in self.name.lower():
            problems.append("Gemma-style RMSNorm (+1 offset) is not supported")
        if self.padded_vocab_size != self.text_vocab_size + AUDIO_LAYERS * self.audio_vocab_size:
            problems.append("padded_vocab_size must equal text_vocab_size + 7 * audio_vocab_size")
        for key, expected in _FIXED_EXTRA.items():
            if key in self.extra and self.extra[key] != expected:
                problems.append(f"{key}={self.extra[key]!r} is not supported (need {expected!r})")
        if problems:
            raise ValueError("unsupported model config: " + "; ".join(problems))

    @property
    def q_per_kv(self) -> int:
        return self.n_head // self.n_query_groups

    @property
    def qkv_rows(self) -> int:
        return (self.n_head + 2 * self.n_query_groups) * self.head_size

    def to_yaml_dict(self) -> dict[str, Any]:
        typed = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return dict(sorted({**self.extra, **typed}.items()))

    def write_yaml(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.to_yaml_dict(), sort_keys=True))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GPTConfig:
        typed_names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        typed = {k: v for k, v in values.items() if k in typed_names}
        extra = {k: v for k, v in values.items() if k not in typed_names}
        return cls(**typed, extra=extra)

    @classmethod
    def from_yaml(cls, path: Path) -> GPTConfig:
        return cls.from_dict(yaml.safe_load(Path(path).read_text()))


# Keys outside GPTConfig whose other values would change the computation (docs/mini-omni.md §3).
_FIXED_EXTRA: dict[str, Any] = {
    "scale_embeddings": False,
    "parallel_residual": False,
    "bias": False,
    "lm_head_bias": False,
    "norm_class_name": "RMSNorm",
    "mlp_class_name": "LLaMAMLP",
    "rope_condense_ratio": 1,
    "tie_word_embeddings": True,
    "asr_adapter": "llamamlp",
    "post_adapter": False,
    "n_expert": 0,
}

# The full reconstructed real config (docs/mini-omni.md §3), for writing recipe checkpoints of the real size.
REAL_CONFIG_EXTRA: dict[str, Any] = {
    "hf_config": {"name": "Qwen2-0.5B", "org": "Qwen"},
    "scale_embeddings": False,
    "vocab_size": 181_120,
    "padding_multiple": 512,
    "parallel_residual": False,
    "bias": False,
    "lm_head_bias": False,
    "shared_attention_norm": False,
    "norm_class_name": "RMSNorm",
    "mlp_class_name": "LLaMAMLP",
    "gelu_approximate": "none",
    "rope_condense_ratio": 1,
    "n_expert": 0,
    "n_expert_per_token": 0,
    "prompt_vocab_size": None,
    "attn_dropout": 0.0,
    "pos_type": "rope",
    "force_align": False,
    "use_pretrain_phoneme_emb": False,
    "tie_word_embeddings": True,
    "cat_audio_vocab_size": 29_120,
    "post_adapter": False,
    "post_adapter_layers": 6,
    "asr_adapter": "llamamlp",
}


def real_config() -> GPTConfig:
    """The reconstructed full-size mini-omni config (docs/mini-omni.md §3)."""
    return GPTConfig(extra=dict(REAL_CONFIG_EXTRA))


@dataclass(frozen=True)
class WhisperDims:
    """openai-whisper's `ModelDimensions`, as stored under "dims" in its `.pt` checkpoints."""

    n_mels: int = 80
    n_audio_ctx: int = 1500
    n_audio_state: int = 768
    n_audio_head: int = 12
    n_audio_layer: int = 12
    n_vocab: int = 51865
    n_text_ctx: int = 448
    n_text_state: int = 768
    n_text_head: int = 12
    n_text_layer: int = 12

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


WHISPER_SMALL = WhisperDims()
WHISPER_TINY = WhisperDims(
    n_audio_state=384, n_audio_head=6, n_audio_layer=4, n_text_state=384, n_text_head=6, n_text_layer=4
)
