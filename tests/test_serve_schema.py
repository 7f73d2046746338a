"""Property-based requests generated from the server's own OpenAPI schema: none may get a 5xx."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from conftest import Cli
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from test_serve_api import Server


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory, smollm2: Path) -> Iterator[Server]:
    cli = Cli(tmp_path_factory.mktemp("fuzz-home"))
    assert cli("import", str(smollm2), "--name", "smollm2", "--link").returncode == 0
    running = Server(cli, "--parallel", "2", "--ctx", "256", "--no-log")  # a small context: short answers
    yield running
    running.stop()


# /api/pull and /api/delete change the store (and would reach for the network); their own tests cover them.
LEFT_OUT = re.compile(r"^/api/(pull|delete)$")


def test_no_generated_request_gets_a_server_error(fuzzed: Server) -> None:
    schema = schemathesis.openapi.from_url(f"{fuzzed.url}/openapi.json")
    checked = []
    for result in schema.get_all_operations():
        operation = result.ok()
        if LEFT_OUT.match(operation.path):
            continue

        @given(case=operation.as_strategy())
        @settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def call(case: Any) -> None:
            case.call_and_validate(base_url=fuzzed.url, checks=[not_a_server_error], timeout=120)

        call()
        checked.append(f"{operation.method.upper()} {operation.path}")
    assert "POST /v1/chat/completions" in checked and "POST /api/chat" in checked, checked
