"""Choosing and loading an engine: mini-omni when a checkpoint can be had, the echo engine otherwise.

`auto` never falls back silently: the returned note says which engine answers and why, and the server
shows it in /health. This module must import without `omni_server.mini_omni` present, so the mini-omni
import happens only when that engine is tried.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from omni_server.echo import EchoEngine
from omni_server.engine import Engine, LoadReport

if TYPE_CHECKING:
    from omni_server.mini_omni.engine import MiniOmniEngine

log = logging.getLogger(__name__)

MINI_OMNI = "mini-omni"


class EngineChoice(str, enum.Enum):
    AUTO = "auto"
    ECHO = "echo"
    MINI_OMNI = MINI_OMNI


@dataclass(frozen=True)
class EngineOptions:
    choice: EngineChoice = EngineChoice.AUTO
    checkpoint_dir: Path | None = None
    device: str | None = None
    dtype: str | None = None
    decode_mode: str = "default"  # mini-omni: "default" (seamless, tail sent) or "reference" (the reference's bytes)
    max_batch: int | None = None  # replies at once; None: the engine's own default


def load_engine(options: EngineOptions, report: LoadReport) -> tuple[Engine, str]:
    """Build and load the chosen engine (blocking); return it with a sentence saying which and why.

    With `auto`, any failure to import, find, download or load mini-omni falls back to the echo engine,
    and the sentence carries the reason. With `mini-omni`, the failure propagates (the server reports error).
    """
    if options.choice is EngineChoice.ECHO:
        return _load_echo(options, report), "echo engine (chosen with --engine echo)"
    stage = ["importing the mini-omni engine"]

    def report_stage(engine_name: str, detail: str) -> None:
        stage[0] = detail
        report(engine_name, detail)

    try:
        engine = _load_mini_omni(options, report_stage)
    except Exception as error:
        if options.choice is EngineChoice.MINI_OMNI:
            raise
        log.warning("mini-omni unavailable, falling back to the echo engine: %s", error)
        reason = f"failed while {stage[0]}: {_one_line(error)}"
        return _load_echo(options, report), f"echo engine: mini-omni is unavailable ({reason})"
    where = f" from {options.checkpoint_dir}" if options.checkpoint_dir else ""
    return engine, f"mini-omni{where} ({engine.device.type}, {str(engine.dtype).removeprefix('torch.')})"


def _load_mini_omni(options: EngineOptions, report: LoadReport) -> MiniOmniEngine:
    report(MINI_OMNI, "importing the mini-omni engine")
    from omni_server.mini_omni.engine import MiniOmniEngine  # here, so this module imports without it

    engine = MiniOmniEngine(
        options.checkpoint_dir,
        device=options.device,
        dtype=options.dtype,
        mode=options.decode_mode,
        max_batch=options.max_batch,
    )
    engine.load(lambda detail: report(MINI_OMNI, detail))
    return engine


def _load_echo(options: EngineOptions, report: LoadReport) -> Engine:
    engine = EchoEngine() if options.max_batch is None else EchoEngine(max_batch=options.max_batch)
    engine.load(lambda detail: report(engine.name, detail))
    return engine


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
