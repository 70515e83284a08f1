"""The per-tab conversation state machine (state.py) and the history files, driven by real speech through the
real pause detector; no Gradio, no server."""

from __future__ import annotations

import numpy as np
import pytest

from audio_files import TurnFiles, encode_mp3, wav_bytes
from history import TurnFigures, assistant_turn
from state import Conversation, MicAction, Phase
from tests.speech import espeak_available, join, silence, speak
from vad import VadOptions

pytestmark = pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed")


@pytest.fixture(scope="module")
def turn_audio() -> np.ndarray:
    return join(silence(0.4), speak("Hello there, how are you?"), silence(1.5))


def heard_turn(conversation: Conversation, audio: np.ndarray):
    for start in range(0, len(audio), 8000):
        heard = conversation.hear(16_000, audio[start : start + 8000], now=100.0 + start / 16_000)
        if heard is not None:
            return heard
    raise AssertionError("no turn")


def test_a_turn_goes_round_the_phases(turn_audio: np.ndarray) -> None:
    conversation = Conversation()
    assert conversation.phase is Phase.IDLE
    assert conversation.hear(16_000, turn_audio[:8000]) is None, "nothing is heard before Record"
    assert conversation.listen(VadOptions())
    heard = heard_turn(conversation, turn_audio)
    assert conversation.phase is Phase.THINKING and heard.number == 1
    assert heard.speech_ended_at < 100.0 + len(turn_audio) / 16_000, "speech ended before the last chunk came"
    assert conversation.hear(16_000, turn_audio[:8000]) is None, "audio after the turn's end is ignored"
    assert not conversation.listen(VadOptions()), "no new turn while one waits for its answer"

    reply = conversation.start_reply()
    assert reply is not None and conversation.start_reply() is None, "a turn is answered once"
    assert conversation.queued(reply) and conversation.phase is Phase.QUEUED
    assert conversation.unqueued(reply) and conversation.phase is Phase.THINKING
    assert conversation.reply_audio(reply, b"\x01\x00" * 100, now=heard.speech_ended_at + 1.25)
    assert conversation.phase is Phase.SPEAKING and reply.seconds_to_first_audio == pytest.approx(1.25)
    assert not conversation.playback_ended(), "the reply is still streaming"
    assert conversation.finish_reply(reply) and not conversation.finish_reply(reply)
    assert conversation.phase is Phase.SPEAKING, "it still plays in the browser"
    assert conversation.playback_ended() and conversation.phase is Phase.LISTENING
    assert heard_turn(conversation, turn_audio).number == 2, "the detector starts afresh for the next turn"


def test_a_reply_without_audio_listens_again_at_once(turn_audio: np.ndarray) -> None:
    conversation = Conversation()
    conversation.listen(VadOptions())
    heard_turn(conversation, turn_audio)
    reply = conversation.start_reply()
    assert conversation.finish_reply(reply) and conversation.phase is Phase.LISTENING


def test_stop_cancels_and_hands_back_the_reply_in_flight(turn_audio: np.ndarray) -> None:
    conversation = Conversation()
    conversation.listen(VadOptions())
    heard_turn(conversation, turn_audio)
    reply = conversation.start_reply()
    conversation.reply_audio(reply, b"\x00\x00" * 10)
    assert conversation.stop() is reply and reply.cancel.is_set()
    assert conversation.phase is Phase.STOPPED
    assert not conversation.reply_audio(reply, b"\x00\x00"), "audio after Stop is dropped"
    assert not conversation.finish_reply(reply), "Stop filed it already"
    assert not conversation.playback_ended(), "nothing re-arms after Stop"
    assert conversation.listen(VadOptions()) and conversation.phase is Phase.LISTENING, "Record starts again"


def test_mic_commands_never_repeat() -> None:
    conversation = Conversation()
    commands = [conversation.mic_command(action) for action in (MicAction.STOP, MicAction.RECORD, MicAction.STOP)]
    assert len(set(commands)) == 3 and commands[0].startswith("stop:") and commands[1].startswith("record:")


def test_new_options_make_a_new_detector(turn_audio: np.ndarray) -> None:
    made = []

    def factory(options: VadOptions):
        from vad import PauseDetector

        made.append(options)
        return PauseDetector(options)

    conversation = Conversation(detector_factory=factory)
    conversation.listen(VadOptions())
    conversation.listen(VadOptions())
    conversation.listen(VadOptions(pause_secs=1.2))
    assert [options.pause_secs for options in made] == [0.8, 1.2]


def test_reply_files_and_chunks(tmp_path) -> None:
    from pydub import AudioSegment

    pcm = (np.sin(np.arange(24_000) / 5) * 9000).astype("<i2").tobytes()
    files = TurnFiles(tmp_path)
    mp3 = files.reply_mp3(1, pcm, 24_000)
    assert abs(len(AudioSegment.from_file(mp3, format="mp3")) - 1000) < 60, "one second of reply, one MP3"
    assert isinstance(encode_mp3(pcm, 24_000), bytes)
    chunk = wav_bytes(pcm[:4096], 24_000)
    assert chunk[:4] == b"RIFF" and len(chunk) == 44 + 4096
    messages = assistant_turn(mp3, " hi ", TurnFigures(1.234, 1.0))
    assert [m["content"] if isinstance(m["content"], str) else "audio" for m in messages] == [
        "audio", "hi", "*1.23 s to first audio · 1.0 s reply*"]
    files.delete()
    assert not files.folder.exists()
