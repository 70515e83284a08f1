"""Deterministic test weights, contract `omni-recipe-v1`, and checkpoints written in the real formats.

Random weights of the right shapes let tests, golden comparisons and benchmarks run without the real
download. Every tensor is drawn from its own seed (derived from the global seed, the component and the key),
so any subset can be regenerated and checked against `golden_A_weights.json` tensor by tensor. The recipe's
rules: docs/mini-omni.md §15.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from omni_server.mini_omni.checkpoint import CONFIG_FILE, GPT_FILE, SNAC_DIR, WHISPER_FILE
from omni_server.mini_omni.codec import derive_seed
from omni_server.mini_omni.config import AUDIO_CODES, AUDIO_LAYERS, EOA, EOT, GPTConfig, WhisperDims, audio_offset

SNAC_24KHZ_CONFIG: dict = {
    "sampling_rate": 24000,
    "encoder_dim": 48,
    "encoder_rates": [2, 4, 8, 8],
    "decoder_dim": 1024,
    "decoder_rates": [8, 8, 4, 2],
    "attn_window_size": None,
    "codebook_size": 4096,
    "codebook_dim": 8,
    "vq_strides": [4, 2, 1],
    "noise": True,
    "depthwise": True,
}


@dataclass(frozen=True)
class GPTRecipe:
    """The GPT gains of omni-recipe-v1; the speed run uses `eoa6_gain=0.3` so its 64 steps are never cut short."""

    emb_std: float = 0.02
    lin_gain: float = 2.0
    norm_jitter: float = 0.1
    bias_std: float = 0.02
    audio_special_gain: float = 0.3
    eoa6_gain: float = 1.8
    eot_gain: float = 3.0


RECIPE_V1 = GPTRecipe()


def draw(global_seed: int, component: str, key: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The standard-normal tensor z for one key: seeded by sha256("{seed}:{component}:{key}")."""
    generator = torch.Generator("cpu").manual_seed(derive_seed(f"{global_seed}:{component}:{key}"))
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def _fan_in(shape: tuple[int, ...]) -> int:
    return math.prod(shape[1:])


# ---------------------------------------------------------------------------------------------- GPT


def gpt_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every key of the GPT state dict (docs/mini-omni.md §2) with its shape, `lm_head.weight` included."""
    c = config
    shapes: dict[str, tuple[int, ...]] = {
        "whisper_adapter.fc_1.weight": (c.intermediate_size, c.whisper_adapter_dim),
        "whisper_adapter.fc_2.weight": (c.intermediate_size, c.whisper_adapter_dim),
        "whisper_adapter.proj.weight": (c.n_embd, c.intermediate_size),
        "lm_head.weight": (c.padded_vocab_size, c.n_embd),
        "transformer.wte.weight": (c.padded_vocab_size, c.n_embd),
    }
    for n in range(c.n_layer):
        p = f"transformer.h.{n}."
        shapes[p + "norm_1.weight"] = (c.n_embd,)
        shapes[p + "attn.attn.weight"] = (c.qkv_rows, c.n_embd)
        shapes[p + "attn.attn.bias"] = (c.qkv_rows,)
        shapes[p + "attn.proj.weight"] = (c.n_embd, c.n_head * c.head_size)
        shapes[p + "norm_2.weight"] = (c.n_embd,)
        shapes[p + "mlp.fc_1.weight"] = (c.intermediate_size, c.n_embd)
        shapes[p + "mlp.fc_2.weight"] = (c.intermediate_size, c.n_embd)
        shapes[p + "mlp.proj.weight"] = (c.n_embd, c.intermediate_size)
    shapes["transformer.ln_f.weight"] = (c.n_embd,)
    return shapes


def _gpt_embedding(global_seed: int, shape: tuple[int, ...], recipe: GPTRecipe) -> torch.Tensor:
    z = draw(global_seed, "gpt", "transformer.wte.weight", shape)
    w = z * recipe.emb_std
    for layer in range(AUDIO_LAYERS):
        start = audio_offset(layer) + AUDIO_CODES
        w[start : audio_offset(layer + 1)] *= recipe.audio_special_gain
    eoa6 = audio_offset(AUDIO_LAYERS - 1) + EOA
    w[eoa6] = z[eoa6] * (recipe.emb_std * recipe.eoa6_gain)
    w[EOT] = z[EOT] * (recipe.emb_std * recipe.eot_gain)
    return w


def gpt_tensors(
    config: GPTConfig, global_seed: int, recipe: GPTRecipe = RECIPE_V1
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (key, tensor) one at a time, so a full-size checkpoint never needs two copies in memory.

    `lm_head.weight` is yielded as the very same tensor object as `transformer.wte.weight` (they are tied).
    """
    embedding = None
    for key, shape in gpt_shapes(config).items():
        if key in ("lm_head.weight", "transformer.wte.weight"):
            if embedding is None:
                embedding = _gpt_embedding(global_seed, shape, recipe)
            yield key, embedding
            continue
        z = draw(global_seed, "gpt", key, shape)
        if len(shape) >= 2:
            yield key, z * (recipe.lin_gain / math.sqrt(_fan_in(shape)))
        elif key.endswith(".bias"):
            yield key, z * recipe.bias_std
        else:
            yield key, 1.0 + z * recipe.norm_jitter


