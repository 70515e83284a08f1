"""The server's audio decoding: the reference's ffmpeg path, so the model sees exactly the reference's samples."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from omni_server import audio_decode
from omni_server.audio_decode import UndecodableAudio, decode_audio_file, decode_base64
from tests.speech import float_wav, silence, wav_bytes


def test_golden_input_decodes_to_the_reference_features(shared_dir: Path) -> None:
    from omni_server.mini_omni.whisper import log_mel

    golden = shared_dir / "mini-omni" / "golden"
    wav = golden / json.loads((golden / "golden_A.json").read_text())["meta"]["wav"]
    audio = decode_audio_file(wav.read_bytes(), max_seconds=30.0)
    assert audio.dtype == np.float32 and len(audio) == 31062  # 1941.375 ms: golden case A (docs/mini-omni.md §5, §15)
    expected = np.load(golden / "golden_A.npz")["mel"]
    np.testing.assert_allclose(log_mel(audio).numpy(), expected, atol=1e-5, rtol=0)


def test_any_rate_becomes_16k_mono_scaled_by_1_over_32768() -> None:
    samples = np.full(44_100, 0.25, dtype=np.float32)
    audio = decode_audio_file(wav_bytes(samples, rate=44_100), max_seconds=30.0)
    assert len(audio) == 16_000
    assert np.all(np.abs(audio[100:-100] - round(0.25 * 32767) / 32768) < 1e-3)


def encoded(wav: bytes, extension: str) -> bytes:
    """`wav` re-encoded by ffmpeg into the container `extension` names."""
    args = {
        "m4a": ["-c:a", "aac", "-movflags", "frag_keyframe+empty_moov"],
        "webm": ["-c:a", "libopus"],
        "ogg": ["-c:a", "libvorbis"],
    }
    return subprocess.run(
        [
            "ffmpeg",
            "-nostdin",
            "-loglevel",
            "error",
            "-f",
            "wav",
            "-i",
            "pipe:0",
            *args.get(extension, []),
            "-f",
            {"m4a": "ipod"}.get(extension, extension),
            "pipe:1",
        ],
        input=wav,
        capture_output=True,
        check=True,
    ).stdout


def test_decoding_stops_one_second_past_the_limit() -> None:
    audio = decode_audio_file(encoded(wav_bytes(silence(5.0)), "flac"), max_seconds=2.0)
    assert len(audio) == 3 * 16_000


def test_a_wav_is_judged_by_its_header_before_anything_is_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audio_decode.subprocess, "run", lambda *a, **k: pytest.fail("ffmpeg was started"))
    with pytest.raises(audio_decode.AudioTooLong, match="longer than 2 seconds"):
        decode_audio_file(wav_bytes(silence(5.0), rate=8_000), max_seconds=2.0)
    one_hertz = wav_bytes(np.zeros(30_000, np.float32), rate=1)  # 60 KB that would resample to 8 minutes
    with pytest.raises(UndecodableAudio, match="sample rate is 1 Hz; rates from 8 to 96 kHz are supported"):
        decode_audio_file(one_hertz, max_seconds=30.0)


@pytest.mark.slow
@pytest.mark.parametrize("extension", ["flac", "mp3", "ogg", "webm", "m4a", "wav"])
def test_the_formats_people_send_are_decoded(extension: str) -> None:
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(48_000) / 48_000)).astype(np.float32)
    audio = decode_audio_file(encoded(wav_bytes(tone, rate=48_000), extension), max_seconds=30.0)
    assert abs(len(audio) - 16_000) < 1_200 and 0.15 < np.abs(audio).max() < 0.35


def test_a_playlist_sent_as_audio_opens_no_other_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An ffconcat script names a file beside the upload; ffmpeg must not read it back as the question."""
    monkeypatch.setattr(audio_decode.tempfile, "tempdir", str(tmp_path))
    (tmp_path / "secret.wav").write_bytes(wav_bytes(np.full(16_000, 0.5, np.float32)))
    script = b"ffconcat version 1.0\nfile 'secret.wav'\n"
    with pytest.raises(UndecodableAudio, match="could not be decoded"):
        decode_audio_file(script, max_seconds=30.0)


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
    assert len(decode_audio_file(wav, max_seconds=30.0)) == 20_000
    assert not started, "a plain 16 kHz WAV does not start ffmpeg"


def test_nan_and_infinite_float_samples_are_cleaned_not_a_thump() -> None:
    samples = np.full(16_000, 0.1, np.float32)
    samples[4_000:8_000] = np.nan
    samples[10_000] = np.inf
    audio = decode_audio_file(float_wav(samples), max_seconds=30.0)
    assert np.abs(audio[4_200:7_800]).max() < 0.01, "NaN is silence"
    assert np.abs(audio[:3_800] - 0.1).max() < 0.01 and np.abs(audio).max() <= 1.0
    clean = decode_audio_file(float_wav(np.full(16_000, 0.1, np.float32)), max_seconds=30.0)
    assert np.abs(clean - 0.1).max() < 0.01, "finite float WAVs are decoded as before"
