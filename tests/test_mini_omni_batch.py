"""Continuous batching in the mini-omni engine: several requests decoded in one forward per step.

What a user hears must not depend on who else is being served (fp32, both decode modes); a newcomer's
question is encoded between the running replies' steps instead of stopping them; a cancelled request frees
its slot at once; one request's failure is its own. All on tiny recipe checkpoints built here.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from omni_server.engine import AudioPiece, ChatRequest, TextPiece
from omni_server.mini_omni import recipe
from omni_server.mini_omni.batch import Batcher, generate_steps, idle_ids
from omni_server.mini_omni.codec import ZeroNoise
from omni_server.mini_omni.engine import MiniOmniEngine, default_max_batch
from omni_server.mini_omni.generate import (
    Generation,
    Phase,
    Step,
    StopReason,
    audio_embeddings,
    decode_ids,
    prompt_ids,
    prompt_length,
)
from omni_server.mini_omni.layers import Linear, rows_are_independent
from tests import mini_omni_helpers as helpers
from tests.mini_omni_helpers import chirp_audio, pcm, write_tiny_checkpoint

one_torch_thread = pytest.fixture(scope="module", autouse=True)(helpers.one_torch_thread)

# Three different questions, so three different replies share the batch.
QUESTIONS = [chirp_audio(1.7), chirp_audio(1.1), 0.7 * chirp_audio(2.4)]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def endless_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint whose replies never end by themselves (end-of-audio gain 0): they run to max_tokens."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("endless"), recipe_gains=recipe.GPTRecipe(eoa6_gain=0.0))


def loaded(directory: Path, mode: str = "default", max_batch: int = 3) -> MiniOmniEngine:
    engine = MiniOmniEngine(directory, device="cpu", mode=mode, max_batch=max_batch)
    engine.load(lambda _: None)
    return engine


def reply(engine: MiniOmniEngine, request: ChatRequest) -> tuple[bytes, str]:
    """The whole reply's PCM and text."""
    audio, text = bytearray(), []
    noise = ZeroNoise() if engine.mode.value == "reference" else None  # the reference's global RNG is shared
    for piece in engine.generate(request, noise=noise):
        if isinstance(piece, AudioPiece):
            audio += piece.pcm
        else:
            assert isinstance(piece, TextPiece)
            text.append(piece.text)
    return bytes(audio), "".join(text)


def replies_at_once(engine: MiniOmniEngine, requests: list[ChatRequest]) -> list[tuple[bytes, str]]:
    """All requests sent at the same moment: while the first one's question is encoded (about 0.4 s here),
    the others queue behind it; each is then admitted while the ones before it decode."""
    results: list[tuple[bytes, str]] = [(b"", "")] * len(requests)
    go = threading.Barrier(len(requests))

    def run(index: int) -> None:
        go.wait()
        results[index] = reply(engine, requests[index])

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return results


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["default", "reference"])
def test_a_reply_is_the_same_alone_and_batched_with_others(tiny_dir: Path, mode: str) -> None:
    engine = loaded(tiny_dir, mode, max_batch=3)
    requests = [ChatRequest(audio=audio, stream_stride=4, stream_text=True) for audio in QUESTIONS]
    alone = [reply(engine, request) for request in requests]
    assert max(engine.steps.counts) == 1, "served one at a time"
    engine.steps.clear()

    together = replies_at_once(engine, requests)

    assert max(engine.steps.counts) == 3, f"the three shared steps: {dict(engine.steps.counts)}"
    assert len({audio for audio, _ in alone}) == 3, "three different replies"
    for (solo_audio, solo_text), (audio, text) in zip(alone, together):
        assert text == solo_text
        assert len(audio) == len(solo_audio) > 0
        assert np.abs(pcm(audio).astype(np.int32) - pcm(solo_audio)).max() <= 1


