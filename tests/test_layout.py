"""The package and the catalog where the design puts them; the user's own catalog laid over the shipped one."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT, Cli, hub_env
from hub_standin import HubStandIn
from test_cli_store import assert_one_line_error

USER_ENTRY = """
[models.tiny]
description = "my own tiny model"
repo = "bartowski/Tiny-GGUF"
quant = "Q8_0"
"""


def test_package_and_catalog_sit_at_the_repository_root() -> None:
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert "models.toml" in tracked
    assert "llmrun/__init__.py" in tracked and "llmrun/store/store.py" in tracked
    assert not any(path.startswith("src/") for path in tracked)
    assert [path for path in tracked if path.endswith("models.toml")] == ["models.toml"]  # exactly one copy


def test_wheel_carries_the_catalog_and_works_without_the_repository(tmp_path: Path) -> None:
    wheel_dir, target, elsewhere = tmp_path / "wheel", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    subprocess.run([*pip, "wheel", "--no-deps", ".", "-w", str(wheel_dir)], cwd=ROOT, check=True, timeout=300)
    [wheel] = wheel_dir.glob("llmrun-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert archive.read("llmrun/models.toml") == (ROOT / "models.toml").read_bytes()
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True, timeout=300)
    env = {key: value for key, value in os.environ.items() if not key.startswith("LLMRUN_")}
    env.update(PYTHONPATH=str(target), LLMRUN_HOME=str(tmp_path / "home"), NO_COLOR="1")

    def llmrun(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "llmrun", *args]
        return subprocess.run(command, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)

    where = subprocess.run(
        [sys.executable, "-c", "import llmrun; print(llmrun.__file__)"], cwd=elsewhere, env=env,
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert where.startswith(str(target)), where
    catalog = llmrun("catalog", "--json")
    assert catalog.returncode == 0, catalog.stderr
    assert "smollm2" in {entry["name"] for entry in __import__("json").loads(catalog.stdout)}
    pulled = llmrun("pull", "smollm2")
    assert pulled.returncode == 0, pulled.stderr
    assert "smollm2" in llmrun("list").stdout


def test_user_catalog_entry_is_listed_and_pullable(cli: Cli, home: Path, hub: HubStandIn) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "models.toml").write_text(
        USER_ENTRY + '\n[models.smollm2]\nrepo = "me/my-smollm2-GGUF"\nquant = "Q8_0"\n', encoding="utf-8"
    )
    entries = {entry["name"]: entry for entry in cli("catalog", "--json").json()}
    assert entries["tiny"]["origin"] == "user" and entries["tiny"]["repo"] == "bartowski/Tiny-GGUF"
    assert entries["smollm2"]["origin"] == "user" and entries["smollm2"]["repo"] == "me/my-smollm2-GGUF"
    assert entries["qwen2.5:0.5b"]["origin"] == "shipped"
    table = cli("catalog").stdout.splitlines()
    assert table[0].split("\t")[4] == "ORIGIN"
    assert next(row for row in table if row.startswith("tiny\t")).split("\t")[4] == "user"
    pulled = cli("pull", "tiny", env=hub_env(hub, home))
    assert pulled.returncode == 0, pulled.stderr
    [model] = cli("list", "--json").json()
    assert model["name"] == "tiny" and model["files"][0]["path"].endswith("Tiny-Q8_0.gguf")


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("[models.broken\nrepo = 'a/b'\n", ("models.toml is not valid TOML", "line 1")),
        ("\n\n[models.norepo]\nquant = 'Q4_K_M'\n", ("models.toml, line 3", "[models.norepo] lacks repo")),
        ("[models.badrepo]\nrepo = 'nobody'\nquant = 'Q4_K_M'\n", ("line 1", "not owner/name")),
    ],
)
def test_broken_user_catalog_fails_only_where_the_catalog_is_needed(
    cli: Cli, home: Path, tiny_model: Path, text: str, fragments: tuple[str, ...]
) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "models.toml").write_text(text, encoding="utf-8")
    for args in (("catalog",), ("pull", "qwen2.5:0.5b")):
        result = cli(*args)
        assert result.returncode == 2, result.stderr
        assert_one_line_error(result.stderr, str(home / "models.toml"), *fragments)
    # Commands that do not need the catalog are untouched.
    assert cli("import", str(tiny_model), "--name", "mine").returncode == 0
    assert cli("list").returncode == 0
    assert cli("show", "mine").returncode == 0
    assert cli("run", "mine", "hi", "-n", "3").returncode == 0


def test_help_promises_only_commands_that_exist(cli: Cli) -> None:
    help_text = cli("--help").stdout
    summary = help_text.split("Commands:")[0]
    listing = help_text.split("Commands:")[1]
    commands = {line.split()[0] for line in listing.splitlines() if line.startswith("  ") and line.split()}
    for word in ("pull", "run", "chat", "serve", "bench"):
        if f" {word}" in summary or f"{word}," in summary:
            assert word in commands, f"--help promises `{word}`, which is not a command"
