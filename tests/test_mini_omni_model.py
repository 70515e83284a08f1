"""The mini-omni model core: recipe weights, whisper front end, GPT and the batch-2 decoding.

Golden case A (needs ../shared) checks the recipe's tensors and every token of the reference run; the rest
builds a tiny checkpoint with the same recipe and always runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from omni_server.mini_omni import checkpoint, recipe
from omni_server.mini_omni.batch import generate_steps
from omni_server.mini_omni.config import EOT, PAD_T, WHISPER_TINY, GPTConfig, WhisperDims
from omni_server.mini_omni.generate import (
    Step,
    StopReason,
    audio_embeddings,
    decode_ids,
    max_tokens_error,
    prompt_ids,
    prompt_length,
)
from omni_server.mini_omni.gpt import MiniOmniModel
from omni_server.mini_omni.head import HeadSlice
from omni_server.mini_omni.whisper import feature_length, log_mel
from tests import mini_omni_helpers as helpers
from tests.mini_omni_helpers import GOLDEN, golden_a_model, load_golden, read_wav

SEED_A = 1234


# ------------------------------------------------------------------------------------ golden case A


@pytest.fixture(scope="module")
def case_a(shared_dir: Path) -> tuple[dict, dict, np.ndarray]:
    golden, arrays = load_golden(shared_dir, "golden_A")
    audio = read_wav(shared_dir / GOLDEN / golden["meta"]["wav"])
    assert hashlib.sha256(audio.tobytes()).hexdigest() == golden["input"]["audio_f32_sha256"]
    return golden, arrays, audio


@pytest.fixture(scope="module")
def model_a(shared_dir: Path, case_a) -> MiniOmniModel:
    assert case_a[0]["meta"]["global_seed"] == SEED_A
    return golden_a_model(shared_dir, case_a[0], torch.float32)


def test_recipe_reproduces_golden_a_weights(shared_dir: Path) -> None:
    import json

    expected = json.loads((shared_dir / GOLDEN / "golden_A_weights.json").read_text())
    config = GPTConfig.from_yaml(shared_dir / GOLDEN / "golden_A_model_config.yaml")
    built = {
        "gpt": recipe.gpt_state_dict(config, SEED_A),
        "whisper_encoder": recipe.whisper_state_dict(WHISPER_TINY, SEED_A, encoder_only=True),
        "snac": recipe.snac_state_dict(SEED_A),
    }
    for component, tensors in expected.items():
        assert len(built[component]) == len(tensors), component
        for key, facts in tensors.items():
            tensor = built[component][facts.get("recipe_key", key)]
            assert list(tensor.shape) == facts["shape"], key
            assert recipe.tensor_sha256(tensor) == facts["sha256_f32le"], key


@pytest.mark.slow
def test_golden_a_front_end_and_logits(case_a, model_a: MiniOmniModel) -> None:
    golden, arrays, audio = case_a
    rows = feature_length(len(audio))
    assert rows == golden["input"]["leng"] and prompt_length(audio) == golden["prompt"]["T"]
    mel = log_mel(audio)
    np.testing.assert_allclose(mel.numpy(), arrays["mel"], atol=1e-5, rtol=0)
    with torch.inference_mode():
        encoded = model_a.encoder(mel[None])[0]
        np.testing.assert_allclose(encoded.numpy(), arrays["whisper_encoder_out"], atol=1e-5, rtol=0)
        kept = model_a.encoder(mel[None], keep_rows=rows)[0]  # the last block computes only the kept rows
        np.testing.assert_allclose(kept.numpy(), arrays["whisper_features_used"], atol=1e-5, rtol=0)
        embeddings = audio_embeddings(model_a, audio)
        # The golden adapter output carries the reference's own fp32 rounding: the same adapter in float64 is
        # 2.4e-5 from it (values near 5), and fp32 on an AMD EPYC 2.3e-5, so 1e-5 held only on a CPU that sums
        # in the reference's order. The golden bar (docs/mini-omni.md §15) is the logits' 1e-5 (below), which
        # holds here too.
        np.testing.assert_allclose(embeddings.numpy(), arrays["adapter_out"], atol=3e-5, rtol=0)

        prompt = prompt_ids(rows)
        assert prompt[0].tolist() == golden["prompt"]["item0_streams"]
        assert prompt[1].tolist() == golden["prompt"]["item1_streams"]
        # The full-vocabulary logits of the prefill and decode iterations 1-3, fed the golden tokens.
        gpt = model_a.gpt
        hidden = gpt.prefill(prompt, embeddings)
        for k in range(4):
            if k:
                fed = torch.tensor([golden["steps"][k]["fed_item0"], golden["steps"][k]["fed_item1"]])
                hidden = gpt(fed[:, :, None], len(prompt[0, 0]) + k - 1)
            logits = helpers.full_logits(gpt, hidden)
            np.testing.assert_allclose(logits.numpy(), arrays[f"logits_call{k}"], atol=1e-5, rtol=0)


def test_golden_a_every_token(case_a, model_a: MiniOmniModel) -> None:
    golden, _, audio = case_a
    generation = generate_steps(model_a, audio, golden["meta"]["max_tokens"])
    steps = list(generation)

    reference = golden["steps"]
    appended = [s for s in reference if s["appended"]]
    assert [s.index for s in steps] == [s["step"] for s in appended]
    for step, expected in zip(steps, appended):
        assert list(step.audio) == expected["sampled_audio_item0"], step.index
        assert step.text == expected["text_recorded"], step.index
    # What was fed at each decode iteration, and the raw picks of every forward (the stop step's included).
    for k, expected in enumerate(reference[1:], start=1):
        fed = decode_ids(steps[k - 1])[:, :, 0].tolist()
        assert fed == [expected["fed_item0"], expected["fed_item1"]], k
    assert len(generation.selections) == len(reference)
    for picked, expected in zip(generation.selections, reference):
        assert list(picked.audio) == expected["sampled_audio_item0"]
        assert picked.text == expected["sampled_text_item1_raw"]

    assert generation.stop_reason.value == golden["stop"]["reason"]
    assert len(reference) - 1 == golden["stop"]["at_decode_iteration"]
    lists = [list(layer) for layer in zip(*(s.audio for s in steps))] + [[s.text for s in steps]]
    assert lists == golden["list_output"]
    assert lists[7] == golden["text_token_ids"]


# ------------------------------------------------------------------------------- tiny checkpoint

TINY = GPTConfig(
    name="mini-omni-tiny-self-test",
    n_layer=2,
    n_head=4,
    head_size=8,
    n_embd=32,
    n_query_groups=2,
    intermediate_size=48,
    whisper_adapter_dim=32,
)
TINY_WHISPER = WhisperDims(
    n_audio_state=32,
    n_audio_head=2,
    n_audio_layer=2,
    n_vocab=64,
    n_text_ctx=8,
    n_text_state=16,
    n_text_head=2,
    n_text_layer=1,
)
TINY_SEED = 5
TINY_RECIPE = recipe.GPTRecipe(eot_gain=8.0)  # a boosted eot, so text forcing starts early


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint written in the real file formats (whisper in fp16, as the real small.pt)."""
    directory = tmp_path_factory.mktemp("tiny-checkpoint")
    TINY.write_yaml(directory / checkpoint.CONFIG_FILE)
    recipe.write_gpt(directory / checkpoint.GPT_FILE, TINY, TINY_SEED, TINY_RECIPE)
    recipe.write_whisper(directory / checkpoint.WHISPER_FILE, TINY_WHISPER, TINY_SEED, torch.float16)
    return directory