@pytest.mark.parametrize("compact", [True, False])
def test_a_slots_hidden_state_is_bitwise_the_same_whoever_else_decodes(tiny_dir: Path, compact: bool) -> None:
    """Every GEMM of the step has a shape that does not depend on who is busy (all slots' rows), or gives each
    row the same bits at any row count (the busy rows only, where `rows_are_independent` found so): a GEMM
    of another row count may give other low bits (MKL's fp32 GEMM here: 5e-5 apart between 2 and 8 rows),
    which can flip a greedy pick."""
    engine = loaded(tiny_dir, max_batch=3)
    gpt = engine.model.gpt
    if compact and not gpt.compact_decode:
        pytest.skip("this machine's GEMMs give other bits at other row counts: the step keeps every row")
    gpt.compact_decode = compact
    positions = {}
    ids = idle_ids().repeat(3, 1, 1)
    with torch.inference_mode():
        for slot, audio in enumerate(QUESTIONS):
            embeddings = audio_embeddings(engine.model, audio)
            prompt = prompt_ids(embeddings.shape[1])
            first = gpt.select(gpt.prefill(prompt, embeddings, slot))
            ids[2 * slot : 2 * slot + 2] = decode_ids(Step(0, first.audio, first.text))
            positions[slot] = prompt.shape[-1]
        alone = gpt.decode(ids, {0: positions[0]})
        together = gpt.decode(ids, positions)
        picks_alone = gpt.select_slots(alone, [0])[0]
        picks_together = gpt.select_slots(together, positions)[0]
    assert torch.equal(alone[:2], together[:2])
    assert picks_alone == picks_together
    assert not torch.equal(together[:2], together[2:4]), "the slots hold different requests"


class _RowCountLeaks(Linear):
    """A layer whose rows depend on how many there are, as some GEMM kernels' low bits do."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + 1e-6 * len(x)


class _RowByRow(Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([super(_RowByRow, self).forward(row[None]) for row in x])


def test_row_independence_is_found_or_refused_per_layer() -> None:
    layers = []
    for kind, width in ((_RowByRow, 8), (_RowCountLeaks, 12)):  # tried once per weight shape
        layer = kind(16, width)
        torch.nn.init.normal_(layer.weight)
        layers.append(layer)
    assert rows_are_independent(layers[:1], 6)
    assert not rows_are_independent(layers, 6)


def test_a_newcomer_is_encoded_between_the_running_replys_steps(endless_dir: Path, chirp: np.ndarray) -> None:
    """Its whisper encoding runs in parts between batch steps, for about as long as a step: on the tiny model a
    step (a few ms) is shorter than a whisper block, so the running reply takes a step between each two
    parts (tiny whisper: 4 blocks and the convolutions) instead of waiting for the whole admission."""
    engine = loaded(endless_dir, max_batch=2)
    batcher = Batcher(engine.model)
    running = generate_steps(engine.model, chirp, 2048, batcher=batcher)
    try:
        next(running)
        steps_before = len(running.selections)
        newcomer = generate_steps(engine.model, chirp, prompt_length(chirp) + 4, batcher=batcher)
        assert next(newcomer).index == 0  # prefilled
        blocks = len(engine.model.encoder.blocks)
        assert len(running.selections) - steps_before >= blocks
        assert running.phase is Phase.DECODING
        assert [step.index for step in newcomer] == [1, 2, 3]
        assert newcomer.stop_reason is StopReason.MAX_TOKENS
    finally:
        running.cancel()


def test_a_stopped_reply_frees_its_slot_at_once(endless_dir: Path, chirp: np.ndarray) -> None:
    """One slot, a reply that would run 2048 positions: the client stops it after its first audio, and the
    next request is served at once, not after the abandoned reply's remaining ~1900 steps."""
    engine = loaded(endless_dir, max_batch=1)
    engine.steps.clear()
    abandoned = engine.generate(ChatRequest(audio=chirp, stream_stride=1))
    assert isinstance(next(abandoned), AudioPiece)
    stats = engine.last_reply
    abandoned.close()
    assert stats is not None and stats.stop == "stopped early"

    next_audio, _ = reply(engine, ChatRequest(audio=chirp, max_tokens=prompt_length(chirp) + 12, stream_stride=1))
    assert next_audio
    steps = sum(engine.steps.counts.values())
    assert steps < 100, f"{steps} batch steps: the abandoned reply went on generating after its client went"


