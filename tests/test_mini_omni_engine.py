"""The mini-omni engine end to end: checkpoint files → model → PCM and text pieces, in both decode modes.

Golden case A (needs ../shared): reference mode reproduces every PCM piece of the reference at strides 4
and 5 (SNAC noise zero, and the recorded noise replayed). The rest builds a tiny recipe checkpoint in a
temporary folder and always runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from omni_server.engine import AudioPiece, ChatRequest, RequestRejected, TextPiece
from omni_server.mini_omni import checkpoint
from omni_server.mini_omni.batch import generate_steps
from omni_server.mini_omni.checkpoint import CheckpointError, download_verified, locate
from omni_server.mini_omni.codec import (
    FRAME_SAMPLES,
    GivenNoise,
    SeededNoise,
    ZeroNoise,
    frame_codes,
    pcm_reference,
    pcm_rounded,
)
from omni_server.mini_omni.config import EOT, GPTConfig
from omni_server.mini_omni.engine import MiniOmniEngine, cpu_computes_bf16, pick_dtype, request_seed
from omni_server.mini_omni.generate import prompt_length
from omni_server.mini_omni.text import load_tokenizer
from omni_server.mini_omni.whisper import WhisperEncoder
from tests import mini_omni_helpers as helpers
from tests.mini_omni_helpers import (
    GOLDEN,
    TINY,
    golden_noise,
    load_golden,
    pcm,
    read_wav,
    write_tiny_checkpoint,
)

one_torch_thread = pytest.fixture(scope="module", autouse=True)(helpers.one_torch_thread)


def load_engine(directory: Path, mode: str) -> tuple[MiniOmniEngine, list[str]]:
    engine = MiniOmniEngine(directory, device="cpu", mode=mode)
    progress: list[str] = []
    engine.load(progress.append)
    return engine, progress


def reply(engine: MiniOmniEngine, request: ChatRequest, **kwargs) -> tuple[list[bytes], str]:
    engine.check(request)
    audio, text = [], []
    for piece in engine.generate(request, **kwargs):
        if isinstance(piece, AudioPiece):
            audio.append(piece.pcm)
        else:
            assert isinstance(piece, TextPiece)
            text.append(piece.text)
    return audio, "".join(text)


def model_frames(engine: MiniOmniEngine, request: ChatRequest) -> list[tuple[int, ...]]:
    """The SNAC frames of the request's whole run, from the model's steps alone."""
    return helpers.all_frames(s.audio for s in generate_steps(engine.model, request.audio, request.max_tokens))


# ------------------------------------------------------------------------------------ golden case A


@pytest.fixture(scope="module")
def golden_engine(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> MiniOmniEngine:
    config = GPTConfig.from_yaml(shared_dir / GOLDEN / "golden_A_model_config.yaml")
    engine, _ = load_engine(write_tiny_checkpoint(tmp_path_factory.mktemp("golden-a"), config), "reference")
    return engine


@pytest.fixture(scope="module")
def output1(shared_dir: Path) -> np.ndarray:
    golden, _ = load_golden(shared_dir, "golden_A")
    audio = read_wav(shared_dir / GOLDEN / golden["meta"]["wav"])
    assert hashlib.sha256(audio.tobytes()).hexdigest() == golden["input"]["audio_f32_sha256"]
    return audio


@pytest.mark.slow
@pytest.mark.parametrize(("case", "stride"), [("golden_A", 4), ("golden_A_stride5", 5)])
def test_reference_mode_reproduces_golden_a(shared_dir, golden_engine, output1, case: str, stride: int) -> None:
    golden, arrays = load_golden(shared_dir, case)
    max_tokens = golden["meta"]["max_tokens"]
    request = ChatRequest(audio=output1, stream_stride=stride, max_tokens=max_tokens, stream_text=True)

    frames = model_frames(golden_engine, request)
    assert len(frames) == golden["frames_complete"]
    for chunk in golden["chunks"]:
        first, last = chunk["frames"]
        assert frame_codes(frames[first : last + 1]) == chunk["codes"]

    pieces, text = reply(golden_engine, request, noise=ZeroNoise())
    assert len(pieces) == len(golden["chunks"])
    for i, piece in enumerate(pieces):
        assert np.abs(pcm(piece) - arrays[f"pcm_chunk{i}"]).max() <= 1, f"chunk {i}"
    spoken = [t for t in golden["text_token_ids"] if t < EOT]
    assert text == load_tokenizer(golden_engine.checkpoint_dir / "tokenizer.json").decode(spoken)

    noise, noisy = golden_noise(shared_dir, case, len(pieces))
    pieces, _ = reply(golden_engine, request, noise=GivenNoise(noise))
    assert len(pieces) == len(noisy)
    for i, piece in enumerate(pieces):
        assert np.abs(pcm(piece) - noisy[i]).max() <= 1, f"chunk {i} with the recorded noise"


@pytest.mark.slow
def test_reference_mode_max_tokens_facts_of_http_golden_a(shared_dir, golden_engine, output1) -> None:
    """http_golden_A.json: max_tokens 120 → 18 iterations, 49,152 bytes, the first 3 golden chunks; 101 (= T)
    and 3000 fail in the reference (HTML 500); here they are refused before anything streams."""
    for max_tokens in (101, 3000):
        with pytest.raises(RequestRejected):
            golden_engine.check(ChatRequest(audio=output1, max_tokens=max_tokens))
    _, arrays = load_golden(shared_dir, "golden_A")
    pieces, _ = reply(golden_engine, ChatRequest(audio=output1, max_tokens=120), noise=ZeroNoise())
    assert len(b"".join(pieces)) == 49_152
    for i, piece in enumerate(pieces):
        assert np.abs(pcm(piece) - arrays[f"pcm_chunk{i}"]).max() <= 1


# ------------------------------------------------------------------------------ tiny checkpoint (always)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-engine"), TINY)


@pytest.fixture(scope="module")
def default_engine(tiny_dir: Path) -> MiniOmniEngine:
    engine, progress = load_engine(tiny_dir, "default")
    assert progress == ["loading weights", "warming up", "ready"]
    return engine


@pytest.fixture(scope="module")
def reference_engine(tiny_dir: Path) -> MiniOmniEngine:
    return load_engine(tiny_dir, "reference")[0]


@pytest.fixture(scope="module")
def request_30(chirp: np.ndarray) -> ChatRequest:
    """The prefill and at most 29 decode steps: 30 steps make 23 frames, so stride 4 leaves a 3-frame tail."""
    return ChatRequest(audio=chirp, stream_stride=4, max_tokens=prompt_length(chirp) + 1 + 29, stream_text=True)


@pytest.mark.slow
def test_default_mode_sends_the_whole_reply_without_seams(default_engine, request_30) -> None:
    frames = model_frames(default_engine, request_30)
    assert len(frames) % 4, "the test needs a tail that the reference would drop"
    pieces, text = reply(default_engine, request_30)
    joined = pcm(b"".join(pieces))
    assert len(joined) == len(frames) * FRAME_SAMPLES  # tail frames included
    whole = pcm(pcm_rounded(default_engine.codec.decode(frames, 0, SeededNoise(request_seed(request_30)))))
    assert np.abs(joined - whole).max() <= 1
    assert len(pieces) == len(frames) // 4 + 1  # one per window, on the reference's schedule, and the tail

    steps = list(generate_steps(default_engine.model, request_30.audio, request_30.max_tokens))
    stats = default_engine.last_reply
    assert stats.decode_steps == len(steps) - 1 and stats.audio_samples == len(joined)
    tokenizer = load_tokenizer(default_engine.checkpoint_dir / "tokenizer.json")
    expected = tokenizer.decode([s.text for s in steps if s.text < EOT])
    assert text == expected and len(text) > 20


@pytest.mark.slow
def test_reference_mode_drops_the_tail_and_decodes_windows_alone(reference_engine, request_30) -> None:
    frames = model_frames(reference_engine, request_30)
    pieces, _ = reply(reference_engine, request_30, noise=ZeroNoise())
    assert len(pieces) == len(frames) // 4
    for i, piece in enumerate(pieces):
        alone = reference_engine.codec.decode(frames[4 * i : 4 * i + 4], 4 * i, ZeroNoise())
        assert piece == pcm_reference(alone)


@pytest.mark.slow
def test_default_noise_is_reproducible_per_request(default_engine, request_30, chirp) -> None:
    state = torch.random.get_rng_state()
    first, _ = reply(default_engine, request_30)
    again, _ = reply(default_engine, request_30)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert first == again
    louder = ChatRequest(audio=chirp * 0.5, stream_stride=4, max_tokens=request_30.max_tokens)
    assert request_seed(louder) != request_seed(request_30)


@pytest.mark.slow
def test_check_rejects_requests_that_cannot_give_audio(default_engine, reference_engine, chirp) -> None:
    t = prompt_length(chirp)

    def rejected(engine: MiniOmniEngine, **fields) -> bool:
        try:
            engine.check(ChatRequest(audio=fields.pop("audio", chirp), **fields))
        except RequestRejected:
            return True
        return False

    assert rejected(default_engine, stream_stride=0)
    assert rejected(default_engine, stream_stride=65)
    assert not rejected(default_engine, stream_stride=64, max_tokens=2048)
    assert rejected(default_engine, max_tokens=t)  # max_tokens counts the prompt
    assert rejected(default_engine, max_tokens=2050)  # the context holds 2048 positions
    # Default mode sends the first complete frame (7 decode steps after the prefill); the reference needs a window.
    assert rejected(default_engine, max_tokens=t + 7) and not rejected(default_engine, max_tokens=t + 8)
    assert rejected(reference_engine, max_tokens=t + 10) and not rejected(reference_engine, max_tokens=t + 11)
    assert rejected(default_engine, audio=np.zeros(30 * 16_000 + 1, dtype=np.float32))


@pytest.mark.slow
def test_check_bounds_max_tokens_by_the_loaded_models_context(chirp, tmp_path: Path) -> None:
    """A checkpoint with a shorter context than 2048 is refused before anything streams, not mid-generation."""
    short = dataclasses.replace(TINY, block_size=128)
    engine, _ = load_engine(write_tiny_checkpoint(tmp_path / "short", short), "default")
    engine.check(ChatRequest(audio=chirp, max_tokens=129))
    with pytest.raises(RequestRejected, match="its context is 128"):
        engine.check(ChatRequest(audio=chirp, max_tokens=130))


@pytest.mark.slow
def test_smallest_accepted_max_tokens_gives_audio(default_engine, reference_engine, chirp) -> None:
    t = prompt_length(chirp)
    pieces, _ = reply(default_engine, ChatRequest(audio=chirp, max_tokens=t + 8))
    assert len(b"".join(pieces)) == 2 * FRAME_SAMPLES
    pieces, _ = reply(reference_engine, ChatRequest(audio=chirp, max_tokens=t + 11), noise=ZeroNoise())
    assert len(b"".join(pieces)) == 2 * 4 * FRAME_SAMPLES


@pytest.mark.slow
def test_the_cpu_warm_up_pays_the_first_call_costs_without_the_whisper_encoder(
    tiny_dir: Path, chirp: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The encoder's fixed 30 s input costs the same every call, so the warm-up skips it (bench/warm_up.py);
    it still runs a reply through the prefill, the steps and SNAC."""
    encodes: list[int] = []
    in_parts = WhisperEncoder.in_parts  # what `forward` runs too
    monkeypatch.setattr(WhisperEncoder, "in_parts", lambda self, *a, **k: encodes.append(1) or in_parts(self, *a, **k))
    engine, _ = load_engine(tiny_dir, "default")
    assert encodes == [] and engine.last_reply is not None and engine.last_reply.audio_samples > 0
    reply(engine, ChatRequest(audio=chirp))
    assert encodes == [1], "a user's question is encoded"


