"""Run by tests/test_ray_serve.py inside a network namespace of its own (only a loopback interface exists, so
nothing Ray or Serve binds, some of it on every interface, can be reached from outside): a local Ray, Serve's
proxy on 127.0.0.1, 2 echo replicas; one replica is killed while a reply streams, then a second request is sent.
Prints one JSON object: how the first reply ended, the second reply's audio, and the replicas running after."""

from __future__ import annotations

import json
import os
import socket
import threading
import time

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # with the node address below: Ray stays on 127.0.0.1
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

import numpy as np  # noqa: E402
import ray  # noqa: E402
from ray import serve  # noqa: E402

from omni_client import ReplyAudio, ReplyError, stream_reply, utterance_wav  # noqa: E402
from omni_server.protocol import OUTPUT_SAMPLE_RATE  # noqa: E402
from omni_server.ray_serve import build  # noqa: E402

QUESTION_S = 6.0  # the echo engine answers with as much audio, paced in real time: time to kill mid-reply


def main() -> None:
    began = time.monotonic()
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=4, log_to_driver=False)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build({"engine": "echo", "replicas": "2"}), route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    started_s = time.monotonic() - began
    wav = utterance_wav((0.3 * np.sin(np.arange(int(16_000 * QUESTION_S)) * 0.05)).astype(np.float32))
    replicas = [
        actor["name"]
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["name"].startswith("SERVE_REPLICA")
    ]
    first: dict[str, object] = {"heard_bytes": 0}

    def ask() -> None:
        try:
            for event in stream_reply(url, wav):
                if isinstance(event, ReplyAudio):
                    first["heard_bytes"] = int(first["heard_bytes"]) + len(event.pcm)  # type: ignore[call-overload]
            first["ended"] = "complete"
        except ReplyError as error:
            first["ended"] = error.kind.value

    asking = threading.Thread(target=ask)
    asking.start()
    while first["heard_bytes"] == 0 and asking.is_alive():
        time.sleep(0.05)
    ray.kill(ray.get_actor(replicas[0], namespace="serve"), no_restart=True)
    asking.join(timeout=60)
    samples = 0
    for event in stream_reply(url, wav):
        if isinstance(event, ReplyAudio):
            samples += len(event.pcm) // 2
    running, deadline = 0, time.monotonic() + 60
    while running < 2 and time.monotonic() < deadline:
        state = serve.status().applications["default"].deployments["omni_server"]
        running = state.replica_states.get("RUNNING", 0)
        time.sleep(0.5)
    print(
        json.dumps(
            {
                "started_s": round(started_s, 1),
                "replicas_before": len(replicas),
                "first_reply": first["ended"],
                "second_reply_audio_s": samples / OUTPUT_SAMPLE_RATE,
                "replicas_running_after": running,
            }
        ),
        flush=True,
    )
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