def gpt_state_dict(config: GPTConfig, global_seed: int, recipe: GPTRecipe = RECIPE_V1) -> dict[str, torch.Tensor]:
    return dict(gpt_tensors(config, global_seed, recipe))


# ------------------------------------------------------------------------------------------ Whisper


def sinusoids(length: int, channels: int) -> torch.Tensor:
    """Whisper's encoder position table (docs/mini-omni.md §6), in float32."""
    half = channels // 2
    log_timescale_increment = math.log(10000) / (half - 1)
    inv_timescales = torch.exp(-log_timescale_increment * torch.arange(half, dtype=torch.float32))
    scaled_time = torch.arange(length, dtype=torch.float32)[:, None] * inv_timescales[None, :]
    return torch.cat([torch.sin(scaled_time), torch.cos(scaled_time)], dim=1)


def _attention_shapes(prefix: str, n: int) -> dict[str, tuple[int, ...]]:
    return {
        prefix + "query.weight": (n, n),
        prefix + "query.bias": (n,),
        prefix + "key.weight": (n, n),
        prefix + "value.weight": (n, n),
        prefix + "value.bias": (n,),
        prefix + "out.weight": (n, n),
        prefix + "out.bias": (n,),
    }


def _block_shapes(prefix: str, n: int, cross_attention: bool) -> dict[str, tuple[int, ...]]:
    shapes = _attention_shapes(prefix + "attn.", n)
    shapes |= {prefix + "attn_ln.weight": (n,), prefix + "attn_ln.bias": (n,)}
    if cross_attention:
        shapes |= _attention_shapes(prefix + "cross_attn.", n)
        shapes |= {prefix + "cross_attn_ln.weight": (n,), prefix + "cross_attn_ln.bias": (n,)}
    shapes |= {
        prefix + "mlp.0.weight": (4 * n, n),
        prefix + "mlp.0.bias": (4 * n,),
        prefix + "mlp.2.weight": (n, 4 * n),
        prefix + "mlp.2.bias": (n,),
        prefix + "mlp_ln.weight": (n,),
        prefix + "mlp_ln.bias": (n,),
    }
    return shapes


def whisper_shapes(dims: WhisperDims, *, encoder_only: bool = False) -> dict[str, tuple[int, ...]]:
    """Every key of openai-whisper's `Whisper(dims).state_dict()` with its shape (decoder too, unless asked not to)."""
    n = dims.n_audio_state
    shapes: dict[str, tuple[int, ...]] = {
        "encoder.positional_embedding": (dims.n_audio_ctx, n),
        "encoder.conv1.weight": (n, dims.n_mels, 3),
        "encoder.conv1.bias": (n,),
        "encoder.conv2.weight": (n, n, 3),
        "encoder.conv2.bias": (n,),
    }
    for i in range(dims.n_audio_layer):
        shapes |= _block_shapes(f"encoder.blocks.{i}.", n, cross_attention=False)
    shapes |= {"encoder.ln_post.weight": (n,), "encoder.ln_post.bias": (n,)}
    if encoder_only:
        return shapes
    m = dims.n_text_state
    shapes |= {
        "decoder.token_embedding.weight": (dims.n_vocab, m),
        "decoder.positional_embedding": (dims.n_text_ctx, m),
    }
    for i in range(dims.n_text_layer):
        shapes |= _block_shapes(f"decoder.blocks.{i}.", m, cross_attention=True)
    shapes |= {"decoder.ln.weight": (m,), "decoder.ln.bias": (m,)}
    return shapes


def whisper_tensors(
    dims: WhisperDims, global_seed: int, *, encoder_only: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    for key, shape in whisper_shapes(dims, encoder_only=encoder_only).items():
        if key == "encoder.positional_embedding":
            yield key, sinusoids(*shape)
            continue
        z = draw(global_seed, "whisper", key, shape)
        if key == "decoder.token_embedding.weight":
            yield key, z
        elif len(shape) >= 2:
            yield key, z * (1.0 / math.sqrt(_fan_in(shape)))
        elif key.endswith(".bias"):
            yield key, z * 0.02
        else:
            yield key, 1.0 + z * 0.1


def whisper_state_dict(dims: WhisperDims, global_seed: int, *, encoder_only: bool = False) -> dict[str, torch.Tensor]:
    return dict(whisper_tensors(dims, global_seed, encoder_only=encoder_only))


# --------------------------------------------------------------------------------------------- SNAC


def snac_legacy_key(key: str) -> str:
    """The recipe (and pre-parametrization torch) name of a weight-norm tensor."""
    return key.replace(".parametrizations.weight.original0", ".weight_g").replace(
        ".parametrizations.weight.original1", ".weight_v"
    )


def snac_shapes(config: dict = SNAC_24KHZ_CONFIG) -> dict[str, tuple[int, ...]]:
    """SNAC's state-dict keys (legacy weight-norm names) and shapes, taken from the `snac` package's module."""
    from snac import SNAC

    with torch.device("meta"):
        model = SNAC(**config)
    return {snac_legacy_key(k): tuple(v.shape) for k, v in model.state_dict().items()}


def snac_state_dict(global_seed: int, config: dict = SNAC_24KHZ_CONFIG) -> dict[str, torch.Tensor]:
    """SNAC recipe weights under legacy weight-norm names (as in the published `pytorch_model.bin`)."""
    weights = {}
    for key, shape in snac_shapes(config).items():
        z = draw(global_seed, "snac", key, shape)
        if key.endswith("codebook.weight"):
            weights[key] = z
        elif key.endswith("weight_g"):
            weights[key] = 0.7 * (1.0 + z * 0.1)
        elif key.endswith("weight_v"):
            weights[key] = z
        elif key.endswith("alpha"):
            weights[key] = 1.0 + z * 0.1
        elif key.endswith("bias"):
            weights[key] = z * 0.02
        else:
            raise ValueError(f"omni-recipe-v1 has no rule for SNAC key {key!r}")
    return weights


# ------------------------------------------------------------------------------------------- Files


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of the float32 little-endian C-order bytes (the `golden_A_weights.json` convention)."""
    return hashlib.sha256(tensor.detach().to(torch.float32).contiguous().numpy().tobytes()).hexdigest()


def write_gpt(path: Path, config: GPTConfig, global_seed: int, recipe: GPTRecipe = RECIPE_V1) -> None:
    """`lit_model.pth`: one flat {key: float32 tensor} dict; wte and lm_head stored twice, as the real file."""
    weights = {}
    for key, tensor in gpt_tensors(config, global_seed, recipe):
        weights[key] = tensor.clone() if key == "lm_head.weight" else tensor
    torch.save(weights, path)


def write_whisper(path: Path, dims: WhisperDims, global_seed: int, dtype: torch.dtype = torch.float32) -> None:
    """An openai-whisper checkpoint: {"dims": {...}, "model_state_dict": {...}}; the real `small.pt` is fp16."""
    state = {k: v.to(dtype) for k, v in whisper_tensors(dims, global_seed)}
    torch.save({"dims": dims.as_dict(), "model_state_dict": state}, path)


def write_snac(folder: Path, global_seed: int, config: dict = SNAC_24KHZ_CONFIG) -> None:
    """A SNAC folder as on the Hub: `config.json` and `pytorch_model.bin` (legacy weight-norm names)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    torch.save(snac_state_dict(global_seed, config), folder / "pytorch_model.bin")


def write_checkpoint(
    directory: Path,
    config: GPTConfig,
    whisper_dims: WhisperDims,
    global_seed: int,
    *,
    recipe: GPTRecipe = RECIPE_V1,
    whisper_dtype: torch.dtype = torch.float32,
) -> Path:
    """A complete recipe checkpoint directory: GPT, config, whisper `.pt` and SNAC folder (no tokenizer)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config.write_yaml(directory / CONFIG_FILE)
    write_gpt(directory / GPT_FILE, config, global_seed, recipe)
    write_whisper(directory / WHISPER_FILE, whisper_dims, global_seed, whisper_dtype)
    write_snac(directory / SNAC_DIR, global_seed)
    return directory


def main() -> None:
    """`python -m omni_server.mini_omni.recipe DIR [--seed N] [--eoa6-gain G] [--size real|tiny]`."""
    import argparse

    from omni_server.mini_omni.config import WHISPER_SMALL, WHISPER_TINY, real_config

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("directory", type=Path)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--eoa6-gain", type=float, default=GPTRecipe.eoa6_gain)
    parser.add_argument("--config", type=Path, help="model_config.yaml to use (default: the real config)")
    parser.add_argument("--whisper", choices=["small", "tiny"], default="small")
    parser.add_argument("--whisper-fp16", action="store_true", help="store whisper in fp16 like the real small.pt")
    args = parser.parse_args()
    config = GPTConfig.from_yaml(args.config) if args.config else real_config()
    dims = WHISPER_SMALL if args.whisper == "small" else WHISPER_TINY
    write_checkpoint(
        args.directory,
        config,
        dims,
        args.seed,
        recipe=GPTRecipe(eoa6_gain=args.eoa6_gain),
        whisper_dtype=torch.float16 if args.whisper_fp16 else torch.float32,
    )


if __name__ == "__main__":
    main()
