"""The server's audio decoding: the reference's ffmpeg path, so the model sees exactly the reference's samples."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from omni_server import audio_decode
from omni_server.audio_decode import UndecodableAudio, decode_audio_file, decode_base64
from tests.speech import silence, wav_bytes


def test_golden_input_decodes_to_the_reference_features(shared_dir: Path) -> None:
    from omni_server.mini_omni.whisper import log_mel

    golden = shared_dir / "mini-omni" / "golden"
    wav = golden / json.loads((golden / "golden_A.json").read_text())["meta"]["wav"]
    audio = decode_audio_file(wav.read_bytes(), max_seconds=30.0)
    assert audio.dtype == np.float32 and len(audio) == 31062  # 1941.375 ms, SPEC's prompt-length case
    expected = np.load(golden / "golden_A.npz")["mel"]
    np.testing.assert_allclose(log_mel(audio).numpy(), expected, atol=1e-5, rtol=0)


def test_any_rate_becomes_16k_mono_scaled_by_1_over_32768() -> None:
    samples = np.full(44_100, 0.25, dtype=np.float32)
    audio = decode_audio_file(wav_bytes(samples, rate=44_100), max_seconds=30.0)
    assert len(audio) == 16_000
    assert np.all(np.abs(audio[100:-100] - round(0.25 * 32767) / 32768) < 1e-3)


def test_decoding_stops_one_second_past_the_limit() -> None:
    audio = decode_audio_file(wav_bytes(silence(5.0)), max_seconds=2.0)
    assert len(audio) == 3 * 16_000


def test_undecodable_and_bad_base64_are_plain_errors() -> None:
    with pytest.raises(UndecodableAudio, match="could not be decoded"):
        decode_audio_file(b"\x00" * 1000, max_seconds=30.0)
    with pytest.raises(UndecodableAudio, match="empty"):
        decode_audio_file(b"", max_seconds=30.0)
    with pytest.raises(UndecodableAudio, match="not valid base64"):
        decode_base64("aGVsbG8=\n")  # strict: no stray characters, unlike the reference
    assert decode_base64("aGVsbG8=") == b"hello"


def test_a_plain_16k_wav_is_read_directly_with_the_samples_ffmpeg_gives(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(7)
    wav = wav_bytes(np.clip(rng.normal(0, 0.3, 20_000), -1, 1).astype(np.float32))
    direct = decode_audio_file(wav, max_seconds=30.0)
    monkeypatch.setattr(audio_decode, "_plain_wav_pcm", lambda data: None)
    assert np.array_equal(direct, decode_audio_file(wav, max_seconds=30.0)), "ffmpeg gives the same samples"
    monkeypatch.undo()
    started = []
    monkeypatch.setattr(audio_decode.subprocess, "run", lambda *a, **k: started.append(a) or None)
    assert len(decode_audio_file(wav, max_seconds=0.1)) == 17_600, "the shortcut keeps the duration cap (+1 s)"
    assert not started, "a plain 16 kHz WAV does not start ffmpeg"