def dense(tensor: torch.Tensor) -> torch.Tensor:
    """A weight as plain values (decode weights may be packed for oneDNN on the CPU)."""
    return tensor.to_dense() if tensor.is_mkldnn else tensor


def load_tiny(directory: Path, dtype: torch.dtype = torch.float32) -> MiniOmniModel:
    return MiniOmniModel.load(
        directory / checkpoint.GPT_FILE,
        directory / checkpoint.CONFIG_FILE,
        directory / checkpoint.WHISPER_FILE,
        "cpu",
        dtype,
    )


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path) -> MiniOmniModel:
    return load_tiny(tiny_dir)


def test_loaded_weights_are_the_recipe(tiny: MiniOmniModel) -> None:
    state = recipe.gpt_state_dict(TINY, TINY_SEED, TINY_RECIPE)
    loaded = tiny.gpt.state_dict()
    assert set(loaded) == set(state) - {"lm_head.weight"}
    for key, tensor in state.items():
        if key != "lm_head.weight":
            assert torch.equal(dense(loaded[key]), tensor), key
    # whisper is stored in fp16, as the real small.pt; the encoder computes in fp32.
    conv = recipe.whisper_state_dict(TINY_WHISPER, TINY_SEED, encoder_only=True)["encoder.conv1.weight"]
    assert tiny.encoder.conv1.weight.dtype == torch.float32
    assert torch.equal(tiny.encoder.conv1.weight, conv.half().float())


