"""`llmrun chat` driven in a real pseudo-terminal (pexpect), and `llmrun logs`."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest
from conftest import LLMRUN, Cli

PROMPT = ">>> "


@pytest.fixture
def chat_cli(smollm2: Path, cli: Cli) -> Cli:
    assert cli("import", str(smollm2), "--name", "smollm2", "--link").returncode == 0
    return cli


class Repl:
    """A chat session in a pseudo-terminal."""

    def __init__(self, cli: Cli, *args: str) -> None:
        self.child = pexpect.spawn(
            str(LLMRUN), ["chat", *args], env=cli.env(), encoding="utf-8", timeout=60, dimensions=(50, 120)
        )
        self.child.expect(PROMPT)
        self.banner = self.child.before

    def say(self, line: str) -> str:
        """Send a line; return what was shown until the next prompt."""
        self.child.sendline(line)
        self.child.expect(PROMPT)
        return str(self.child.before)

    def bye(self) -> int:
        self.child.sendline("/bye")
        self.child.expect(pexpect.EOF)
        self.child.close()
        return int(self.child.exitstatus or 0)


@pytest.fixture
def repl(chat_cli: Cli) -> Iterator[Repl]:
    session = Repl(chat_cli, "smollm2", "-t", "0", "--plain")
    yield session
    if session.child.isalive():
        session.child.terminate(force=True)


def logged(cli: Cli, *args: str) -> list[dict]:  # type: ignore[type-arg]
    return cli("logs", "-n", "0", "--json", *args).json()  # type: ignore[no-any-return]


def test_a_question_gets_a_streamed_answer_and_is_logged(repl: Repl, chat_cli: Cli) -> None:
    assert "/help" in repl.banner and "/bye" in repl.banner
    assert "Paris" in repl.say("What is the capital of France?")
    assert repl.bye() == 0
    [entry] = logged(chat_cli)
    assert entry["prompt"] == "What is the capital of France?"
    assert "Paris" in entry["response"]
    assert entry["model"] == "smollm2" and entry["completion_tokens"] > 0 and entry["options"]["temperature"] == 0


def test_markdown_is_rendered_on_a_terminal(chat_cli: Cli) -> None:
    session = Repl(chat_cli, "smollm2", "-t", "0")
    shown = session.say("Write a Python function that adds two numbers, in a code block.")
    assert "```" not in shown  # rich drew the code block instead of printing its fences
    assert "def " in shown
    session.bye()


def test_a_triple_quoted_block_is_one_message(repl: Repl, chat_cli: Cli) -> None:
    repl.child.sendline('"""')
    repl.child.expect(r"\.\.\. ")
    repl.child.sendline("first line")
    repl.child.expect(r"\.\.\. ")
    repl.child.sendline('second line"""')
    repl.child.expect(PROMPT)
    repl.bye()
    assert [entry["prompt"] for entry in logged(chat_cli)] == ["first line\nsecond line"]


def test_slash_commands(repl: Repl, chat_cli: Cli, tmp_path: Path, tiny_model: Path) -> None:
    help_text = repl.say("/help")
    for command in ("/bye", "/clear", "/system", "/set", "/show", "/save", "/load", "/stats", "/model", "/regen",
                    "/undo", "/read", "/context"):  # fmt: skip
        assert command in help_text
    assert "temperature 0.2" in repl.say("/set temperature 0.2")
    assert "temperature 0.2" in repl.say("/show")
    assert "cannot set" in repl.say("/set colour blue")
    repl.say("/system Answer in one word.")
    repl.say("What is the capital of France?")
    assert "1 exchange(s)" in repl.say("/context")
    stats = repl.say("/stats")
    assert "tokens/s" in stats and "first token after" in stats
    repl.say("/regen")
    assert "1 exchange(s)" in repl.say("/context")
    notes = tmp_path / "notes.txt"
    notes.write_text("The secret word is pineapple.\n")
    assert "will go with your next message" in repl.say(f"/read {notes}")
    repl.say("What is the secret word?")
    assert "2 exchange(s)" in repl.say("/context")
    assert "dropped" in repl.say("/undo")
    assert "1 exchange(s)" in repl.say("/context")
    assert "unknown command" in repl.say("/frobnicate")
    chat_cli("import", str(tiny_model), "--name", "tiny")
    assert "now chatting with tiny" in repl.say("/model tiny")
    repl.say("hello")
    repl.say("/clear")
    assert "0 exchange(s)" in repl.say("/context")
    assert repl.bye() == 0
    entries = logged(chat_cli)
    assert entries[0]["system"] == "Answer in one word."
    assert entries[0]["options"]["temperature"] == 0.2
    assert any("pineapple" in entry["prompt"] for entry in entries)
    assert entries[-1]["model"] == "tiny"


