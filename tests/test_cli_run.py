"""`llmrun run` end to end through the installed CLI, with the real SmolLM2 and llama.cpp."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import Cli, finish
from test_cli_store import assert_one_line_error

QUESTION = "What is the capital of France?"


def test_run_answers_the_capital_of_france(smollm2_cli: Cli) -> None:
    result = smollm2_cli("run", "smollm2", QUESTION, "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert result.stdout.endswith("\n")
    assert result.stderr == ""  # llama.cpp's log lines never reach the terminal


def test_prompt_words_are_joined(smollm2_cli: Cli) -> None:
    result = smollm2_cli("run", "smollm2", "What", "is", "the", "capital", "of", "France?", "-t", "0")
    assert "Paris" in result.stdout


def test_piped_stdin_alone_is_the_prompt(smollm2_cli: Cli) -> None:
    result = smollm2_cli("run", "smollm2", "-t", "0", input=QUESTION + "\n")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_piped_stdin_is_combined_with_the_prompt(smollm2_cli: Cli) -> None:
    alone = smollm2_cli("run", "smollm2", "Summarise this.", "-n", "1", "--json").json()
    diff = "diff --git a/x b/x\n+print('hello world')\n"
    combined = smollm2_cli("run", "smollm2", "Summarise this.", "-n", "1", "--json", input=diff).json()
    prompt_only = smollm2_cli("run", "smollm2", "-n", "1", "--json", input=diff).json()
    # Both parts are in the prompt: it is longer than either alone (the template's own tokens cancel out).
    assert combined["prompt_tokens"] > alone["prompt_tokens"]
    assert combined["prompt_tokens"] > prompt_only["prompt_tokens"]


def test_json_has_text_counts_timings_and_reason(smollm2_cli: Cli) -> None:
    result = smollm2_cli("run", "smollm2", QUESTION, "-t", "0", "--json")
    assert result.returncode == 0
    data = result.json()
    assert set(data) >= {"text", "model", "prompt_tokens", "completion_tokens", "finish_reason", "timings"}
    assert data["model"] == "smollm2"
    assert "Paris" in data["text"]
    assert data["finish_reason"] == "stop"
    assert data["prompt_tokens"] > 10 and data["completion_tokens"] > 0
    assert data["context_size"] == 8192
    assert set(data["timings"]) >= {"time_to_first_token_s", "generation_tokens_per_s", "total_s"}
    assert data["timings"]["generation_tokens_per_s"] > 0


def test_greedy_runs_are_identical(smollm2_cli: Cli) -> None:
    args = ("run", "smollm2", "Write a haiku about snow.", "-t", "0", "-n", "30")
    assert smollm2_cli(*args).stdout == smollm2_cli(*args).stdout


def test_seed_makes_sampling_repeatable(smollm2_cli: Cli) -> None:
    args = ("run", "smollm2", "Write a haiku about snow.", "-t", "1.2", "-n", "30", "--seed")
    first, second, other = smollm2_cli(*args, "11"), smollm2_cli(*args, "11"), smollm2_cli(*args, "12")
    assert first.stdout == second.stdout
    assert first.stdout != other.stdout


def test_stop_string_ends_the_answer(smollm2_cli: Cli) -> None:
    data = smollm2_cli("run", "smollm2", QUESTION, "-t", "0", "--stop", "Paris", "--json").json()
    assert data["finish_reason"] == "stop"
    assert "Paris" not in data["text"]


def test_max_tokens_limits_the_answer(smollm2_cli: Cli) -> None:
    data = smollm2_cli("run", "smollm2", "Tell me a long story.", "-n", "7", "--ignore-eos", "--json").json()
    assert data["completion_tokens"] == 7
    assert data["finish_reason"] == "length"


def test_system_prompt_is_used(smollm2_cli: Cli) -> None:
    plain = smollm2_cli("run", "smollm2", QUESTION, "-n", "1", "--json").json()
    with_system = smollm2_cli("run", "smollm2", QUESTION, "-n", "1", "--json", "--system", "Answer in French.").json()
    assert with_system["prompt_tokens"] != plain["prompt_tokens"]


def test_raw_skips_the_chat_template(smollm2_cli: Cli) -> None:
    chat = smollm2_cli("run", "smollm2", "The capital of France is", "-n", "1", "--json").json()
    raw = smollm2_cli("run", "smollm2", "The capital of France is", "-n", "1", "--json", "--raw").json()
    assert raw["prompt_tokens"] < 10 < chat["prompt_tokens"]


def test_verbose_tells_context_threads_and_speed(smollm2_cli: Cli) -> None:
    result = smollm2_cli("run", "smollm2", QUESTION, "-n", "5", "-v", "--threads", "1")
    assert "context 8192 tokens: the model's training context" in result.stderr
    assert "1 threads" in result.stderr
    assert "0 GPU layers" in result.stderr  # auto on a CPU build
    assert "tokens/s" in result.stderr


def test_utf8_text_round_trips_through_the_pipe(cli: Cli, tiny_model: Path) -> None:
    text = "naïve café 日本語 😀🎉"
    result = cli("run", str(tiny_model), text, "--raw", "-n", "40", "-t", "0", "--json")
    assert result.returncode == 0, result.stderr
    data = result.json()
    assert data["text"].encode("utf-8").decode("utf-8") == data["text"]
    echoed = cli("run", str(tiny_model), "-n", "1", "--json", "--raw", input=text).json()
    assert echoed["prompt_tokens"] == len(text.encode("utf-8"))  # byte-level vocabulary: one token per byte


def test_prompt_over_the_context_exits_4(smollm2_cli: Cli) -> None:
    result = smollm2_cli("run", "smollm2", "word " * 300, "--ctx", "128")
    assert result.returncode == 4
    assert_one_line_error(result.stderr, "tokens but the context is 128 tokens", "--ctx")
    assert result.stdout == ""


def test_context_filling_up_is_reported(smollm2_cli: Cli) -> None:
    result = smollm2_cli("run", "smollm2", "Tell me a story.", "--ctx", "64", "--ignore-eos", "--json")
    assert result.returncode == 0
    data = result.json()
    assert data["finish_reason"] == "length"
    assert data["prompt_tokens"] + data["completion_tokens"] == 65
    assert "context of 64 tokens is full" in result.stderr


def test_bad_options_are_usage_errors(smollm2_cli: Cli) -> None:
    for args in (
        ("run", "smollm2", "hi", "--max-tokens", "-3"),
        ("run", "smollm2", "hi", "--temperature", "-1"),
        ("run", "smollm2", "hi", "--gpu-layers", "lots"),
        ("run", "smollm2", "hi", "--bogus"),
        ("run", "smollm2"),  # no prompt and nothing piped
        ("run",),
    ):
        result = smollm2_cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert_one_line_error(result.stderr)


def test_missing_and_corrupt_model_files(cli: Cli, tmp_path: Path, tiny_model: Path) -> None:
    missing = cli("run", str(tmp_path / "missing.gguf"), "hi")
    assert missing.returncode == 2
    assert_one_line_error(missing.stderr, "does not exist")
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(tiny_model.read_bytes()[:5000])
    result = cli("run", str(corrupt), "hi")
    assert result.returncode == 1
    assert_one_line_error(result.stderr, "truncated")


def test_a_model_llama_cpp_rejects_names_the_reason(cli: Cli, tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "unknown-arch.gguf"
    writer = gguf.GGUFWriter(str(path), "no-such-architecture")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    result = cli("run", str(path), "hi")
    assert result.returncode == 1
    assert_one_line_error(result.stderr, "llama.cpp could not load", "no-such-architecture")


def test_debug_shows_llama_cpp_logs(smollm2_cli: Cli) -> None:
    result = smollm2_cli("--debug", "run", "smollm2", "hi", "-n", "2")
    assert result.returncode == 0
    assert "llama_model_loader" in result.stderr or "print_info" in result.stderr


def test_ctrl_c_keeps_output_and_exits_130(smollm2_cli: Cli) -> None:
    process = smollm2_cli.popen("run", "smollm2", "Count from one to a thousand.", "--ignore-eos", "-n", "5000")
    assert process.stdout is not None
    first = process.stdout.read(1)  # the answer has started streaming
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)
    rest = finish(process)  # not communicate(): it would skip what the read above left buffered
    assert rest.returncode == 130
    assert len(first + rest.stdout) > 1
    assert "Traceback" not in rest.stderr


def test_closed_pipe_is_not_an_error(smollm2_cli: Cli) -> None:
    process = smollm2_cli.popen("run", "smollm2", "Tell me a story", "--ignore-eos", "-n", "400")
    assert process.stdout is not None and process.stderr is not None
    process.stdout.read(10)
    process.stdout.close()
    stderr = process.stderr.read()
    process.wait(timeout=30)
    assert "Traceback" not in stderr
    assert process.returncode == 0


def test_run_with_python_dash_m(smollm2_cli: Cli) -> None:
    import sys

    completed = subprocess.run(
        [sys.executable, "-m", "llmrun", "run", "smollm2", QUESTION, "-t", "0"],
        capture_output=True,
        text=True,
        env=smollm2_cli.env(),
        timeout=120,
    )
    assert "Paris" in completed.stdout


@pytest.mark.slow
def test_default_context_is_the_training_context_and_fills_honestly(smollm2_cli: Cli) -> None:
    """Without --ctx SmolLM2 gets its full 8192 tokens, and generation runs until they are all used."""
    result = smollm2_cli("run", "smollm2", "Tell me a story.", "--ignore-eos", "--json", "-v")
    assert result.returncode == 0, result.stderr
    data = result.json()
    assert data["context_size"] == 8192
    assert data["prompt_tokens"] + data["completion_tokens"] == 8192 + 1
    assert data["finish_reason"] == "length"
    assert "context of 8192 tokens is full" in result.stderr