def test_tied_head_uses_wte_like_the_reference(tiny_dir: Path, tmp_path: Path) -> None:
    """If the file's two tied copies differ, `transformer.wte.weight` wins (docs/mini-omni.md §2)."""
    state = torch.load(tiny_dir / checkpoint.GPT_FILE)
    state["lm_head.weight"] = torch.zeros_like(state["lm_head.weight"])
    torch.save(state, tmp_path / checkpoint.GPT_FILE)
    model = MiniOmniModel.load(
        tmp_path / checkpoint.GPT_FILE,
        tiny_dir / checkpoint.CONFIG_FILE,
        tiny_dir / checkpoint.WHISPER_FILE,
        "cpu",
        torch.float32,
    )
    assert torch.equal(model.gpt.transformer.wte.weight, state["transformer.wte.weight"])


def test_pre_zip_checkpoint_files_load_too(tiny_dir: Path, tiny: MiniOmniModel, tmp_path: Path) -> None:
    """Files in torch's legacy format cannot be memory-mapped; they are read whole, to the same weights."""
    legacy = tmp_path / checkpoint.GPT_FILE
    torch.save(torch.load(tiny_dir / checkpoint.GPT_FILE), legacy, _use_new_zipfile_serialization=False)
    model = MiniOmniModel.load(
        legacy, tiny_dir / checkpoint.CONFIG_FILE, tiny_dir / checkpoint.WHISPER_FILE, "cpu", torch.float32
    )
    for key, tensor in tiny.gpt.state_dict().items():
        assert torch.equal(dense(model.gpt.state_dict()[key]), dense(tensor)), key


def test_mismatched_checkpoint_is_refused(tiny_dir: Path, tmp_path: Path) -> None:
    dataclasses.replace(TINY, n_layer=3).write_yaml(tmp_path / checkpoint.CONFIG_FILE)
    with pytest.raises(ValueError, match="transformer.h.2"):
        MiniOmniModel.load(
            tiny_dir / checkpoint.GPT_FILE,
            tmp_path / checkpoint.CONFIG_FILE,
            tiny_dir / checkpoint.WHISPER_FILE,
            "cpu",
            torch.float32,
        )


def test_cached_decoding_equals_full_recompute(tiny: MiniOmniModel, chirp: np.ndarray) -> None:
    """Every decode step's hidden state with the KV cache equals a fresh forward over the whole sequence."""
    steps_to_check = 12
    prompt = prompt_ids(feature_length(len(chirp)))
    t = prompt.shape[-1]
    generation = generate_steps(tiny, chirp, t + 1 + steps_to_check)
    steps = list(generation)
    assert len(steps) == steps_to_check + 1
    gpt = tiny.gpt
    with torch.inference_mode():
        embeddings = audio_embeddings(tiny, chirp)
        cached = [gpt.prefill(prompt, embeddings)]  # shared prefix once, then the last position for both
        for step in steps[:-1]:
            cached.append(gpt(decode_ids(step), t + step.index))
        for k in range(len(steps)):
            sequence = torch.cat([prompt] + [decode_ids(s) for s in steps[:k]], dim=-1)
            recomputed = gpt(sequence, 0, embeddings)
            torch.testing.assert_close(cached[k], recomputed, atol=1e-5, rtol=1e-5)
            picked = gpt.select(recomputed)
            assert (picked.audio, picked.text) == (generation.selections[k].audio, generation.selections[k].text)


def test_max_tokens_counts_the_prompt(tiny: MiniOmniModel, chirp: np.ndarray) -> None:
    t = prompt_length(chirp)
    assert t == feature_length(len(chirp)) + 3
    assert "must be more than" in max_tokens_error(t, t)
    assert max_tokens_error(t, t + 1) is None
    assert max_tokens_error(t, 2049) is None
    assert "2049" in max_tokens_error(t, 2050)
    with pytest.raises(ValueError, match="counts the prompt"):
        generate_steps(tiny, chirp, t)

    only_prefill = generate_steps(tiny, chirp, t + 1)
    assert [s.index for s in only_prefill] == [0]
    assert only_prefill.stop_reason is StopReason.MAX_TOKENS

    some = generate_steps(tiny, chirp, t + 6)
    assert some.stop_reason is None  # not known before the end
    assert [s.index for s in some] == list(range(6))
    assert some.stop_reason is StopReason.MAX_TOKENS