def test_save_and_load_restore_a_conversation(repl: Repl, chat_cli: Cli) -> None:
    repl.say("My name is Ada.")
    repl.say("I like tea.")
    assert "saved as tea-talk" in repl.say("/save tea-talk")
    repl.say("/clear")
    assert "0 exchange(s)" in repl.say("/context")
    assert "loaded tea-talk: 2 exchange(s)" in repl.say("/load tea-talk")
    assert "2 exchange(s)" in repl.say("/context")
    repl.bye()
    assert {entry["conversation_name"] for entry in logged(chat_cli, "--cid", "tea-talk")} == {"tea-talk"}


def test_ctrl_c_stops_the_answer_and_the_chat_goes_on(repl: Repl, chat_cli: Cli) -> None:
    repl.child.sendline("Write a very long story about a dragon who learns to cook.")
    repl.child.expect("learns to cook.\r\n")  # the echo of the line
    repl.child.expect(r"\w+ \w+ \w+")  # the answer has started
    time.sleep(0.5)
    repl.child.sendintr()
    repl.child.expect(r"\(stopped\)")
    repl.child.expect(PROMPT)
    assert "Paris" in repl.say("What is the capital of France?")
    repl.child.sendintr()  # at an empty prompt: a hint, not an exit
    repl.child.expect("use /bye or Ctrl-D to leave")
    repl.child.expect(PROMPT)
    repl.child.sendeof()
    repl.child.expect(pexpect.EOF)
    first, second = logged(chat_cli)
    assert first["finish_reason"] == "cancelled" and first["response"]  # the partial answer is kept
    assert "Paris" in second["response"]


def test_a_full_context_drops_the_oldest_turns(chat_cli: Cli) -> None:
    session = Repl(chat_cli, "smollm2", "-t", "0", "--plain", "--ctx", "256", "-n", "24")
    seen = ""
    for turn in range(8):
        seen += session.say(f"Tell me fact number {turn} about the ocean.")
    assert "dropped the" in seen and "oldest exchange(s)" in seen
    context = session.say("/context")
    assert "of 256 tokens" in context
    session.bye()


def test_piped_stdin_is_one_message_per_line(chat_cli: Cli) -> None:
    result = chat_cli("chat", "smollm2", "-t", "0", input="What is the capital of France?\n/context\nThanks!\n")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "1 exchange(s)" in result.stderr  # /context answered on stderr, stdout keeps answers only
    assert len(logged(chat_cli)) == 2


def test_continue_the_last_conversation_or_a_given_one(chat_cli: Cli) -> None:
    chat_cli("chat", "smollm2", "-t", "0", "-n", "8", input="Remember the number 42.\n")
    cid = logged(chat_cli)[0]["conversation_id"]
    continued = chat_cli("chat", "-c", "-t", "0", "-n", "8", input="/context\n")
    assert f"continuing conversation {cid}: 1 exchange(s)" in continued.stderr
    by_id = chat_cli("chat", "--cid", cid, "-n", "8", input="And another?\n")
    assert by_id.returncode == 0
    assert [entry["conversation_id"] for entry in logged(chat_cli)] == [cid, cid]


def test_logs_search_count_and_opt_out(chat_cli: Cli) -> None:
    chat_cli("run", "smollm2", "Tell me about volcanoes", "-n", "5")
    chat_cli("run", "smollm2", "Tell me about glaciers", "-n", "5")
    chat_cli("run", "smollm2", "Tell me about deserts", "-n", "5", "--no-log")
    chat_cli("run", "smollm2", "Tell me about forests", "-n", "5", env={"LLMRUN_NO_LOG": "1"})
    assert [entry["prompt"] for entry in logged(chat_cli)] == ["Tell me about volcanoes", "Tell me about glaciers"]
    assert [entry["prompt"] for entry in logged(chat_cli, "-q", "glaciers")] == ["Tell me about glaciers"]
    last = chat_cli("logs", "-n", "1")
    assert "## Prompt\n\nTell me about glaciers" in last.stdout and "volcanoes" not in last.stdout


def test_history_is_kept_across_sessions(chat_cli: Cli, home: Path) -> None:
    session = Repl(chat_cli, "smollm2", "--plain", "-n", "4")
    session.say("a line to remember")
    session.bye()
    assert "a line to remember" in (home / "chat_history").read_text()
    again = Repl(chat_cli, "smollm2", "--plain", "-n", "4")
    again.child.send("\x1b[A\x1b[A")  # arrow up twice: past "/bye" to the message before it
    again.child.expect("a line to remember")
    again.child.sendline("")
    again.child.expect(PROMPT)
    again.bye()


def test_pasted_lines_arrive_as_one_message(repl: Repl, chat_cli: Cli) -> None:
    repl.child.send("first pasted line\rsecond pasted line\r")  # one write, as a terminal delivers a paste
    repl.child.expect(PROMPT)
    repl.bye()
    assert [entry["prompt"] for entry in logged(chat_cli)] == ["first pasted line\nsecond pasted line"]
