"""How results are shown: one stderr console for status, stdout for results, plain text in pipes."""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO


def stdout_is_tty() -> bool:
    return sys.stdout.isatty()


def stdin_is_tty() -> bool:
    return sys.stdin is None or sys.stdin.isatty()


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def notice(message: str) -> None:
    """A status line on stderr (plain text: rich costs 40 ms to import, too much for `list`)."""
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def format_size(n_bytes: int) -> str:
    """Decimal units, as download sizes are quoted on the Hub."""
    value = float(n_bytes)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def format_count(count: int) -> str:
    """Parameter counts as people say them: 134.5M, 1.2B."""
    for divisor, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= divisor:
            return f"{count / divisor:.1f}{suffix}"
    return str(count)


def print_rows(headers: list[str], rows: list[list[str]], stream: TextIO | None = None) -> None:
    """A table: aligned columns on a terminal, tab-separated in a pipe (for cut and awk)."""
    stream = stream or sys.stdout
    if not stream.isatty():
        for row in [headers, *rows]:
            stream.write("\t".join(row) + "\n")
        return
    widths = [max(len(row[column]) for row in [headers, *rows]) for column in range(len(headers))]
    for row in [headers, *rows]:
        stream.write("   ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() + "\n")
