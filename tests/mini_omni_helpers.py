"""Test material for the mini-omni engine: tokenizers built on the spot, golden-file readers, the golden-A model."""

from __future__ import annotations

import json
import math
import wave
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from omni_server.mini_omni import recipe
from omni_server.mini_omni.codec import Frame, FrameAssembler
from omni_server.mini_omni.config import WHISPER_TINY, GPTConfig, WhisperDims
from omni_server.mini_omni.gpt import GPT, MiniOmniModel
from omni_server.mini_omni.whisper import WhisperEncoder

GOLDEN = Path("mini-omni") / "golden"
ENDOFTEXT = 151_643  # Qwen2's <|endoftext|>

# A recipe model small enough to load in a second and generate faster than real time on a CPU.
TINY = GPTConfig(
    name="mini-omni-tiny-test", n_layer=2, n_head=4, head_size=16, n_embd=64, n_query_groups=2,
    intermediate_size=128, whisper_adapter_dim=384,
)  # fmt: skip
TINY_SEED = 1234


def write_tiny_checkpoint(
    directory: Path, config: GPTConfig = TINY, recipe_gains: recipe.GPTRecipe = recipe.RECIPE_V1
) -> Path:
    """A complete checkpoint directory of `config` (recipe weights of TINY_SEED) with a word tokenizer."""
    recipe.write_checkpoint(directory, config, WHISPER_TINY, TINY_SEED, recipe=recipe_gains)
    word_tokenizer(directory / "tokenizer.json")
    return directory


def trained_tokenizer() -> Tokenizer:
    """A small byte-level BPE trained on ASCII, so accented letters and emoji split into several ids."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"]
    )
    tokenizer.train_from_iterator(["the quick brown fox jumps over the lazy dog, hello world"] * 20, trainer)
    return tokenizer


def word_tokenizer(path: Path, vocab_size: int = 151_936) -> Path:
    """A byte-level tokenizer.json where every Qwen2-range id is a word (" w<id>"), and 151643 a special.

    Random recipe models emit text ids anywhere in 0..151999; with this vocabulary each of them decodes to
    something, so the streamed text is not empty."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {char: i for i, char in enumerate(alphabet)}
    for i in range(len(vocab), vocab_size):
        vocab[f"\u0120w{i}"] = i  # \u0120 is the byte-level symbol of a space
    del vocab[f"\u0120w{ENDOFTEXT}"]
    vocab["<|endoftext|>"] = ENDOFTEXT
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    tokenizer.save(str(path))
    return path


def chirp_audio(seconds: float = 1.7, rate: int = 16_000) -> np.ndarray:
    """A warbling tone: synthetic, so a tiny recipe model's tokens are the same on every machine."""
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * math.pi * (200 + 150 * t) * t) * np.sin(2 * math.pi * 3 * t)).astype(np.float32)


def one_torch_thread() -> Iterator[None]:
    """Body of each module's autouse fixture: the CI machine has 2 shared cores, and one intra-op thread is
    several times faster when they are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def all_frames(steps_audio: Iterable[Sequence[int]]) -> list[Frame]:
    """Every complete SNAC frame of a run, given each step's 7 audio ids."""
    frames = FrameAssembler()
    for audio in steps_audio:
        frames.push(audio)
    return frames.frames(0, len(frames))


def read_wav(path: Path) -> np.ndarray:
    """16-bit mono WAV → float32 in [-1, 1) as int16 / 32768 (docs/mini-omni.md §5)."""
    with wave.open(str(path), "rb") as f:
        assert f.getnchannels() == 1 and f.getsampwidth() == 2
        return np.frombuffer(f.readframes(f.getnframes()), dtype="<i2").astype(np.float32) / 32768.0


def load_golden(shared_dir: Path, name: str) -> tuple[dict, dict]:
    """(`<name>.json`, `<name>.npz`) of a golden case."""
    folder = shared_dir / GOLDEN
    with np.load(folder / f"{name}.npz") as npz:
        arrays = {key: npz[key] for key in npz.files}
    return json.loads((folder / f"{name}.json").read_text()), arrays


def golden_a_model(shared_dir: Path, golden: dict, dtype: torch.dtype) -> MiniOmniModel:
    """The model of golden case A on the CPU: its config and whisper dims, recipe weights of its seed."""
    seed = golden["meta"]["global_seed"]
    config = GPTConfig.from_yaml(shared_dir / GOLDEN / "golden_A_model_config.yaml")
    dims = WhisperDims(**golden["meta"]["whisper_dims"])
    encoder = WhisperEncoder.from_whisper_state_dict(
        dims, recipe.whisper_state_dict(dims, seed, encoder_only=True), "cpu", dtype
    )
    return model_from_state_dicts(config, recipe.gpt_state_dict(config, seed), encoder, "cpu", dtype)


def model_from_state_dicts(
    config: GPTConfig, gpt_state: dict[str, torch.Tensor], encoder: WhisperEncoder, device: str, dtype: torch.dtype
) -> MiniOmniModel:
    """The model from in-memory weights (`gpt_state` as in `lit_model.pth`), without writing a checkpoint."""
    with torch.device("meta"):
        gpt = GPT(config)
    weights = {k: v.to(device=device, dtype=dtype) for k, v in gpt_state.items() if k != "lm_head.weight"}
    gpt.load_state_dict(weights, strict=True, assign=True)
    del weights
    gpt.prepare(torch.device(device), dtype)
    return MiniOmniModel(gpt.eval(), encoder.eval(), torch.device(device), dtype)


def full_logits(gpt: GPT, hidden: torch.Tensor) -> torch.Tensor:
    """All 181120 logits for both items, to compare with the reference's (decoding never needs them)."""
    return F.linear(hidden, gpt.transformer.wte.weight)


def golden_noise(shared_dir: Path, name: str, chunks: int) -> tuple[list[list[np.ndarray]], list[np.ndarray]]:
    """The recorded SNAC noise vectors (per chunk, per decoder block) and the PCM made with them."""
    with np.load(shared_dir / GOLDEN / f"{name}_rngnoise.npz") as npz:
        noise = [[npz[f"noise_chunk{i}_block{b}"] for b in range(4)] for i in range(chunks)]
        pcm = [npz[f"pcm_chunk{i}"] for i in range(chunks)]
    return noise, pcm


def golden_steps(golden: dict) -> list[tuple[int, ...]]:
    """The reference's 7 audio output lists, as one 7-tuple per step."""
    lists = golden["list_output"][:7]
    return [tuple(layer[k] for layer in lists) for k in range(len(lists[0]))]


def pcm(piece: bytes) -> np.ndarray:
    return np.frombuffer(piece, dtype="<i2").astype(np.int32)
