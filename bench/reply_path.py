"""What the app adds between the model server and the user's ears, measured.

1. App CPU per reply chunk: the app's reply handler (Handlers.recording_stopped: client read, state, WAV
   wrapping) run against `python -m omni_server --engine echo` in its own process (so the server's CPU is not
   counted) with pacing off, over many turns. CPU ms per 85 ms chunk (one 4096-byte server read).
   Side by side: what Gradio's streaming Audio.postprocess costs per chunk for the WAV bytes the app yields
   and for a (rate, ndarray) tuple (which Gradio writes to a cache file per chunk).
2. Bytes held before the first yield: how much reply audio the app had received from the client when it
   yielded its first chunk to the player. Beside it, the AAC frames Gradio's stream encoder has for the
   player's first segment with and without the app's 43 ms lead-in (replying.PLAYER_LEAD_IN).
3. From a real browser (tests/browser_harness.py: Chromium, fake microphone, `python app.py --engine echo`):
   seconds from the end of speech in the microphone's WAV to the first reply audio playing in #reply,
   split into turn detection (speech end to the microphone stopping), the reply reaching the player
   (to the player's `play`), and the player's start-up (to `playing`). Several turns; medians reported.

Prints one JSON object on the last line. Example: python bench/reply_path.py --turns 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

import omni_client  # noqa: E402
import replying  # noqa: E402
from app import Handlers, Session  # noqa: E402
from audio_files import TurnFiles, wav_bytes  # noqa: E402
from backend import Backend  # noqa: E402
from state import Conversation  # noqa: E402
from tests import browser_harness as harness  # noqa: E402
from tests.speech import join, silence, speak, write_wav  # noqa: E402
from tests.test_app_flow import skipped, talk  # noqa: E402

QUESTIONS = ["What is the capital of France?", "And how many people live there?", "Is it a good place to visit?"]


def app_cpu_per_chunk(question: np.ndarray, turns: int) -> dict:
    """Run the reply handler against an unpaced echo server in a child process; measure our CPU only."""
    with omni_client.LocalServer(engine="echo") as server, tempfile.TemporaryDirectory() as folder:
        server.wait_ready(timeout_s=60)
        handlers = Handlers(Backend(server_url=server.url))
        received_before_first_yield: list[int] = []
        real_stream = omni_client.stream_reply

        def counting_stream(*args, **kwargs):
            for piece in real_stream(*args, **kwargs):
                if isinstance(piece, omni_client.ReplyAudio):
                    counting_stream.received += len(piece.pcm)
                yield piece

        replying.omni_client.stream_reply = counting_stream
        chunks, cpu_s = 0, 0.0
        try:
            for turn in range(turns):
                session = Session(conversation=Conversation(), files=TurnFiles(Path(folder) / str(turn)))
                talk(handlers, session, question)
                counting_stream.received = 0
                started = time.process_time()
                for outputs in handlers.recording_stopped(session):
                    if not skipped(outputs[0]):
                        if len(received_before_first_yield) == turn:  # this turn's first chunk
                            received_before_first_yield.append(counting_stream.received)
                        chunks += 1
                cpu_s += time.process_time() - started
        finally:
            replying.omni_client.stream_reply = real_stream
    return {
        "app_cpu_ms_per_85ms_chunk": round(1000 * cpu_s / chunks, 3),
        "chunks_measured": chunks,
        "bytes_held_before_first_yield": max(received_before_first_yield),
    }


def gradio_postprocess_per_chunk(repeats: int = 400) -> dict:
    """Gradio's own per-chunk work before encoding, for the two ways of yielding 85 ms of 24 kHz PCM."""
    import gradio as gr

    player = gr.Audio(streaming=True, autoplay=True, render=False)
    pcm = (np.sin(np.arange(2048) / 7) * 9000).astype("<i2")
    results = {}
    for name, make in (("wav_bytes", lambda i: wav_bytes((pcm + i).tobytes(), 24_000)),
                       ("rate_ndarray", lambda i: (24_000, pcm + i))):
        started = time.process_time()
        for i in range(repeats):
            player.postprocess(make(i))  # distinct audio each time, as a real reply (no cache hits)
        results[name] = round(1000 * (time.process_time() - started) / repeats, 3)
    return results