def test_prompt_length_follows_the_audio_length() -> None:
    assert prompt_length(np.zeros(31062, np.float32)) == 101  # output1.wav: 1941.375 ms
    assert prompt_length(np.zeros(16000, np.float32)) == 54  # 1000 ms: 50 + 1 rows, + 3
    assert prompt_length(np.zeros(40 * 16000, np.float32)) == 1503  # cut to 30 s of features


def test_eoa_stop_and_text_forcing(tiny: MiniOmniModel, chirp: np.ndarray) -> None:
    max_tokens = 2049
    generation = generate_steps(tiny, chirp, max_tokens)
    steps = list(generation)
    assert generation.stop_reason is StopReason.EOA
    assert len(steps) < max_tokens - prompt_length(chirp)
    # The eoa step is discarded; no appended step has eoa in layer 6.
    assert generation.selections[-1].audio[6] == 4096
    assert len(generation.selections) == len(steps) + 1
    assert all(s.audio[6] != 4096 for s in steps)
    assert all(0 <= a < 4160 for s in steps for a in s.audio)
    # After the first eot of a decode step, text is forced to pad_t; the raw picks go on.
    texts = [s.text for s in steps]
    first_eot = texts.index(EOT, 1)
    assert all(t == PAD_T for t in texts[first_eot + 1 :])
    raw = [s.text for s in generation.selections[first_eot + 1 : len(steps)]]
    assert any(t != PAD_T for t in raw)


def test_decoding_is_deterministic(tiny_dir: Path, tiny: MiniOmniModel, chirp: np.ndarray) -> None:
    t = prompt_length(chirp)
    first = list(generate_steps(tiny, chirp, t + 30))
    again = list(generate_steps(tiny, chirp, t + 30))
    other_process_like = list(generate_steps(load_tiny(tiny_dir), chirp, t + 30))
    assert first == again == other_process_like
    assert all(isinstance(s, Step) for s in first)


def test_bf16_model_decodes(tiny_dir: Path, chirp: np.ndarray) -> None:
    """bf16 is for speed; its tokens drift from fp32 (random weights have tiny margins), but it must decode."""
    t = prompt_length(chirp)
    half = load_tiny(tiny_dir, torch.bfloat16)
    assert half.gpt.transformer.wte.weight.dtype == torch.bfloat16
    generation = generate_steps(half, chirp, t + 9)
    steps = list(generation)
    assert [s.index for s in steps] == list(range(len(steps)))
    assert len(steps) == 8 or generation.stop_reason is StopReason.EOA
    assert all(0 <= a < 4160 for s in steps for a in s.audio) and all(0 <= s.text < 152000 for s in steps)


@pytest.mark.parametrize("groups", [1, 7])
def test_screened_head_picks_the_fp32_argmax(groups: int) -> None:
    """fp32 mode screens the head with bf16 rows; its picks must equal the full fp32 argmax, near-ties too."""
    generator = torch.Generator().manual_seed(0)
    width, n = 4160, 64
    weight = torch.randn(groups * width, n, generator=generator) * 0.02
    head = HeadSlice(weight, groups)
    if head.packed is None:
        pytest.skip("no oneDNN on this build: the head is plain fp32")
    for trial in range(200):
        hidden = torch.randn(1, n, generator=generator) * (1 + trial % 7)
        if trial % 2:  # plant a runner-up 1e-6 below the best row of each group
            logits = (hidden @ weight.T).view(groups, width)
            best = logits.argmax(dim=1)
            for g in range(groups):
                other = (int(best[g]) + 1 + trial) % width
                row = g * width + other
                weight[row] = weight[g * width + int(best[g])] * (1 - 1e-6)
            head = HeadSlice(weight, groups)
        expected = torch.topk((hidden @ weight.T).view(groups, width), 1).indices.view(-1).tolist()
        assert head.argmax(hidden) == expected
