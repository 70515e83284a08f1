"""omni_server as a Ray Serve application: N replicas, each one engine with its own line, behind Serve's proxy.

    serve run omni_server.ray_serve:build engine=echo replicas=2
    serve run omni_server.ray_serve:build engine=mini-omni checkpoint_dir=/data/checkpoint min_replicas=1 max_replicas=4

Each replica is the whole server of `python -m omni_server` (the same FastAPI app: /chat streaming, multipart
text, /health), so the app points at Serve's HTTP address with `--server-url` and notices nothing. Serve routes
at most `max_batch` requests to a replica at a time (`max_ongoing_requests`) and queues the rest; a replica
whose engine failed to load reports unhealthy and is replaced, as is one whose process dies. Ray is not in
requirements.txt: `pip install -r requirements-ray.txt`.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve import Application, Deployment

from omni_server.echo import DEFAULT_MAX_BATCH as ECHO_MAX_BATCH
from omni_server.engine_host import EngineHost
from omni_server.engines import MINI_OMNI, EngineChoice, EngineOptions, load_engine
from omni_server.http_app import create_app
from omni_server.protocol import HealthStatus


class OmniServer:
    """One replica: an engine loading in the background and the server's app in front of it."""

    def __init__(self, options: EngineOptions) -> None:
        name = "echo" if options.choice is EngineChoice.ECHO else MINI_OMNI
        self.host = EngineHost(functools.partial(load_engine, options), name)
        self.host.start_loading()

    def __serve_build_asgi_app__(self) -> Any:
        return create_app(self.host)

    def check_health(self) -> None:
        """Serve restarts a replica whose check raises: here, one whose engine failed to load."""
        health = self.host.health
        if health.status is HealthStatus.ERROR:
            raise RuntimeError(health.detail)


DEPLOYMENT: Deployment = serve.deployment(name="omni_server")(serve.ingress()(OmniServer))


def default_max_batch(choice: EngineChoice, args: dict[str, str]) -> int:
    """The echo engine's default, or mini-omni's on the device a replica will have (CUDA when given a GPU)."""
    if choice is EngineChoice.ECHO:
        return ECHO_MAX_BATCH
    from omni_server.mini_omni.engine import MAX_BATCH_BY_DEVICE  # here: torch only where mini-omni may run

    device = args.get("device") or ("cuda" if float(args.get("gpus_per_replica", 0)) > 0 else "cpu")
    return MAX_BATCH_BY_DEVICE.get(device.split(":", 1)[0], 1)


def build(args: dict[str, str]) -> Application:
    """The application for `serve run omni_server.ray_serve:build key=value ...`.

    Keys: engine (auto|echo|mini-omni), checkpoint_dir, device, dtype, max_batch, gpus_per_replica, and either
    replicas (a fixed count, default 1) or min_replicas and max_replicas (autoscaling on ongoing requests)."""
    choice = EngineChoice(args.get("engine", EngineChoice.AUTO.value))
    # Serve needs the figure before a replica has loaded its engine: the engine's own default otherwise.
    max_batch = int(args["max_batch"]) if "max_batch" in args else default_max_batch(choice, args)
    options = EngineOptions(
        choice,
        Path(args["checkpoint_dir"]) if "checkpoint_dir" in args else None,
        args.get("device"),
        args.get("dtype"),
        max_batch=max_batch,
    )
    scaling: dict[str, Any]
    if "min_replicas" in args or "max_replicas" in args:
        scaling = {
            "autoscaling_config": {
                "min_replicas": int(args.get("min_replicas", 1)),
                "max_replicas": int(args.get("max_replicas", 2)),
                "target_ongoing_requests": max_batch,
            }
        }
    else:
        scaling = {"num_replicas": int(args.get("replicas", 1))}
    if "gpus_per_replica" in args:  # one replica per GPU: gpus_per_replica=1
        scaling["ray_actor_options"] = {"num_gpus": float(args["gpus_per_replica"])}
    deployment = DEPLOYMENT.options(max_ongoing_requests=max_batch, health_check_period_s=2, **scaling)
    return deployment.bind(options)
