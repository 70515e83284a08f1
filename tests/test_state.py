"""The per-tab conversation state machine (state.py) and the history files, driven by real speech through the
real pause detector and echo gate; no Gradio, no server, no browser."""

from __future__ import annotations

import numpy as np
import pytest
import soxr

from audio_files import TurnFiles
from history import TurnFigures, assistant_turn
from state import Conversation, CutIn, HeardTurn, Phase
from tests.speech import espeak_available, join, silence, speak, trim
from vad import VadOptions

pytestmark = pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed")

FRAME = 512  # what the page sends: 32 ms at 16 kHz


@pytest.fixture(scope="module")
def question() -> np.ndarray:
    return speak("Hello there, how are you today?")


@pytest.fixture(scope="module")
def other_question() -> np.ndarray:
    return speak("Wait, tell me about the weather instead.")


def as_reply_pcm(audio_16k: np.ndarray) -> bytes:
    """What the echo engine answers: the speech at 24 kHz, s16le."""
    return (np.clip(soxr.resample(audio_16k, 16_000, 24_000), -1, 1) * 32767).astype("<i2").tobytes()


FED: dict[int, int] = {}  # samples fed to each conversation (by id): the microphone stream's clock


def feed(conversation: Conversation, audio: np.ndarray, until: type | None = None):
    """Feed `audio` frame by frame; return the first event of type `until` (or None when all was fed).
    A microphone delivers its frames in real time and this feeds them at once, so a sounding reply's clock is
    moved back by each frame's length: the player has played as much as the microphone has heard meanwhile."""
    for start in range(0, len(audio), FRAME):
        frame = audio[start : start + FRAME]
        event = conversation.hear(16_000, frame)
        FED[id(conversation)] = FED.get(id(conversation), 0) + len(frame)
        if conversation.reply is not None and conversation.reply.sounding_at is not None:
            conversation.reply.sounding_at -= len(frame) / 16_000
        if event is not None and (until is None or isinstance(event, until)):
            return event
        assert event is None or until is not None, f"unexpected {event}"
    return None


def answered(conversation: Conversation, question: np.ndarray):
    """A conversation that has heard `question` and is playing its echo as the reply (SPEAKING), as the
    browser says it has been for a second."""
    heard = feed(conversation, join(silence(0.4), question, silence(1.2)), HeardTurn)
    reply = conversation.start_reply()
    assert conversation.reply_audio(reply, as_reply_pcm(heard.utterance.audio))
    conversation.sounding(heard.number, 1.2)
    reply.sounding_at -= 1.0
    return heard, reply


def test_a_turn_goes_round_the_phases(question: np.ndarray) -> None:
    conversation = Conversation()
    assert conversation.phase is Phase.IDLE
    assert conversation.hear(16_000, question[:FRAME]) is None, "nothing is heard before Start"
    assert conversation.start() and not conversation.start(), "one conversation at a time"
    heard = feed(conversation, join(silence(0.4), question, silence(1.2)), HeardTurn)
    assert conversation.phase is Phase.THINKING and heard.number == 1

    reply = conversation.start_reply()
    assert reply is not None and conversation.start_reply() is None, "a turn is answered once"
    conversation.queued(reply, 2)
    assert conversation.phase is Phase.QUEUED and reply.queue_ahead == 2
    conversation.queued(reply, 0)
    assert conversation.phase is Phase.THINKING
    assert conversation.reply_audio(reply, b"\x01\x00" * 2400, now=heard.speech_ended_at + 1.25)
    assert conversation.phase is Phase.SPEAKING and reply.seconds_to_first_audio == pytest.approx(1.25)
    conversation.sounding(1, 1.4)
    assert reply.seconds_to_first_audio == 1.4, "the browser's own measure wins"
    assert conversation.playback_over(1, 2400, complete=True) is None, "the player caught up; more is coming"
    assert conversation.finish_reply(reply) is None, "a reply with audio is filed when its playback is over"
    assert conversation.phase is Phase.SPEAKING, "it still plays in the browser"
    assert conversation.playback_over(1, 2400, complete=True) is reply
    assert conversation.playback_over(1, 2400, complete=True) is None, "filed once"
    assert conversation.phase is Phase.LISTENING and reply.heard_pcm == bytes(reply.pcm)

    second = feed(conversation, join(silence(0.4), question, silence(1.2)), HeardTurn)
    assert second.number == 2
    assert second.utterance.start_s > heard.utterance.speech_end_s, "one stream, one clock, across turns"


def test_a_reply_without_audio_gives_the_turn_back_at_once(question: np.ndarray) -> None:
    conversation = Conversation()
    conversation.start()
    feed(conversation, join(silence(0.4), question, silence(1.2)), HeardTurn)
    reply = conversation.start_reply()
    assert conversation.finish_reply(reply, "The server failed.") is reply
    assert conversation.phase is Phase.LISTENING and conversation.notice == "The server failed."


