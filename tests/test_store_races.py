"""Races on the store between real ``llmrun`` processes: imports and pulls of one name at once, ``rm`` under a
running model, and ``kill -9`` at seeded random points of imports and pulls.

Whatever the timing, the store must stay whole: one winner per name, nothing listed that is broken, no
file left that no model uses once ``verify --repair`` has run, and a pull killed midway resumed by the next.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import struct
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import Cli, CliResult, finish
from hub_standin import Fault, HubStandIn
from test_cli_store import assert_one_line_error, store_files

from llmrun.store.store import sha256_of

TINY = "bartowski/Tiny-GGUF"
TINY_FILE = "Tiny-Q4_K_M.gguf"
TINY_NAME = f"{TINY}:Q4_K_M"
BIG = "org/Big-GGUF"
BIG_FILE = "Big-Q4_1.gguf"
BIG_NAME = f"{BIG}:Q4_1"
GGUF_STRING = 8  # GGUF's value type of a string
RACERS = 4
RACE_ROUNDS = 3
KILL_SEED = 20240607
STORY = "Write a long story about a dragon"


@pytest.fixture(scope="module")
def smollm2_variants(tmp_path_factory: pytest.TempPathFactory, smollm2: Path) -> list[Path]:
    """Copies of SmolLM2 (98 MB, big enough that racing copies overlap), each with its own general.name."""
    folder = tmp_path_factory.mktemp("variants")
    return [variant_of(smollm2, folder / f"variant-{index}.gguf", f"#{index}") for index in range(RACERS)]


def variant_of(source: Path, target: Path, tag: str) -> Path:
    """A copy of a GGUF whose general.name ends in ``tag`` instead: other bytes, still the same valid model."""
    shutil.copyfile(source, target)
    key = b"general.name"
    with open(target, "r+b") as stream:
        head = stream.read(1 << 16)
        at = head.index(struct.pack("<Q", len(key)) + key) + 8 + len(key)
        value_type, length = struct.unpack_from("<IQ", head, at)
        assert value_type == GGUF_STRING and length > len(tag)
        stream.seek(at + 12 + length - len(tag))
        stream.write(tag.encode())
    return target


def files_in(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.is_file()) if folder.is_dir() else []


def listed(cli: Cli) -> list[dict[str, Any]]:
    result = cli("list", "--json")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    entries: list[dict[str, Any]] = result.json()
    return entries


def verified(cli: Cli, *args: str) -> dict[str, Any]:
    """``verify --json`` (with ``args``), which must find every model whole: exit 0, no damaged model."""
    result = cli("verify", "--json", *args)
    assert "Traceback" not in result.stderr, result.stderr
    report: dict[str, Any] = result.json()
    damaged = [model for model in report["models"] if model["status"] not in ("ok", "repaired")]
    assert result.returncode == 0 and not damaged, (result.returncode, damaged, result.stderr)
    return report


def assert_store_sound(cli: Cli, where: str) -> dict[str, Any]:
    """Nothing listed is broken and ``verify`` finds no damaged model; returns the verify report (its orphans)."""
    broken = [(entry["name"], entry["problem"]) for entry in listed(cli) if entry["status"] != "ok"]
    assert not broken, f"{where}: listed but broken: {broken}"
    return verified(cli)


def race(processes: list[subprocess.Popen[str]], tmp_dir: Path) -> tuple[list[CliResult], int]:
    """Wait for processes running at once; returns their results and the most partial copies seen in ``tmp_dir``
    at one time (two or more: the copies really overlapped)."""
    most = 0
    while any(process.poll() is None for process in processes):
        if tmp_dir.is_dir():
            most = max(most, sum(1 for _ in tmp_dir.glob("*.partial")))
        time.sleep(0.002)
    return [finish(process) for process in processes], most


def test_racing_imports_of_one_name_have_one_winner_and_leave_nothing_behind(
    cli: Cli, home: Path, smollm2_variants: list[Path]
) -> None:
    hashes = [sha256_of(path) for path in smollm2_variants]
    most_overlap = 0
    for round_index in range(RACE_ROUNDS):
        name = f"same-{round_index}"
        processes = [cli.popen("import", str(path), "--name", name) for path in smollm2_variants]
        results, overlap = race(processes, home / "tmp")
        most_overlap = max(most_overlap, overlap)
        winners = [index for index, result in enumerate(results) if result.returncode == 0]
        assert len(winners) == 1, [(result.returncode, result.stderr) for result in results]
        [winner] = winners
        assert f"imported {name} " in results[winner].stderr
        for index, result in enumerate(results):
            if index != winner:
                assert result.returncode == 1, result.stderr
                assert_one_line_error(result.stderr, "already exists", repr(name))
        [entry] = [entry for entry in listed(cli) if entry["name"] == name]
        assert entry["files"][0]["sha256"] == hashes[winner]
        assert entry["status"] == "ok"
    assert most_overlap >= 2, "the copies never overlapped: the race was not run"
    entries = listed(cli)
    assert sorted(entry["name"] for entry in entries) == [f"same-{index}" for index in range(RACE_ROUNDS)]
    report = verified(cli)
    assert report["orphans"] == []
    assert [model["status"] for model in report["models"]] == ["ok"] * RACE_ROUNDS
    assert files_in(home / "tmp") == []
    folders = {path.name for path in (home / "files").iterdir()}
    assert folders == {entry["files"][0]["sha256"] for entry in entries}  # one folder per stored file, no more
    assert len(files_in(home / "files")) == len(folders)


def test_racing_pulls_of_one_model_share_one_download(pull: Cli, hub: HubStandIn, tiny_model: Path) -> None:
    hub.fault(TINY, TINY_FILE, Fault(delay_per_chunk_s=0.4))  # about 3 s for its 7 chunks: the pulls overlap
    results = [finish(process) for process in [pull.popen("pull", TINY_NAME) for _ in range(3)]]
    assert [result.returncode for result in results] == [0, 0, 0], [result.stderr for result in results]
    assert all("Traceback" not in result.stderr for result in results)
    assert all(f"pulling {TINY_NAME}" in result.stderr for result in results)  # all three set out to download
    downloads = hub.downloads_of(TINY_FILE)
    assert [(download.range, download.body_bytes) for download in downloads] == [(None, tiny_model.stat().st_size)]
    [entry] = listed(pull)
    assert entry["name"] == TINY_NAME and entry["status"] == "ok"
    assert entry["files"][0]["sha256"] == sha256_of(tiny_model)
    assert verified(pull)["orphans"] == []


def test_an_import_that_takes_a_name_while_a_pull_of_it_downloads_wins(
    pull: Cli, hub: HubStandIn, tmp_path: Path
) -> None:
    from synthetic_gguf import write_model

    hub.fault(TINY, TINY_FILE, Fault(delay_per_chunk_s=0.3))  # about 2 s
    process = pull.popen("pull", TINY_NAME)
    assert process.stderr is not None and "pulling" in process.stderr.readline()
    mine = write_model(tmp_path / "mine.gguf", seed=7)
    assert pull("import", str(mine), "--name", TINY_NAME).returncode == 0
    pulled = finish(process)
    assert pulled.returncode == 1
    assert_one_line_error(pulled.stderr, "was added by another command", "llmrun rm", after_status_lines=True)
    [entry] = listed(pull)
    assert entry["source"] == f"file:{mine}" and entry["status"] == "ok"  # the pull did not replace it
    assert verified(pull)["orphans"] == []


def test_a_pull_whose_blob_an_rm_deletes_before_it_lists_it_fetches_it_again(
    pull: Cli, hub: HubStandIn, home: Path, tiny_model: Path
) -> None:
    """Two names for one Hub file: `rm` of one, while a pull of the other waits for the store lock with the blob
    in hand, deletes the blob (no listed model uses it yet); the pull must notice, not list a missing file."""
    from filelock import FileLock

    hub.add_file(TINY, "Tiny-Q4_1.gguf", tiny_model)  # the same bytes under another quantization: one blob
    assert pull("pull", TINY_NAME).returncode == 0
    held = FileLock(str(home / "store.lock"))
    held.acquire()  # another llmrun changing the store
    process = pull.popen("pull", f"{TINY}:Q4_1")
    assert process.stderr is not None
    assert "pulling" in process.stderr.readline()
    time.sleep(3)  # the blob is found in the cache at once; the pull now waits for the lock
    process.send_signal(signal.SIGSTOP)  # so that the rm surely goes first
    held.release()
    removed = pull("rm", TINY_NAME, "-y")
    assert removed.returncode == 0 and "freed" in removed.stderr
    process.send_signal(signal.SIGCONT)
    result = finish(process)
    assert result.returncode == 0, result.stderr
    [entry] = listed(pull)
    assert entry["name"] == f"{TINY}:Q4_1" and entry["status"] == "ok"
    assert len(hub.downloads_of("Tiny-Q4_1.gguf")) == 1  # fetched again
    assert verified(pull)["orphans"] == []


def test_rm_of_a_model_while_it_runs_lets_the_run_finish_and_frees_its_file(
    cli: Cli, home: Path, smollm2: Path
) -> None:
    assert cli("import", str(smollm2), "--name", "sm").returncode == 0
    args = ("run", "sm", STORY, "-n", "120", "-t", "0", "--no-log")
    undisturbed = cli(*args)
    assert undisturbed.returncode == 0, undisturbed.stderr
    assert len(undisturbed.stdout) > 200  # a long answer: the rm below lands in the middle of it
    process = cli.popen(*args)
    assert process.stdout is not None
    first = process.stdout.read(16)  # the model is loaded and writing
    assert first
    removed = cli("rm", "sm", "-y")
    assert removed.returncode == 0, removed.stderr
    assert "removed sm" in removed.stderr
    running = process.poll() is None
    rest = finish(process)
    assert rest.returncode == 0, rest.stderr
    assert first + rest.stdout == undisturbed.stdout  # the whole answer, as if nothing had happened
    assert running, "the run had finished before rm: nothing was tested"
    assert listed(cli) == []
    assert files_in(home / "files") == []
    assert [path for path in store_files(home) if path.name != "logs.db"] == []


@dataclass
class KillLog:
    """What the kills did: how many landed while the process ran, and what they left behind."""

    killed: int = 0
    finished_first: int = 0
    import_partials: int = 0  # kills that left a partial copy in tmp/ (they landed mid-copy)
    pull_partials: int = 0  # kills that left a partial download (mid-download)
    orphans_seen: int = 0
    listed_after: int = 0
    notes: list[str] = field(default_factory=list)


def kill_delays(rng: random.Random, count: int, duration_s: float) -> list[float]:
    """Seeded times into a run of ``duration_s``, one in each of ``count`` equal slices of it (so the very
    start and the very end are tried too), in shuffled order."""
    fractions = [(slice_index + rng.random()) / count for slice_index in range(count)]
    rng.shuffle(fractions)
    return [fraction * duration_s for fraction in fractions]


def kill_after(process: subprocess.Popen[str], delay_s: float, log: KillLog) -> None:
    time.sleep(delay_s)
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)
    result = finish(process)
    if result.returncode == -signal.SIGKILL:
        log.killed += 1
    else:
        assert result.returncode == 0, result.stderr  # it finished before the kill came
        log.finished_first += 1


def incomplete_downloads(home: Path) -> list[Path]:
    return sorted((home / "hub").rglob("*.incomplete")) if (home / "hub").is_dir() else []


def after_kill(cli: Cli, home: Path, log: KillLog, where: str, partials_before: int | None = None) -> None:
    """The store is sound after a kill; notes what the kill left (``partials_before``: the partial copies in tmp/
    before an import; None after a pull)."""
    report = assert_store_sound(cli, where)
    partials = len(files_in(home / "tmp"))
    downloads = [path.stat().st_size for path in incomplete_downloads(home)]
    if partials_before is not None and partials > partials_before:
        log.import_partials += 1
    if partials_before is None and any(downloads):
        log.pull_partials += 1
    log.orphans_seen += len(report["orphans"])
    log.notes.append(f"{where}: {partials} partial copies, downloads {downloads}, orphans {report['orphans']}")


def timed(cli: Cli, *args: str) -> float:
    start = time.monotonic()
    result = cli(*args)
    assert result.returncode == 0, result.stderr
    return time.monotonic() - start


def kill_imports(cli: Cli, home: Path, smollm2: Path, rng: random.Random, points: int, log: KillLog) -> None:
    """Imports of SmolLM2 killed at seeded points; each model that made it is checked, then removed."""
    duration = timed(cli, "import", str(smollm2), "--name", "timing")
    assert cli("rm", "timing", "-y").returncode == 0
    for index, delay in enumerate(kill_delays(rng, points, duration)):
        name = f"k{index}"
        partials_before = len(files_in(home / "tmp"))
        kill_after(cli.popen("import", str(smollm2), "--name", name), delay, log)
        after_kill(cli, home, log, f"import killed after {delay:.3f} s of {duration:.3f} s", partials_before)
        if name in {entry["name"] for entry in listed(cli)}:
            log.listed_after += 1
            removed = cli("rm", name, "-y")
            assert removed.returncode == 0, removed.stderr


def kill_pulls(
    pull: Cli, hub: HubStandIn, home: Path, smollm2: Path, rng: random.Random, points: int, log: KillLog
) -> None:
    """Pulls killed at seeded points (the pulled model removed whenever one made it, so the next downloads again),
    then one killed once its download has begun, then one left to finish: it resumes.

    The file is SmolLM2 (98 MB), not Tiny: the client writes what it receives in 4 MB blocks, so a 440 KB
    download is all or nothing on disk and a kill could never leave a partial file to resume.
    """
    size = hub.add_file(BIG, BIG_FILE, smollm2).size
    hub.fault(BIG, BIG_FILE, Fault(delay_per_chunk_s=0.001))  # about 2 s of download
    duration = timed(pull, "pull", BIG)
    assert pull("rm", BIG_NAME, "-y").returncode == 0
    for delay in kill_delays(rng, points, duration):
        kill_after(pull.popen("pull", BIG), delay, log)
        after_kill(pull, home, log, f"pull killed after {delay:.3f} s of {duration:.3f} s")
        if BIG_NAME in {entry["name"] for entry in listed(pull)}:
            log.listed_after += 1
            assert pull("rm", BIG_NAME, "-y").returncode == 0
    # Settle what the random points left (a partial download, or a whole blob no model names yet), so that the
    # last point is mid-download: one pull to the end, then rm, which deletes the blob.
    if BIG_NAME not in {entry["name"] for entry in listed(pull)}:
        settled = pull("pull", BIG)
        assert settled.returncode == 0, settled.stderr
    assert pull("rm", BIG_NAME, "-y").returncode == 0
    assert incomplete_downloads(home) == []
    process = pull.popen("pull", BIG)
    deadline = time.monotonic() + 30
    while not [path for path in incomplete_downloads(home) if path.stat().st_size > 0]:
        assert time.monotonic() < deadline and process.poll() is None, "the download never began"
        time.sleep(0.01)
    kill_after(process, 0.0, log)
    after_kill(pull, home, log, "pull killed mid-download")
    [partial] = incomplete_downloads(home)
    kept = partial.stat().st_size
    assert 0 < kept < size
    hub.fault(BIG, BIG_FILE, Fault())
    result = pull("pull", BIG)
    assert result.returncode == 0, result.stderr
    last = hub.downloads_of(BIG_FILE)[-1]
    assert (last.range, last.body_bytes) == (f"bytes={kept}-", size - kept)  # resumed where the killed one stopped
    assert incomplete_downloads(home) == []
    [entry] = [entry for entry in listed(pull) if entry["name"] == BIG_NAME]
    assert entry["status"] == "ok"


def kill_at_random_points(
    pull: Cli, hub: HubStandIn, home: Path, smollm2: Path, tiny_model: Path, import_points: int, pull_points: int
) -> KillLog:
    """``kill -9`` of imports and pulls at seeded points; after each the store is sound, and at the end
    ``verify --repair --yes`` leaves no file that no model uses (stale partial copies included)."""
    rng = random.Random(KILL_SEED + import_points + pull_points)
    log = KillLog()
    assert pull("import", str(tiny_model), "--name", "keep").returncode == 0  # must stay whole throughout
    kill_imports(pull, home, smollm2, rng, import_points, log)
    kill_pulls(pull, hub, home, smollm2, rng, pull_points, log)
    # As if the killed copies (and any manifest write cut short) had been left an hour ago: younger ones may
    # belong to a process still writing, and are not orphans yet.
    left = files_in(home / "tmp") + sorted((home / "manifests").glob(".*.tmp"))
    for path in left:
        os.utime(path, (time.time() - 3600, time.time() - 3600))
    orphans = verified(pull)["orphans"]
    assert {str(path) for path in left} <= {orphan["path"] for orphan in orphans}
    repaired = verified(pull, "--repair", "--yes")
    assert repaired["orphan_bytes_removed"] == sum(orphan["size"] for orphan in orphans)
    assert verified(pull)["orphans"] == []
    assert files_in(home / "tmp") == []
    entries = listed(pull)
    assert {entry["name"] for entry in entries} == {"keep", BIG_NAME}  # each import that made it was removed
    in_use = {(home / stored["path"]).resolve() for entry in entries for stored in entry["files"]}
    assert {path.resolve() for path in files_in(home / "files")} <= in_use
    assert [path for path in files_in(home / "manifests") if path.suffix != ".json"] == []
    blobs = [path for path in (home / "hub").rglob("blobs/*") if not path.name.endswith(".lock")]
    assert {path.resolve() for path in blobs} <= in_use  # no download left half done or unused
    return log


@pytest.mark.parametrize(
    ("import_points", "pull_points", "min_killed", "min_pull_partials"),
    [
        pytest.param(6, 5, 7, 1, id="12-points"),  # the default run
        pytest.param(12, 10, 15, 2, id="23-points", marks=pytest.mark.slow),
    ],
)
def test_kill_9_at_seeded_points_of_import_and_pull_never_breaks_the_store(
    pull: Cli, hub: HubStandIn, home: Path, smollm2: Path, tiny_model: Path,
    import_points: int, pull_points: int, min_killed: int, min_pull_partials: int,
) -> None:  # fmt: skip
    log = kill_at_random_points(pull, hub, home, smollm2, tiny_model, import_points, pull_points)
    assert log.killed + log.finished_first == import_points + pull_points + 1
    assert log.killed >= min_killed, log
    # some kills landed mid-copy, mid-download
    assert log.import_partials >= 1 and log.pull_partials >= min_pull_partials, log
