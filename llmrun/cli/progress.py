"""Download progress for huggingface_hub's ``tqdm_class`` hook: a rich bar on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import Any

from llmrun.cli.output import format_size

PLAIN_STEP_PERCENT = 10


class DownloadProgress:
    """The slice of tqdm's interface that huggingface_hub uses (context manager, ``update``, ``close``)."""

    def __init__(
        self, *args: Any, total: int | None = None, initial: int = 0, desc: str | None = None, **_: Any
    ) -> None:
        self.total = total
        self.n = initial
        self.name = (desc or "download").rsplit("/", 1)[-1]
        self._started = time.monotonic()
        self._next_plain_percent = PLAIN_STEP_PERCENT
        self._rich: Any = None
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._rich = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self._task = self._rich.add_task(self.name, total=total, completed=initial)
            self._rich.start()
        elif initial:
            self._line(f"resuming {self.name} at {format_size(initial)}")

    def __enter__(self) -> DownloadProgress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def update(self, n: int | float | None = 1) -> None:
        self.n += int(n or 0)
        if self._rich is not None:
            self._rich.update(self._task, completed=self.n)
        elif self.total:
            percent = self.n * 100 // self.total
            if percent >= self._next_plain_percent:
                self._next_plain_percent = percent // PLAIN_STEP_PERCENT * PLAIN_STEP_PERCENT + PLAIN_STEP_PERCENT
                speed = self.n / max(time.monotonic() - self._started, 1e-6)
                self._line(f"{self.name}: {percent}% of {format_size(self.total)} ({format_size(int(speed))}/s)")

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()
            self._rich = None

    def refresh(self, *args: Any, **kwargs: Any) -> None:
        pass

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        pass

    @staticmethod
    def _line(text: str) -> None:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()


class SilentProgress(DownloadProgress):
    """For --quiet: huggingface_hub's own bar would otherwise print."""

    def __init__(self, *args: Any, total: int | None = None, initial: int = 0, **_: Any) -> None:
        self.total = total
        self.n = initial
        self._rich = None

    def update(self, n: int | float | None = 1) -> None:
        self.n += int(n or 0)