def first_segment_with_audio(trials: int = 10) -> dict:
    """Why the reply's first piece carries a lead-in: the share of trials in which Gradio's stream encoder (the
    one it runs for a streamed gr.Audio) has an AAC frame ready for the player's first segment, from one
    4096-byte read alone and with replying.PLAYER_LEAD_IN in front. No frame means an empty first playlist
    and a player that waits ~1 s; Gradio gives ffmpeg 100 ms to start, which a busy machine can miss."""
    from gradio.audio_stream_encoder import AacStreamEncoder

    first_read = (np.sin(np.arange(2048) / 7) * 9000).astype("<i2").tobytes()
    results = {}
    for name, chunk in (("one_read", first_read), ("lead_in_plus_one_read", replying.PLAYER_LEAD_IN + first_read)):
        frames = []
        for _ in range(trials):
            encoder = AacStreamEncoder(omni_client.REPLY_SAMPLE_RATE, 1)
            try:
                encoder.feed(chunk)
                frames.append(len(encoder.take()))  # the wait Gradio itself allows the first chunk
            finally:
                encoder.close()
        results[name] = sum(count > 0 for count in frames) / trials
    return results


def browser_latency(turns: int, output: Path) -> dict:
    """Speech end in the WAV to reply audio playing, in a real Chromium, for `turns` questions."""
    lead_in, gap = 0.5, 9.0
    parts, ends = [silence(lead_in)], []
    clock = lead_in
    for text in QUESTIONS[:turns]:
        speech = speak(text)
        parts += [speech, silence(gap)]
        clock += len(speech) / 16_000
        ends.append(clock)
        clock += gap
    microphone = write_wav(output / "bench-questions.wav", join(*parts, silence(30.0)))
    rows = []
    with harness.running_app(output / "bench-app.log") as url, harness.chromium_page(microphone) as (page, _):
        page.goto(url)
        harness.wait_for(page, "document.querySelector('#status').innerText.includes('echo engine')", 60,
                         "the local server")
        page.click("#mic button.record-button")
        harness.wait_for(page, "window.__mic.firstOpenedAt !== null", 10, "the microphone")
        room = harness.mic_opened_at(page)
        for index, end in enumerate(ends):
            harness.wait_for(page, harness.MIC_RECORDING, 20, "recording")
            stopped = harness.wait_for(page, harness.MIC_OFF, end - (harness.page_clock(page) - room) + 10,
                                       f"turn {index + 1} to end")
            harness.wait_for(page, f"window.__reply.filter(e => e.type === 'playing').length > {index}"
                             " && window.__reply.filter(e => e.type === 'ended').length > " + str(index), 30,
                             f"reply {index + 1} to play and end")
            play = harness.reply_events(page, "play")[index]["at"]
            playing = next(e["at"] for e in harness.reply_events(page, "playing") if e["at"] >= play)
            speech_end = room + end
            rows.append({"speech_end_to_first_audio_s": playing - speech_end,
                         "speech_end_to_mic_stopped_s": stopped - speech_end,
                         "mic_stopped_to_player_play_s": play - stopped,
                         "player_play_to_playing_s": playing - play})
    return {key: round(statistics.median(row[key] for row in rows), 3) for key in rows[0]} | {
        "turns": [{key: round(value, 3) for key, value in row.items()} for row in rows]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=3, choices=range(1, len(QUESTIONS) + 1),
                        help="questions in the browser run (default 3)")
    parser.add_argument("--cpu-turns", type=int, default=10, help="turns for the CPU measurement (default 10)")
    parser.add_argument("--no-browser", action="store_true", help="skip the Chromium measurement")
    args = parser.parse_args()
    output = ROOT / "test-output" / "bench"
    output.mkdir(parents=True, exist_ok=True)
    result = app_cpu_per_chunk(speak(QUESTIONS[0]), args.cpu_turns)
    result["gradio_postprocess_ms_per_chunk"] = gradio_postprocess_per_chunk()
    result["gradio_first_segment_has_audio"] = first_segment_with_audio()
    if not args.no_browser:
        missing = harness.browser_tools_missing()
        result["browser"] = {"skipped": missing} if missing else browser_latency(args.turns, output)
        if not missing:
            result["speech_end_to_first_audio_s"] = result["browser"]["speech_end_to_first_audio_s"]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