def test_a_failed_admission_fails_its_own_request_only(tiny_dir: Path, chirp: np.ndarray) -> None:
    engine = loaded(tiny_dir, max_batch=2)
    batcher = Batcher(engine.model)
    running = generate_steps(engine.model, chirp, prompt_length(chirp) + 30, batcher=batcher)
    next(running)
    wrong_width = torch.zeros(2, 3, engine.model.config.n_embd + 1)
    broken = generate_steps(engine.model, chirp, prompt_length(chirp) + 30, wrong_width, batcher=batcher)
    with pytest.raises(RuntimeError):
        next(broken)
    assert len(list(running)) == 29, "the other reply ran to its end"
    assert running.stop_reason is StopReason.MAX_TOKENS


def test_requests_past_the_slots_wait_in_arrival_order(tiny_dir: Path, chirp: np.ndarray) -> None:
    engine = loaded(tiny_dir, max_batch=1)
    batcher = Batcher(engine.model)
    first, second, third = (
        generate_steps(engine.model, chirp, prompt_length(chirp) + 5, batcher=batcher) for _ in range(3)
    )
    assert len(list(first)) == 5
    assert next(second).index == 0
    assert third.phase is Phase.WAITING, "the third waits for the second's slot"
    assert len(list(second)) == 4 and len(list(third)) == 5


def test_the_default_batch_follows_the_device() -> None:
    assert default_max_batch(torch.device("cpu")) == 4
    assert default_max_batch(torch.device("cuda")) == 8


def test_a_fault_in_the_batch_loop_reaches_every_request(
    tiny_dir: Path, chirp: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No consumer may wait forever for a step the loop will never take: the running and the waiting requests
    both get the error."""
    engine = loaded(tiny_dir, max_batch=1)
    monkeypatch.setattr(Generation, "advance", lambda self, picked: 1 / 0)
    batcher = Batcher(engine.model)
    running, waiting = (generate_steps(engine.model, chirp, prompt_length(chirp) + 9, batcher=batcher) for _ in "ab")
    outcomes: list[str] = []

    def consume() -> None:
        for generation in (running, waiting):
            try:
                list(generation)
            except ZeroDivisionError:
                outcomes.append("error")

    consumer = threading.Thread(target=consume)
    consumer.start()
    consumer.join(30)
    assert outcomes == ["error", "error"]


def test_the_fixed_shape_decode_cuda_uses_picks_as_the_per_slot_one(tiny_dir: Path) -> None:
    """CUDA's decode (all rows' attention at once over the whole cache under a mask: fixed shapes for CUDA
    graphs) against the CPU's (per busy slot over its used length), run here on the CPU: the same picks for
    three requests batched, hidden states within float rounding, and batch invariant itself."""
    engine = loaded(tiny_dir, max_batch=3)
    gpt = engine.model.gpt
    assert not gpt.static_decode, "the CPU decodes per slot"
    requests = [ChatRequest(audio=audio, stream_stride=4, stream_text=True) for audio in QUESTIONS]
    per_slot = replies_at_once(engine, requests)
    gpt.static_decode = True
    try:
        fixed_shape = replies_at_once(engine, requests)
        assert max(engine.steps.counts) == 3
        ids = idle_ids().repeat(3, 1, 1)
        with torch.inference_mode():
            alone = gpt.decode(ids, {1: 50})
            together = gpt.decode(ids, {0: 40, 1: 50, 2: 60})
        assert torch.equal(alone[2:4], together[2:4])
        gpt.static_decode = False
        with torch.inference_mode():
            torch.testing.assert_close(gpt.decode(ids, {1: 50})[2:4], alone[2:4], atol=1e-5, rtol=1e-5)
    finally:
        gpt.static_decode = False
    for (audio, text), (expected_audio, expected_text) in zip(fixed_shape, per_slot):
        assert text == expected_text
        assert np.abs(pcm(audio).astype(np.int32) - pcm(expected_audio)).max() <= 1
