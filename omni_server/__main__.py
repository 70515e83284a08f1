"""`python -m omni_server`: bind at once, load the engine in the background, serve the mini-omni protocol.

Prints one line `omni_server listening on http://HOST:PORT` to stdout once the socket is bound (with
`--port 0` that is how a launcher learns the port it got).
"""

from __future__ import annotations

import argparse
import functools
import logging
import socket
import sys
import threading
from pathlib import Path

import uvicorn

from omni_server.engine_host import EngineHost
from omni_server.engines import MINI_OMNI, EngineChoice, EngineOptions, load_engine
from omni_server.http_app import create_app
from omni_server.protocol import LISTENING_PREFIX


def at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m omni_server", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument(
        "--port", type=int, default=60808, help="port (default 60808 like the reference; 0 = any free port)"
    )
    parser.add_argument(
        "--engine",
        choices=[choice.value for choice in EngineChoice],
        default=EngineChoice.AUTO.value,
        help="auto (default): mini-omni if a checkpoint can be had, else echo; echo; mini-omni",
    )
    parser.add_argument(
        "--checkpoint-dir",
        type=Path,
        default=None,
        help="mini-omni checkpoint directory (downloaded there when absent)",
    )
    parser.add_argument(
        "--device", default=None, help="torch device for mini-omni, e.g. cpu, cuda:0 (default: best available)"
    )
    parser.add_argument("--dtype", default=None, help="torch dtype for mini-omni, e.g. float32, bfloat16")
    parser.add_argument(
        "--decode-mode",
        default="default",
        choices=["default", "reference"],
        help="mini-omni audio: default (seamless pieces, tail sent) or reference (the reference's bytes)",
    )
    parser.add_argument(
        "--max-batch",
        type=at_least_one,
        default=None,
        help="replies generated at once; later requests wait in line "
        "(default: echo 4, mini-omni 4 on a CPU and 8 on CUDA)",
    )
    parser.add_argument(
        "--stop-on-stdin-close",
        action="store_true",
        help="exit when stdin reaches end of file (a launcher's pipe: the server dies with its launcher)",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    options = EngineOptions(
        EngineChoice(args.engine), args.checkpoint_dir, args.device, args.dtype, args.decode_mode, args.max_batch
    )
    host = EngineHost(
        functools.partial(load_engine, options), "echo" if options.choice is EngineChoice.ECHO else MINI_OMNI
    )
    listener = socket.create_server((args.host, args.port))
    bound_host, bound_port = listener.getsockname()[:2]
    shown_host = f"[{bound_host}]" if ":" in bound_host else bound_host
    print(f"{LISTENING_PREFIX}http://{shown_host}:{bound_port}", flush=True)
    host.start_loading()
    # No access log: a launcher polls /health every second; each reply logs its own summary.
    config = uvicorn.Config(create_app(host), log_level=args.log_level, access_log=False, timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    if args.stop_on_stdin_close:
        threading.Thread(target=_stop_at_stdin_eof, args=(server,), name="stdin-watch", daemon=True).start()
    server.run(sockets=[listener])
    sys.exit(0)


def _stop_at_stdin_eof(server: uvicorn.Server) -> None:
    while sys.stdin.buffer.read(4096):
        pass
    logging.getLogger(__name__).info("launcher went away (stdin closed); shutting down")
    server.should_exit = True


if __name__ == "__main__":
    main()
