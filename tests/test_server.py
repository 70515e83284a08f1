"""POST /chat and GET /health over real HTTP (uvicorn on 127.0.0.1), with the echo engine and small fakes."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import requests
import soxr

from omni_server.echo import EchoEngine
from omni_server.engine_host import EngineHost
from omni_server.http_app import create_app
from omni_server.protocol import HealthStatus
from tests.servers import PIECE, ScriptedEngine, serving_app, serving_engine, serving_while_loading, tone, wait_for
from tests.speech import silence, to_int16, wav_bytes

TIMEOUT = (2, 10)


def chat_body(samples: np.ndarray | None = None, **fields: object) -> dict:
    audio = wav_bytes(samples if samples is not None else tone(0.5))
    return {"audio": base64.b64encode(audio).decode(), **fields}


@pytest.fixture()
def quick_echo_url() -> Iterator[str]:
    """An echo server of this test's own, not paced in real time."""
    with serving_engine(EchoEngine(thinking_s=0.1)) as url:
        yield url


# --- 4xx before any audio -------------------------------------------------------------------------

BAD_REQUESTS = [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (json.dumps({"stream_stride": 4}).encode(), 400, 'no "audio"'),
    (json.dumps({"audio": 12}).encode(), 400, "base64 string"),
    (json.dumps({"audio": "UklGRg==!!"}).encode(), 400, "not valid base64"),
    (json.dumps({"audio": "UklGR"}).encode(), 400, "not valid base64"),
    (
        json.dumps({"audio": base64.b64encode(b"this is not audio at all").decode()}).encode(),
        422,
        "could not be decoded",
    ),
    (json.dumps(chat_body(stream_stride="4")).encode(), 400, "whole number"),
    (json.dumps(chat_body(stream_stride=4.0)).encode(), 400, "whole number"),
    (json.dumps(chat_body(stream_stride=True)).encode(), 400, "whole number"),
    (json.dumps(chat_body(stream_stride=0)).encode(), 422, "between 1 and 64"),
    (json.dumps(chat_body(max_tokens=5000)).encode(), 422, "between 1 and 2048"),
    (json.dumps(chat_body(max_tokens="2048")).encode(), 400, "whole number"),
    (json.dumps(chat_body(stream_text="yes")).encode(), 400, "true or false"),
    (json.dumps(chat_body(silence(0))).encode(), 422, "no sound samples"),
    (b"[" * 100_000 + b"]" * 100_000, 400, "nested too deeply"),
    (b'{"audio": "UklGRg==", "max_tokens": ' + b"9" * 5_000 + b"}", 400, "number too long"),
    (
        json.dumps({"audio": base64.b64encode(b"ffconcat version 1.0\nfile 'x.wav'\n").decode()}).encode(),
        422,
        "could not be decoded",
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize(("body", "status", "words"), BAD_REQUESTS, ids=[words for _, _, words in BAD_REQUESTS])
def test_bad_requests_get_a_json_error_before_any_audio(
    quick_echo_url: str, body: bytes, status: int, words: str
) -> None:
    response = requests.post(f"{quick_echo_url}/chat", data=body, timeout=TIMEOUT)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert words in response.json()["error"]


def test_a_question_over_30_seconds_is_answered_from_its_first_30_and_says_so() -> None:
    """As the reference does (its own client would play our former 413 as noise)."""
    with serving_engine(EchoEngine(thinking_s=0.0, realtime=False)) as quick_echo_url:
        trimmed_answers(quick_echo_url)


def trimmed_answers(quick_echo_url: str) -> None:
    for body in (chat_body(silence(31.0), stream_stride=64), chat_body(silence(95.0), stream_stride=64)):
        response = requests.post(f"{quick_echo_url}/chat", json=body, timeout=TIMEOUT)
        assert response.status_code == 200 and response.headers["x-omni-input-trimmed-to-s"] == "30"
        assert abs(len(response.content) / 2 / 24_000 - 30.0) < 0.5, "the echo of the first 30 s"
    multipart = requests.post(
        f"{quick_echo_url}/chat", json=chat_body(silence(31.0), stream_text=True), timeout=TIMEOUT
    )
    assert (
        b"Content-Type: text/plain\r\n\r\n(Only the first 30 seconds of your question were heard.)" in multipart.content
    )
    whole = requests.post(f"{quick_echo_url}/chat", json=chat_body(silence(29.0)), timeout=TIMEOUT)
    assert "x-omni-input-trimmed-to-s" not in whole.headers


def test_thirty_seconds_exactly_is_accepted(quick_echo_url: str) -> None:
    response = requests.post(
        f"{quick_echo_url}/chat", json=chat_body(silence(30.0), stream_stride=64), stream=True, timeout=TIMEOUT
    )
    assert response.status_code == 200
    response.close()


def test_the_server_does_not_describe_itself(quick_echo_url: str) -> None:
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert requests.get(f"{quick_echo_url}{path}", timeout=TIMEOUT).status_code == 404


def test_oversized_body_is_413() -> None:
    with serving_engine(EchoEngine()) as url:
        response = requests.post(f"{url}/chat", data=b"x" * (16 * 1024 * 1024 + 1), timeout=(2, 20))
    assert response.status_code == 413
    assert "larger than 16 MiB" in response.json()["error"]


def test_engine_check_rejection_is_422() -> None:
    with serving_engine(ScriptedEngine()) as url:
        response = requests.post(f"{url}/chat", json=chat_body(max_tokens=13), timeout=TIMEOUT)
    assert response.status_code == 422
    assert response.json() == {"error": "Thirteen tokens is unlucky."}


# --- the echo engine over HTTP ---------------------------------------------------------------------


@pytest.mark.slow
def test_echo_streams_raw_pcm_paced_like_the_model(quick_echo_url: str) -> None:
    speech = tone(1.2)
    started = time.monotonic()
    response = requests.post(f"{quick_echo_url}/chat", json=chat_body(speech), stream=True, timeout=TIMEOUT)
    assert response.status_code == 200
    assert response.headers["content-type"] == "audio/wav"
    arrivals, body = [], b""
    for chunk in response.iter_content(16384):
        arrivals.append(time.monotonic() - started)
        body += chunk
    as_decoded = (
        to_int16(speech).astype(np.float32) / 32768
    )  # the WAV's samples, as the server's ffmpeg step reads them
    expected = (np.clip(soxr.resample(as_decoded, 16_000, 24_000), -1, 1) * 32767).round().astype("<i2").tobytes()
    assert body == expected  # every sample, including the last partial piece
    assert len(body) == 2 * round(1.2 * 24_000)
    # 1.2 s of reply = 4 pieces of 341 ms: the last arrives about 3 piece-durations after the first.
    assert arrivals[-1] - arrivals[0] > 0.8


def test_echo_multipart_has_text_and_audio_parts_in_mini_omni2_framing(quick_echo_url: str) -> None:
    response = requests.post(f"{quick_echo_url}/chat", json=chat_body(tone(0.5), stream_text=True), timeout=TIMEOUT)
    assert response.status_code == 200
    assert response.headers["content-type"] == "multipart/x-mixed-replace; boundary=frame"
    parts = response.content.split(b"\r\n--frame\r\n")
    assert parts[0] == b""  # every part is preceded by the delimiter, nothing before the first
    headers_and_data = [part.split(b"\r\n\r\n", 1) for part in parts[1:]]
    kinds = [header for header, _ in headers_and_data]
    assert kinds == [
        b"Content-Type: application/json",
        b"Content-Type: text/plain",
        b"Content-Type: audio/wav",
        b"Content-Type: audio/wav",
    ]
    assert json.loads(headers_and_data[0][1]) == {"queue_position": 0}
    assert headers_and_data[1][1] == b"(echo) 0.5 s of speech"
    audio = b"".join(data for header, data in headers_and_data if header.endswith(b"audio/wav"))
    assert len(audio) == 2 * 12_000


# --- failures while streaming --------------------------------------------------------------------


def test_engine_failure_after_first_audio_cuts_the_chunked_stream_short() -> None:
    engine = ScriptedEngine(pieces=5, fail_after=2)
    with serving_engine(engine) as url:
        response = requests.post(f"{url}/chat", json=chat_body(), stream=True, timeout=TIMEOUT)
        assert response.status_code == 200
        received = b""
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            for chunk in response.iter_content(4096):
                received += chunk
    assert received == PIECE * 2


def test_engine_failure_in_multipart_sends_an_error_part_then_cuts_short() -> None:
    with serving_engine(ScriptedEngine(pieces=5, fail_after=1)) as url:
        response = requests.post(f"{url}/chat", json=chat_body(stream_text=True), stream=True, timeout=TIMEOUT)
        received = b""
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            for chunk in response.iter_content(4096):
                received += chunk
    last_part = received.split(b"\r\n--frame\r\n")[-1]
    header, data = last_part.split(b"\r\n\r\n", 1)
    assert header == b"Content-Type: application/json"
    assert "special token" in json.loads(data)["error"]


def test_engine_failure_before_any_audio_is_a_500_json_error() -> None:
    with serving_engine(ScriptedEngine(pieces=3, fail_after=0)) as url:
        response = requests.post(f"{url}/chat", json=chat_body(), timeout=TIMEOUT)
    assert response.status_code == 500
    assert "special token" in response.json()["error"]


def test_engine_with_no_audio_is_a_500_json_error() -> None:
    with serving_engine(ScriptedEngine(pieces=0)) as url:
        response = requests.post(f"{url}/chat", json=chat_body(), timeout=TIMEOUT)
    assert response.status_code == 500
    assert "without producing any audio" in response.json()["error"]


# --- one at a time, in arrival order ---------------------------------------------------------------


def health(url: str) -> dict:
    return requests.get(f"{url}/health", timeout=TIMEOUT).json()


def test_requests_are_served_one_at_a_time_in_arrival_order() -> None:
    gate = threading.Event()
    engine = ScriptedEngine(pieces=2, delay=0.05, gate=gate)
    results: dict[int, bytes] = {}

    def send(marker: int) -> None:
        results[marker] = requests.post(f"{url}/chat", json=chat_body(max_tokens=marker), timeout=TIMEOUT).content

    with serving_engine(engine) as url:
        threads = []
        for marker in [101, 102, 103, 104, 105]:
            threads.append(threading.Thread(target=send, args=(marker,)))
            threads[-1].start()
            # The next one leaves only once this one is in line, so arrival order is known.
            wait_for(lambda: health(url)["waiting"] == len(threads) - 1 and health(url)["busy"], what="queued")
        assert engine.served == [101]  # the first holds the turn (blocked on the gate); the rest wait
        gate.set()
        for thread in threads:
            thread.join(timeout=10)
        assert health(url)["busy"] is False
    assert engine.served == [101, 102, 103, 104, 105]
    assert all(body == PIECE * 2 for body in results.values())


def test_an_engine_that_serves_two_at_once_gets_two_and_the_third_waits_its_turn() -> None:
    """`max_batch` 2: the first two requests are generated side by side, the third hears its place (1, then 0)
    and is served as soon as one of them is done; /health says so throughout."""
    gate = threading.Event()
    engine = ScriptedEngine(pieces=2, gate=gate, max_batch=2)
    answers: dict[int, bytes] = {}

    def send(marker: int) -> None:
        body = chat_body(max_tokens=marker, stream_text=marker == 103)
        answers[marker] = requests.post(f"{url}/chat", json=body, timeout=TIMEOUT).content

    with serving_engine(engine) as url:
        threads = [threading.Thread(target=send, args=(marker,)) for marker in (101, 102, 103)]
        for number, thread in enumerate(threads, start=1):
            thread.start()
            wait_for(lambda number=number: len(engine.served) == min(number, 2), what="both served at once")
        wait_for(lambda: health(url)["waiting"] == 1, what="the third in line")
        assert health(url)["busy"] and health(url)["max_batch"] == 2
        assert sorted(engine.served) == [101, 102], "the third waits while two are generated"
        gate.set()
        for thread in threads:
            thread.join(timeout=10)
        assert health(url)["waiting"] == 0 and health(url)["busy"] is False
    assert sorted(engine.served) == [101, 102, 103]
    assert answers[101] == answers[102] == PIECE * 2
    assert b'{"queue_position": 1}' in answers[103] and answers[103].count(b"Content-Type: audio/wav") == 2


@pytest.mark.slow
def test_the_place_in_line_is_taken_on_arrival_not_after_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """A long upload that takes a second to decode is still served before a short one sent after it."""
    import omni_server.http_app as http_app

    decode = http_app.decode_request

    def slow_for_the_first(fields):
        if fields.max_tokens == 101:
            time.sleep(1.0)
        return decode(fields)

    monkeypatch.setattr(http_app, "decode_request", slow_for_the_first)
    engine = ScriptedEngine(pieces=1)
    with serving_engine(engine) as url:
        first = threading.Thread(
            target=requests.post, args=(f"{url}/chat",), kwargs={"json": chat_body(max_tokens=101), "timeout": TIMEOUT}
        )
        first.start()
        wait_for(lambda: health(url)["busy"], what="the first request in line while it decodes")
        requests.post(f"{url}/chat", json=chat_body(max_tokens=102), timeout=TIMEOUT)
        first.join(timeout=10)
    assert engine.served == [101, 102]


@pytest.mark.slow
def test_a_waiting_multipart_request_hears_its_place_in_line() -> None:
    engine = ScriptedEngine(pieces=8, delay=0.2)
    with serving_engine(engine) as url:
        first = threading.Thread(
            target=requests.post, args=(f"{url}/chat",), kwargs={"json": chat_body(), "timeout": TIMEOUT}
        )
        first.start()
        wait_for(lambda: health(url)["busy"], what="first request running")
        response = requests.post(f"{url}/chat", json=chat_body(stream_text=True), timeout=TIMEOUT)
        first.join(timeout=10)
    statuses = [
        json.loads(part.split(b"\r\n\r\n", 1)[1])
        for part in response.content.split(b"\r\n--frame\r\n")
        if part.startswith(b"Content-Type: application/json")
    ]
    assert statuses[0] == {"queue_position": 1}
    assert statuses[-1] == {"queue_position": 0}
    assert len(statuses) >= 3  # repeated about every second while waiting (the first takes 1.6 s)


def test_a_client_that_hangs_up_frees_the_turn() -> None:
    engine = ScriptedEngine(pieces=40, delay=0.1)  # 4 s if nobody stopped it
    with serving_engine(engine) as url:
        response = requests.post(f"{url}/chat", json=chat_body(max_tokens=1), stream=True, timeout=TIMEOUT)
        next(response.iter_content(4096))
        response.close()
        started = time.monotonic()
        second = requests.post(f"{url}/chat", json=chat_body(max_tokens=2), stream=True, timeout=TIMEOUT)
        waited = time.monotonic() - started  # headers come with the second reply's first piece
        second.close()
        assert engine.stopped_early.is_set()
    assert second.status_code == 200
    assert waited < 2.0  # not the 4 s the first generation would have taken
    assert engine.served == [1, 2]


@pytest.mark.slow
def test_a_client_that_hangs_up_while_queued_leaves_the_line() -> None:
    engine = ScriptedEngine(pieces=10, delay=0.1)
    with serving_engine(engine) as url:
        first = threading.Thread(
            target=requests.post, args=(f"{url}/chat",), kwargs={"json": chat_body(max_tokens=1), "timeout": TIMEOUT}
        )
        first.start()
        wait_for(lambda: health(url)["busy"], what="first request running")
        with pytest.raises(requests.exceptions.ReadTimeout):
            requests.post(f"{url}/chat", json=chat_body(max_tokens=2), timeout=(2, 0.3))
        wait_for(lambda: health(url)["waiting"] == 0, what="the hung-up request to leave the line")
        first.join(timeout=10)
        third = requests.post(f"{url}/chat", json=chat_body(max_tokens=3), timeout=TIMEOUT)
    assert third.status_code == 200
    assert engine.served == [1, 3]


def test_a_client_that_stops_reading_does_not_hold_the_turn() -> None:
    engine = ScriptedEngine(pieces=12, piece=b"\0" * 2_000_000)  # 24 MB: far more than socket buffers hold
    with serving_engine(engine) as url:
        port = int(url.rsplit(":", 1)[1])
        body = json.dumps(chat_body(max_tokens=1)).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as stuck:
            stuck.sendall(
                b"POST /chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body) + body
            )
            wait_for(lambda: engine.served == [1], what="the stuck request to start")
            # It never reads, yet its generation completes and the next request is served.
            second = requests.post(
                f"{url}/chat", json=chat_body(max_tokens=2, stream_stride=1), stream=True, timeout=TIMEOUT
            )
            assert second.status_code == 200
            second.close()
    assert engine.served == [1, 2]


# --- health -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_question_asked_while_loading_waits_and_is_answered_once_ready() -> None:
    with serving_while_loading("loading weights", note="echo engine: chosen by the test") as (url, release):
        assert health(url) == {
            "status": "loading",
            "engine": "mini-omni",
            "detail": "loading weights",
            "busy": False,
            "waiting": 0,
            "max_batch": 1,  # until the engine is loaded and says how many it serves at once
        }
        answers: dict[str, requests.Response] = {}

        def ask(kind: str, body: dict) -> None:
            answers[kind] = requests.post(f"{url}/chat", json=body, timeout=TIMEOUT)

        asking = [
            threading.Thread(target=ask, args=("raw", chat_body())),
            threading.Thread(target=ask, args=("multipart", chat_body(stream_text=True))),
        ]
        for thread in asking:
            thread.start()
        wait_for(lambda: health(url)["waiting"] == 1, what="both questions waiting")
        time.sleep(1.5)  # a multipart client hears the loading step meanwhile
        release.set()
        for thread in asking:
            thread.join(timeout=10)
        assert health(url)["engine"] == "echo" and health(url)["detail"] == "echo engine: chosen by the test"
    assert answers["raw"].status_code == 200 and len(answers["raw"].content) > 0
    multipart = answers["multipart"].content
    assert b'{"loading": "mini-omni: loading weights"}' in multipart
    assert multipart.index(b"loading weights") < multipart.index(b"Content-Type: audio/wav"), "then the reply"


def test_a_question_waiting_for_a_load_that_fails_is_told_why() -> None:
    release = threading.Event()

    def loader(report):
        report("mini-omni", "loading weights")
        release.wait(timeout=10)
        raise OSError("checkpoint/lit_model.pth is truncated")

    host = EngineHost(loader, "mini-omni")
    with serving_app(create_app(host)) as url:
        host.start_loading()
        answers: dict[str, requests.Response] = {}
        asking = threading.Thread(
            target=lambda: answers.setdefault("raw", requests.post(f"{url}/chat", json=chat_body(), timeout=TIMEOUT))
        )
        asking.start()
        wait_for(lambda: health(url)["busy"], what="the question waiting")
        release.set()
        asking.join(timeout=10)
    assert answers["raw"].status_code == 503 and "truncated" in answers["raw"].json()["error"]


def test_health_reports_a_load_error_and_chat_says_why() -> None:
    def loader(report):
        raise OSError("checkpoint/lit_model.pth is truncated")

    host = EngineHost(loader, "mini-omni")
    host.start_loading().join(timeout=5)
    assert host.health.status is HealthStatus.ERROR
    with serving_app(create_app(host)) as url:
        state = health(url)
        refused = requests.post(f"{url}/chat", json=chat_body(), timeout=TIMEOUT)
    assert state["status"] == "error"
    assert "truncated" in state["detail"]
    assert refused.status_code == 503
    assert "could not load its engine" in refused.json()["error"]


@pytest.mark.slow
def test_a_body_that_stops_arriving_is_dropped_and_frees_the_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import omni_server.http_app as http_app

    monkeypatch.setattr(http_app, "BODY_STALL_S", 1.0)
    with serving_engine(EchoEngine()) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as slow:
            slow.sendall(
                b"POST /chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b'Content-Length: 1000\r\n\r\n{"audio": "'
            )
            wait_for(lambda: health(url)["busy"], what="the slow request in line")
            answer = b""
            while b"}" not in answer:  # the headers and the JSON body may come in separate reads
                received = slow.recv(4096)
                if not received:
                    break
                answer += received
            answer = answer.decode()
        assert answer.startswith("HTTP/1.1 408") and "stopped arriving" in answer
        assert health(url)["busy"] is False
        assert requests.post(f"{url}/chat", json=chat_body(), timeout=TIMEOUT).status_code == 200