def test_the_user_cuts_in_from_their_first_syllable(question: np.ndarray, other_question: np.ndarray) -> None:
    conversation = Conversation()
    conversation.start()
    _, reply = answered(conversation, question)
    assert conversation.phase is Phase.SPEAKING
    words = trim(other_question)
    echo_under = np.pad(0.1 * question, (0, len(words)))[: len(words)]
    speech_start = FED[id(conversation)] / 16_000 + 0.5
    cut_in = feed(conversation, join(silence(0.5), words + echo_under, silence(1.2)), CutIn)
    assert cut_in.reply is reply and reply.cancel.is_set() and reply.interrupted
    assert conversation.phase is Phase.INTERRUPTED
    assert not conversation.reply_audio(reply, b"\x00\x00"), "a cut-off reply takes no more audio"
    assert conversation.playback_over(1, 12_000, complete=False) is reply, "filed with what was played"
    assert reply.heard_pcm == bytes(reply.pcm[:24_000])

    turn = feed(conversation, join(silence(1.2)), HeardTurn)
    assert turn is not None and turn.number == 2 and conversation.phase is Phase.THINKING
    assert turn.utterance.start_s <= speech_start, "the cut-in turn keeps its first syllable"


def test_the_replys_own_echo_never_cuts_in(question: np.ndarray) -> None:
    checked = []

    def echo_check(heard: np.ndarray, reply_pcm: bytes) -> bool:
        from state import reply_echo

        checked.append(reply_echo(heard, reply_pcm))
        return checked[-1]

    conversation = Conversation(echo_check=echo_check)
    conversation.start()
    answered(conversation, question)
    assert feed(conversation, join(silence(0.2), 0.1 * question, silence(0.5))) is None
    assert conversation.phase is Phase.SPEAKING, "a -20 dB copy of the reply is its echo, not the user"
    assert checked and all(checked), "the detector heard speech; the echo gate recognised it"


def test_without_barge_in_speech_over_the_reply_is_ignored(question: np.ndarray, other_question: np.ndarray) -> None:
    conversation = Conversation()
    conversation.set_options(VadOptions(), barge_in=False)
    conversation.start()
    answered(conversation, question)
    assert feed(conversation, join(other_question, silence(1.2))) is None
    assert conversation.phase is Phase.SPEAKING


def test_stop_cancels_and_hands_back_every_unfiled_reply(question: np.ndarray, other_question: np.ndarray) -> None:
    conversation = Conversation()
    conversation.start()
    _, first = answered(conversation, question)
    feed(conversation, join(silence(0.3), other_question), CutIn)
    feed(conversation, silence(1.2), HeardTurn)
    second = conversation.start_reply()
    assert set(map(id, conversation.stop())) == {id(first), id(second)}, "both the cut-off and the new reply"
    assert conversation.phase is Phase.STOPPED and second.cancel.is_set()
    assert not conversation.reply_audio(second, b"\x00\x00"), "audio after Stop is dropped"
    assert conversation.finish_reply(second) is None, "Stop handed it back already"
    assert conversation.playback_over(1, 10, complete=False) is None
    assert conversation.start() and conversation.phase is Phase.LISTENING, "Start begins again"


def test_new_options_hold_from_the_next_turn(question: np.ndarray) -> None:
    conversation = Conversation()
    conversation.start()
    conversation.set_options(VadOptions(pause_secs=1.5), barge_in=True)
    with_pause = join(silence(0.4), question, silence(1.0))
    assert isinstance(feed(conversation, with_pause, HeardTurn), HeardTurn), "this turn keeps its 0.8 s pause"
    reply = conversation.start_reply()
    conversation.finish_reply(reply)
    assert feed(conversation, with_pause) is None, "the next one waits 1.5 s"


def test_every_change_the_page_shows_moves_the_version(question: np.ndarray) -> None:
    conversation = Conversation()
    seen = [conversation.version]
    conversation.start()
    seen.append(conversation.version)
    feed(conversation, join(silence(0.4), question, silence(1.2)), HeardTurn)
    seen.append(conversation.version)
    reply = conversation.start_reply()
    conversation.reply_text(reply, "hello")
    seen.append(conversation.version)
    conversation.add_messages({"role": "user", "content": "x"})
    seen.append(conversation.version)
    assert seen == sorted(set(seen)), "phase moves, streamed text and history each count as a change"


def test_reply_files_and_figures(tmp_path) -> None:
    from pydub import AudioSegment

    pcm = (np.sin(np.arange(24_000) / 5) * 9000).astype("<i2").tobytes()
    files = TurnFiles(tmp_path)
    mp3 = files.reply_mp3(1, pcm, 24_000)
    assert abs(len(AudioSegment.from_file(mp3, format="mp3")) - 1000) < 60, "one second of reply, one MP3"
    messages = assistant_turn(mp3, " hi ", TurnFigures(1.234, 1.0))
    assert [m["content"] if isinstance(m["content"], str) else "audio" for m in messages] == [
        "audio",
        "hi",
        "*1.23 s to first sound · 1.0 s reply*",
    ]
    files.delete()
    assert not files.folder.exists()
