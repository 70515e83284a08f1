"""Engine choice: `auto` uses mini-omni when it can and says so when it falls back to echo."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

from omni_server.engine_host import EngineHost
from omni_server.engines import EngineChoice, EngineOptions, load_engine
from omni_server.protocol import HealthStatus

MODULE = "omni_server.mini_omni.engine"


class FakeMiniOmni:
    name = "mini-omni"
    max_batch = 1  # what a host serving it reads
    fail_with: Exception | None = None

    def __init__(
        self,
        checkpoint_dir: Path | None,
        device: str | None = None,
        dtype: str | None = None,
        mode: str = "default",
        max_batch: int | None = None,
    ) -> None:
        self.asked_max_batch = max_batch  # None: the engine's own default
        self.checkpoint_dir = checkpoint_dir
        self.device = torch.device("cpu")
        self.dtype = torch.bfloat16 if dtype == "bf16" else torch.float32

    def load(self, progress) -> None:
        progress("downloading checkpoint")
        if self.fail_with is not None:
            raise self.fail_with


@pytest.fixture()
def fake_mini_omni(monkeypatch: pytest.MonkeyPatch) -> type[FakeMiniOmni]:
    module = types.ModuleType(MODULE)
    module.MiniOmniEngine = FakeMiniOmni
    monkeypatch.setitem(sys.modules, MODULE, module)
    monkeypatch.setattr(FakeMiniOmni, "fail_with", None)
    return FakeMiniOmni


def run(choice: EngineChoice, checkpoint_dir: Path | None = None) -> tuple[object, str, list[tuple[str, str]]]:
    reports: list[tuple[str, str]] = []
    engine, note = load_engine(EngineOptions(choice, checkpoint_dir), lambda *report: reports.append(report))
    return engine, note, reports


def test_auto_uses_mini_omni_when_it_loads(fake_mini_omni, tmp_path: Path) -> None:
    engine, note, reports = run(EngineChoice.AUTO, tmp_path)
    assert isinstance(engine, fake_mini_omni)
    assert engine.checkpoint_dir == tmp_path
    assert note == f"mini-omni from {tmp_path} (cpu, float32)", "the page shows which dtype runs"
    assert ("mini-omni", "downloading checkpoint") in reports


def test_auto_falls_back_to_echo_when_the_download_fails_and_says_why(fake_mini_omni) -> None:
    fake_mini_omni.fail_with = OSError("cannot reach huggingface.co")
    engine, note, reports = run(EngineChoice.AUTO)
    assert engine.name == "echo"
    assert (
        note
        == "echo engine: mini-omni is unavailable (failed while downloading checkpoint: cannot reach huggingface.co)"
    )
    assert reports[-1][0] == "echo"


def test_auto_falls_back_to_echo_when_the_engine_cannot_be_imported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, MODULE, None)  # makes the import raise ImportError
    engine, note, _ = run(EngineChoice.AUTO)
    assert engine.name == "echo"
    assert note.startswith("echo engine: mini-omni is unavailable (failed while importing the mini-omni engine: ")


def test_forced_mini_omni_failure_is_an_error_in_health(fake_mini_omni) -> None:
    fake_mini_omni.fail_with = FileNotFoundError("lit_model.pth not found")
    host = EngineHost(lambda report: load_engine(EngineOptions(EngineChoice.MINI_OMNI), report), "mini-omni")
    host.start_loading().join(timeout=5)
    assert host.health.status is HealthStatus.ERROR
    assert host.health.engine == "mini-omni"
    assert "lit_model.pth not found" in host.health.detail
    assert host.ready_engine is None


def test_forced_echo_never_tries_mini_omni(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, MODULE, None)
    engine, note, reports = run(EngineChoice.ECHO)
    assert engine.name == "echo"
    assert note == "echo engine (chosen with --engine echo)"
    assert all(name == "echo" for name, _ in reports)


def test_max_batch_reaches_each_engine(fake_mini_omni, tmp_path: Path) -> None:
    echo, _ = load_engine(EngineOptions(EngineChoice.ECHO, max_batch=3), lambda *report: None)
    assert echo.max_batch == 3
    assert load_engine(EngineOptions(EngineChoice.ECHO), lambda *report: None)[0].max_batch == 4, "its default"
    mini_omni, _ = load_engine(EngineOptions(EngineChoice.MINI_OMNI, tmp_path, max_batch=3), lambda *report: None)
    assert mini_omni.asked_max_batch == 3
    mini_omni, _ = load_engine(EngineOptions(EngineChoice.MINI_OMNI, tmp_path), lambda *report: None)
    assert mini_omni.asked_max_batch is None, "it picks its own from the device"
