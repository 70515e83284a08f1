"""mini-omni's codec side: delay-pattern frames, SNAC windows, PCM conversion, noise, text pieces.

The golden tests feed the reference's recorded token lists (case A) through our streamers with recipe SNAC
weights; the model itself is covered in test_mini_omni_engine.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omni_server.mini_omni.codec import (
    FRAME_SAMPLES,
    FrameAssembler,
    GivenNoise,
    ReferenceStreamer,
    SeamlessStreamer,
    SeededNoise,
    SnacCodec,
    ZeroNoise,
    frame_codes,
    pcm_reference,
    pcm_rounded,
)
from omni_server.mini_omni.recipe import write_snac
from omni_server.mini_omni.text import TextStreamer
from tests import mini_omni_helpers as helpers
from tests.mini_omni_helpers import all_frames, golden_noise, golden_steps, load_golden, pcm, trained_tokenizer

one_torch_thread = pytest.fixture(scope="module", autouse=True)(helpers.one_torch_thread)


@pytest.fixture(scope="module")
def codec(tmp_path_factory: pytest.TempPathFactory) -> SnacCodec:
    folder = tmp_path_factory.mktemp("snac") / "snac_24khz"
    write_snac(folder, 1234)
    return SnacCodec.load(folder)


def synthetic_steps(count: int, seed: int = 0) -> list[tuple[int, ...]]:
    rng = np.random.default_rng(seed)
    return [tuple(int(a) for a in rng.integers(0, 4096, size=7)) for _ in range(count)]


def stream(streamer, steps) -> list[bytes]:
    pieces = [piece for audio in steps for piece in streamer.push(audio)]
    return pieces + list(streamer.finish())


# ------------------------------------------------------------------------------------------ frames


def test_frames_follow_the_delay_pattern() -> None:
    frames = FrameAssembler()
    for k in range(10):
        frames.push([100 * layer + k for layer in range(7)])  # layer L's id at step k is 100·L + k
    assert len(frames) == 3  # 10 steps → 10 − 7 complete frames
    assert frames.frame(0) == (1, 102, 203, 304, 405, 506, 607)  # layer L from step g + 1 + L
    assert frames.frame(2) == (3, 104, 205, 306, 407, 508, 609)
    with pytest.raises(IndexError):
        frames.frame(3)


def test_codes_are_the_depth_first_tree() -> None:
    frames = [(0, 1, 2, 3, 4, 5, 6), (10, 11, 12, 13, 14, 15, 16)]
    assert frame_codes(frames) == [[0, 10], [1, 4, 11, 14], [2, 3, 5, 6, 12, 13, 15, 16]]


# --------------------------------------------------------------------------------------------- PCM


def test_reference_pcm_truncates_and_wraps_but_default_rounds_and_clips() -> None:
    audio = np.array([1.0, -1.0, 0.99999, -0.00002, 0.00002, 0.5 / 32768 + 1e-9], dtype=np.float32)
    assert pcm(pcm_reference(audio)).tolist() == [-32768, -32768, 32767, 0, 0, 0]
    assert pcm(pcm_rounded(audio)).tolist() == [32767, -32768, 32767, -1, 1, 1]


# -------------------------------------------------------------------------------------- golden (A)


@pytest.mark.slow
@pytest.mark.parametrize(("case", "stride"), [("golden_A", 4), ("golden_A_stride5", 5)])
def test_reference_streamer_reproduces_golden_codes_and_pcm(shared_dir, codec, case: str, stride: int) -> None:
    golden, arrays = load_golden(shared_dir, case)
    steps = golden_steps(golden)
    frames = FrameAssembler()
    for audio in steps:
        frames.push(audio)
    for chunk in golden["chunks"]:
        first, last = chunk["frames"]
        assert frame_codes(frames.frames(first, last + 1)) == chunk["codes"]

    pieces = stream(ReferenceStreamer(codec, stride, ZeroNoise()), steps)
    assert len(pieces) == golden["num_chunks"] == len(golden["chunks"])
    for i, piece in enumerate(pieces):
        assert np.abs(pcm(piece) - arrays[f"pcm_chunk{i}"]).max() <= 1, f"chunk {i}"

    noise, noisy_pcm = golden_noise(shared_dir, case, len(pieces))
    replayed = stream(ReferenceStreamer(codec, stride, GivenNoise(noise)), steps)
    for i, piece in enumerate(replayed):
        assert np.abs(pcm(piece) - noisy_pcm[i]).max() <= 1, f"chunk {i} with recorded noise"


@pytest.mark.slow
def test_seamless_pieces_equal_one_whole_decode(codec) -> None:
    steps = synthetic_steps(7 + 10)  # 10 frames: two windows of 4 and a 2-frame tail
    noise = SeededNoise(42)
    whole = pcm(pcm_rounded(codec.decode(all_frames(steps), 0, noise)))
    seamless = pcm(b"".join(stream(SeamlessStreamer(codec, 4, noise), steps)))
    assert len(seamless) == len(whole) == 10 * FRAME_SAMPLES  # the tail is sent
    assert np.abs(seamless - whole).max() <= 1
    # The reference's independent windows (same noise field) do not: each edge sees zero padding.
    reference = pcm(b"".join(stream(ReferenceStreamer(codec, 4, noise), steps)))
    assert len(reference) == 8 * FRAME_SAMPLES  # the tail is dropped
    assert np.abs(reference - whole[: len(reference)]).max() > 1000


def test_seamless_first_piece_comes_at_the_reference_iteration(codec) -> None:
    steps = synthetic_steps(7 + 8)
    seamless = SeamlessStreamer(codec, 4, ZeroNoise())
    reference = ReferenceStreamer(codec, 4, ZeroNoise())
    first = {}
    for k, audio in enumerate(steps):
        for name, streamer in (("seamless", seamless), ("reference", reference)):
            if list(streamer.push(audio)) and name not in first:
                first[name] = k
    assert first == {"seamless": 10, "reference": 10}  # iteration 6 + stride (docs/mini-omni.md §12)


def test_special_id_ends_the_audio_cleanly(codec) -> None:
    steps = synthetic_steps(7 + 16)
    steps[13] = (4096, *steps[13][1:])  # eoa in layer 0 at step 13 lands in frame 12 (layer L: step g + 1 + L)
    seamless = SeamlessStreamer(codec, 4, ZeroNoise())
    pieces = stream(seamless, steps)
    assert seamless.stopped
    assert len(b"".join(pieces)) == 2 * FRAME_SAMPLES * 12  # frames 0..11, the tail included

    reference = ReferenceStreamer(codec, 4, ZeroNoise())
    pieces = stream(reference, steps)
    assert reference.stopped  # the window of frames 12..15 would crash SNAC: it is not decoded
    assert len(pieces) == 3


# ------------------------------------------------------------------------------------------ noise


def test_seeded_noise_is_reproducible_and_leaves_the_global_rng_alone(codec) -> None:
    steps = synthetic_steps(7 + 5)
    state = torch.random.get_rng_state()
    first = b"".join(stream(SeamlessStreamer(codec, 4, SeededNoise(7)), steps))
    again = b"".join(stream(SeamlessStreamer(codec, 4, SeededNoise(7)), steps))
    other = b"".join(stream(SeamlessStreamer(codec, 4, SeededNoise(8)), steps))
    silent = b"".join(stream(SeamlessStreamer(codec, 4, ZeroNoise()), steps))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert first == again
    assert first != other and first != silent


# ------------------------------------------------------------------------------------------- text


def test_text_pieces_never_split_a_character() -> None:
    tokenizer = trained_tokenizer()
    sentence = "héllo wörld 🎉 世界, the fox"
    ids = tokenizer.encode(sentence).ids
    assert len(ids) > len(sentence.split())  # multi-byte characters really are split over ids
    streamer = TextStreamer(tokenizer)
    pieces = [streamer.push(i) for i in [0, *ids, 151936, 151937, 151937]]  # 0 is <|endoftext|>
    pieces.append(streamer.flush())
    assert "".join(pieces) == sentence
    assert not any("\ufffd" in piece for piece in pieces)
    assert sum(1 for piece in pieces if piece) > 5  # streamed, not released at the end