def test_missing_checkpoint_files_are_named(tmp_path: Path) -> None:
    (tmp_path / "lit_model.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="model_config.yaml, tokenizer.json"):
        locate(tmp_path, lambda detail: None)


def test_missing_or_empty_checkpoint_dir_is_downloaded_into(tmp_path: Path, tiny_dir: Path, monkeypatch) -> None:
    """The Hub is unreachable here: the download itself is replaced by a copy of the tiny checkpoint."""
    fetched: list[Path | None] = []

    def fake_download(local_dir: Path | None = None, progress=None) -> Path:
        fetched.append(local_dir)
        shutil.copytree(tiny_dir, local_dir)
        return local_dir

    monkeypatch.setattr(checkpoint, "download_mini_omni", fake_download)
    progress: list[str] = []
    files = locate(tmp_path / "checkpoint", progress.append)
    assert fetched == [tmp_path / "checkpoint"] and progress == ["downloading"]
    assert files.gpt == tmp_path / "checkpoint" / "lit_model.pth" and files.gpt.is_file()


def test_local_whisper_and_snac_are_used_without_download(tiny_dir: Path) -> None:
    progress: list[str] = []
    files = locate(tiny_dir, progress.append)
    assert files.whisper == tiny_dir / "small.pt" and files.snac == tiny_dir / "snac_24khz"
    assert progress == []


def test_a_download_reports_its_progress_in_megabytes(tmp_path: Path) -> None:
    payload = b"w" * 3_000_000
    source = tmp_path / "models" / hashlib.sha256(payload).hexdigest() / "small.pt"
    source.parent.mkdir(parents=True)
    source.write_bytes(payload)
    said: list[str] = []
    download_verified(source.as_uri(), tmp_path / "cache" / "small.pt", said.append)
    assert said[0] == "downloading small.pt: 0 of 3 MB" and said[-1] == "downloading small.pt: 3 of 3 MB", said


def test_a_hub_download_reports_the_bytes_its_folder_gains_against_the_files_sizes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Hub is unreachable here: `snapshot_download` is replaced by one that plans two files (one already
    there) and then writes the missing 3 MB slowly, as a download does."""
    import huggingface_hub
    from huggingface_hub.file_download import DryRunFileInfo

    local = tmp_path / "checkpoint"
    local.mkdir()
    (local / "model_config.yaml").write_bytes(b"c" * 2_000_000)  # cached: neither in the total nor the count

    def fake_snapshot_download(repo: str, *, local_dir, allow_patterns, dry_run: bool = False):
        if dry_run:
            return [
                DryRunFileInfo("abc", 2_000_000, "model_config.yaml", str(local / "model_config.yaml"), True, False),
                DryRunFileInfo("abc", 3_000_000, "lit_model.pth", str(local / "lit_model.pth"), False, True),
            ]
        with (local / "lit_model.pth.incomplete").open("wb") as part:
            for _ in range(6):
                part.write(b"w" * 500_000)
                part.flush()
                time.sleep(0.05)
        (local / "lit_model.pth.incomplete").rename(local / "lit_model.pth")
        return str(local_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(checkpoint, "PROGRESS_EVERY_S", 0.02)
    said: list[str] = []
    assert checkpoint.hub_download("gpt-omni/mini-omni", said.append, local_dir=local) == local
    assert said[0] == "downloading mini-omni: 0 of 3 MB" and said[-1] == "downloading mini-omni: 3 of 3 MB", said
    assert len(said) >= 3 and said == sorted(set(said), key=said.index), "it grows, each line said once"


@pytest.mark.slow
def test_a_whisper_mirror_is_used_and_checked_like_the_original(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_dir: Path
) -> None:
    payload = (tiny_dir / "small.pt").read_bytes()
    mirror = tmp_path / "mirror" / hashlib.sha256(payload).hexdigest() / "small.pt"
    mirror.parent.mkdir(parents=True)
    mirror.write_bytes(payload)
    checkpoint_dir = tmp_path / "checkpoint"
    shutil.copytree(tiny_dir, checkpoint_dir, ignore=shutil.ignore_patterns("small.pt"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv(checkpoint.WHISPER_URL_VARIABLE, mirror.as_uri())
    said: list[str] = []
    files = locate(checkpoint_dir, said.append)
    assert files.whisper == tmp_path / "cache" / "whisper" / "small.pt"
    assert files.whisper.read_bytes() == payload and said[-1].startswith("downloading small.pt: ")
    monkeypatch.setenv(checkpoint.WHISPER_URL_VARIABLE, "https://example.invalid/models/small.pt")
    with pytest.raises(CheckpointError, match="OMNI_WHISPER_URL must end in /<sha256 of the file>/small.pt"):
        locate(checkpoint_dir, said.append)


def test_download_keeps_only_a_file_with_the_sha256_of_its_url(tmp_path: Path) -> None:
    payload = b"whisper weights"
    good = tmp_path / "models" / hashlib.sha256(payload).hexdigest() / "small.pt"
    bad = tmp_path / "models" / ("0" * 64) / "small.pt"
    for source in (good, bad):
        source.parent.mkdir(parents=True)
        source.write_bytes(payload)
    cache = tmp_path / "cache"
    assert download_verified(good.as_uri(), cache / "small.pt").read_bytes() == payload
    with pytest.raises(OSError, match="sha256"):
        download_verified(bad.as_uri(), cache / "other.pt")
    assert sorted(p.name for p in cache.iterdir()) == ["small.pt"]


def test_dtype_defaults() -> None:
    assert pick_dtype(None, torch.device("cpu"), native_bf16=False) is torch.float32
    assert pick_dtype(None, torch.device("cpu"), native_bf16=True) is torch.bfloat16
    assert pick_dtype("fp32", torch.device("cpu"), native_bf16=True) is torch.float32, "--dtype float32: exact"
    assert pick_dtype(None, torch.device("cuda")) is torch.bfloat16
    assert cpu_computes_bf16("flags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile") is True
    assert cpu_computes_bf16("flags\t\t: fpu avx avx2 fma") is False
    assert pick_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    with pytest.raises(ValueError):
        pick_dtype("int8", torch.device("cpu"))
