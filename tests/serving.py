"""A real `llmrun serve` on 127.0.0.1 for tests, started with the installed CLI."""

from __future__ import annotations

import signal
import socket
import subprocess
import time

import httpx
import openai
from conftest import LLMRUN, Cli

STARTUP_TIMEOUT_S = 90


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_healthy(url: str, process: subprocess.Popen[str], what: str) -> None:
    """Until ``url``'s /health answers 200; an AssertionError (the process killed) if it exits or takes too long."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{what} exited: {process.stderr.read() if process.stderr else ''}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    process.wait()
    raise AssertionError(f"{what} did not become healthy")


class Server:
    def __init__(
        self, cli: Cli, *args: str, models: tuple[str, ...] = ("smollm2",), port: int | None = None,
        env: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [str(LLMRUN), "serve", *models, "--port", str(self.port), *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=cli.env(**(env or {})),
        )  # fmt: skip
        wait_until_healthy(self.url, self.process, "serve")

    @classmethod
    def bare(cls, cli: Cli, *args: str, env: dict[str, str] | None = None) -> Server:
        """A server that loads no model at start."""
        return cls(cli, *args, models=(), env=env)

    def openai(self, **kwargs: object) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0, **kwargs)  # type: ignore[arg-type]

    def busy_slots(self) -> float:
        for line in httpx.get(f"{self.url}/metrics").text.splitlines():
            if line.startswith('llmrun_slots_busy{model="smollm2"}'):
                return float(line.split()[-1])
        return 0.0

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode
