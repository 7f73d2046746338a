"""The README stays true: its commands, option tables, environment variables and exit codes match the code."""

from __future__ import annotations

import re

from conftest import ROOT, Cli

from llmrun.errors import ExitCode
from llmrun.settings import ENV_VARS

README = (ROOT / "README.md").read_text(encoding="utf-8")


def code_blocks(text: str) -> list[str]:
    return re.findall(r"```sh\n(.*?)```", text, flags=re.DOTALL)


def section(command: str) -> str:
    match = re.search(rf"^### `llmrun {command}\b.*?(?=^### |^## )", README, flags=re.DOTALL | re.MULTILINE)
    assert match, f"README has no section for `llmrun {command}`"
    return match.group(0)


def commands_in_help(cli: Cli) -> list[str]:
    help_text = cli("--help").stdout
    listing = help_text.split("Commands:")[1]
    return [line.split()[0] for line in listing.splitlines() if line.startswith("  ") and line.split()]


def long_options(cli: Cli, command: str) -> set[str]:
    help_text = cli(command, "--help").stdout
    return set(re.findall(r"(--[a-z][a-z-]+)", help_text.split("Options:")[1])) - {"--help"}


def test_readme_opens_with_the_two_commands_and_ci_runs_the_second() -> None:
    first, second = (block.strip() for block in code_blocks(README)[:2])
    assert "pip install ." in first and "llmrun run smollm2" in first
    assert second.endswith("pytest")
    ci_script = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert second in ci_script.splitlines()


def test_every_command_and_option_is_documented(cli: Cli) -> None:
    commands = commands_in_help(cli)
    assert {"pull", "import", "list", "show", "rm", "run"} <= set(commands)
    for command in commands:
        documented = section(command)
        for option in long_options(cli, command):
            assert f"`{option}" in documented, f"README's `llmrun {command}` section lacks {option}"


def test_every_environment_variable_is_documented() -> None:
    for variable in ENV_VARS:
        assert f"| `{variable.name}` |" in README


def test_every_exit_code_is_documented() -> None:
    for code in ExitCode:
        assert re.search(rf"^\| {code.value} \| ", README, flags=re.MULTILINE), code
