"""The Hugging Face Hub: which GGUF quantizations a repo has, and downloading them verified.

huggingface_hub does the transfer (its cache layout, resume of ``.incomplete`` files,
file locks, etag checks). We add the sha256 of every LFS file checked against the
Hub's metadata, a free-space check, and one place where its typed errors become ours.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmrun.errors import DownloadError, ModelNotFound, StoreError
from llmrun.store.gguf_file import SPLIT_RE
from llmrun.store.quants import PREFERRED_ORDER, quant_label
from llmrun.store.store import FULL_DISK_ERRNOS, disk_error, disk_errors

ProgressFactory = type[Any]  # a tqdm-like class, given to hf_hub_download


class HubUnreachable(DownloadError):
    """The Hub could not be reached at all (no network, offline mode): a fallback source may help."""


@dataclass(frozen=True)
class HubFile:
    path: str
    size: int
    sha256: str | None  # LFS files only


@dataclass(frozen=True)
class QuantChoice:
    """One downloadable model in a repo: a quantization, in one file or several split parts."""

    label: str
    files: tuple[HubFile, ...]

    @property
    def size(self) -> int:
        return sum(hub_file.size for hub_file in self.files)

    @property
    def first(self) -> HubFile:
        return self.files[0]


@dataclass(frozen=True)
class RepoQuants:
    repo: str
    commit: str
    choices: tuple[QuantChoice, ...]

    def labels(self) -> list[str]:
        return [choice.label for choice in self.choices]


@contextmanager
def hub_errors(repo: str) -> Iterator[None]:
    """Turn huggingface_hub's and the network's errors into one-line llmrun errors."""
    from huggingface_hub import errors as hf_errors

    try:
        yield
    except hf_errors.GatedRepoError:
        raise DownloadError(
            f"{repo} is gated: its license must be accepted on the Hub, and you must be logged in",
            "accept it on the model's page, then `hf auth login` or set HF_TOKEN",
        ) from None
    except hf_errors.RepositoryNotFoundError:
        raise ModelNotFound(
            f"the Hub has no repo {repo} (or it is private)",
            "check the spelling; for a private repo, log in with `hf auth login` or set HF_TOKEN",
        ) from None
    except hf_errors.RevisionNotFoundError:
        raise ModelNotFound(f"{repo} has no such revision", "leave the revision out to get the latest") from None
    except hf_errors.RemoteEntryNotFoundError as error:
        raise ModelNotFound(
            f"a file of {repo} is missing on the Hub: {error}", "list what exists with --list"
        ) from None
    except hf_errors.OfflineModeIsEnabled:
        raise HubUnreachable(
            f"cannot reach the Hub for {repo}: HF_HUB_OFFLINE is set", "unset HF_HUB_OFFLINE to download"
        ) from None
    except hf_errors.LocalEntryNotFoundError as error:
        raise HubUnreachable(f"cannot reach the Hugging Face Hub: {_first_line(error)}", _network_hint()) from None
    except hf_errors.HfHubHTTPError as error:
        raise DownloadError(
            f"the Hub answered with an error for {repo}: {_first_line(error)}", _network_hint()
        ) from None
    except Exception as error:
        if _is_network_error(error):
            raise HubUnreachable(f"cannot reach the Hugging Face Hub: {_first_line(error)}", _network_hint()) from None
        raise


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _network_hint() -> str:
    endpoint = os.environ.get("HF_ENDPOINT")
    where = f"HF_ENDPOINT={endpoint}" if endpoint else "huggingface.co"
    return f"check the network connection to {where}"


def _is_network_error(error: BaseException) -> bool:
    # huggingface_hub's HTTP stack (httpx or httpx2) raises its own transport errors: recognise them by name.
    names = {cls.__name__ for cls in type(error).__mro__}
    return bool(names & {"ConnectError", "TransportError", "TimeoutException", "NetworkError", "RemoteProtocolError"})


def _group(files: list[HubFile]) -> tuple[QuantChoice, ...]:
    """GGUF files grouped into downloadable models; split parts travel together, projectors are left out."""
    groups: dict[str, list[HubFile]] = {}
    for hub_file in files:
        name = hub_file.path.rsplit("/", 1)[-1]
        if not name.lower().endswith(".gguf") or name.lower().startswith("mmproj"):
            continue
        match = SPLIT_RE.match(name)
        key = hub_file.path[: len(hub_file.path) - len(name)] + (match["prefix"] if match else name)
        groups.setdefault(key, []).append(hub_file)
    choices = []
    for key, parts in groups.items():
        parts.sort(key=lambda hub_file: hub_file.path)
        label = quant_label(parts[0].path) or key.rsplit("/", 1)[-1].removesuffix(".gguf")
        choices.append(QuantChoice(label, tuple(parts)))
    return tuple(sorted(choices, key=lambda choice: (choice.size, choice.label)))


def list_quants(repo: str, revision: str | None = None) -> RepoQuants:
    """Every GGUF model in a repo at a revision (default: the latest), with sizes and sha256."""
    from huggingface_hub import HfApi

    with hub_errors(repo):
        info = HfApi().model_info(repo, revision=revision, files_metadata=True)
    files = [
        HubFile(sibling.rfilename, int(sibling.size or 0), sibling.lfs.sha256 if sibling.lfs else None)
        for sibling in info.siblings or []
    ]
    choices = _group(files)
    if not choices:
        raise ModelNotFound(f"{repo} has no GGUF files", "llmrun runs GGUF models: look for a repo named …-GGUF")
    return RepoQuants(repo, str(info.sha), choices)


def _names(choice: QuantChoice) -> set[str]:
    """What a user may write after the colon for this choice, lower case."""
    path = choice.first.path.lower().removesuffix(".gguf")
    base = path.rsplit("/", 1)[-1]
    names = {choice.label.lower(), path, base}
    if match := SPLIT_RE.match(base + ".gguf"):
        names.add(match["prefix"])
    return names


def find_choice(quants: RepoQuants, requested: str) -> QuantChoice:
    """The choice a ``:QUANT`` (or file name) asks for, matched case-insensitively."""
    wanted = requested.lower().removesuffix(".gguf")
    matches = [choice for choice in quants.choices if wanted in _names(choice)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        names = ", ".join(choice.first.path for choice in matches)
        raise ModelNotFound(f"{requested} matches several files in {quants.repo}: {names}", "give the file name")
    raise ModelNotFound(
        f"{quants.repo} has no {requested}; it has {', '.join(quants.labels())}",
        f"pick one, e.g. `llmrun pull {quants.repo}:{quants.labels()[0]}`",
    )


def preferred_choice(quants: RepoQuants, order: tuple[str, ...] = PREFERRED_ORDER) -> QuantChoice | None:
    """The first quantization of ``order`` the repo has; the only one if there is just one."""
    if len(quants.choices) == 1:
        return quants.choices[0]
    by_label = {choice.label.upper(): choice for choice in quants.choices}
    for label in order:
        if label in by_label:
            return by_label[label]
    return None


TRANSFER_CHUNK_BYTES = 4 << 20
TRANSFER_BUFFERS = 8
TRANSFER_RETRIES = 5


def _hash_prefix(path: Path) -> tuple[Any, int]:
    """A sha256 object fed with what is already in a partial file, and its length."""
    import hashlib

    digest = hashlib.sha256()
    size = 0
    if path.exists():
        with open(path, "rb") as stream:
            while chunk := stream.read(TRANSFER_CHUNK_BYTES * 8):
                digest.update(chunk)
                size += len(chunk)
    return digest, size


def _write_all(stream: Any, data: memoryview, partial: Path, name: str) -> None:
    """Write every byte (an unbuffered write may take only some); a full disk removes the partial file."""
    try:
        while data:
            data = data[stream.write(data) :]
    except OSError as error:
        if error.errno not in FULL_DISK_ERRNOS:
            raise StoreError(f"writing {partial} failed: {error.strerror}") from None
        partial.unlink(missing_ok=True)
        error.filename = str(partial)
        raise disk_error(error, f"downloading {name}") from None


def _transfer(url: str, partial: Path, expected_size: int, name: str, progress: ProgressFactory | None) -> str:
    """Append the rest of ``url`` to ``partial`` (Range from its current size); returns the whole file's sha256.

    The bytes are read with the standard library straight into a few reused buffers (1.5 GB/s
    here, three times huggingface_hub's own client) while a second thread hashes the buffer
    read before (hashlib releases the GIL), so the check costs no extra pass over the file.
    A dropped connection is resumed in place, a few times.
    """
    import queue
    import threading
    import urllib.error
    import urllib.request

    from huggingface_hub import constants
    from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]

    digest, offset = _hash_prefix(partial)
    buffers = [bytearray(TRANSFER_CHUNK_BYTES) for _ in range(TRANSFER_BUFFERS)]
    free: queue.Queue[int] = queue.Queue()
    for index in range(TRANSFER_BUFFERS):
        free.put(index)
    filled: queue.Queue[tuple[int, int] | None] = queue.Queue()

    def hash_buffers() -> None:
        while (item := filled.get()) is not None:
            index, length = item
            digest.update(memoryview(buffers[index])[:length])
            free.put(index)

    hasher = threading.Thread(target=hash_buffers, daemon=True)
    hasher.start()
    bar = progress(total=expected_size, initial=offset, desc=name, unit="B", unit_scale=True) if progress else None
    failures = 0
    try:
        with open(partial, "ab", buffering=0) as stream:
            while offset < expected_size:
                headers = build_hf_headers()
                if offset:
                    headers["Range"] = f"bytes={offset}-"
                request = urllib.request.Request(url, headers=headers)
                try:
                    with urllib.request.urlopen(request, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as response:
                        if offset and response.status == 200:
                            partial.unlink(missing_ok=True)  # what we have cannot be continued
                            raise DownloadError(f"the server ignored the Range request for {name}", "pull again")
                        while offset < expected_size:
                            index = free.get()
                            length = response.readinto(buffers[index])
                            if not length:
                                free.put(index)
                                break
                            _write_all(stream, memoryview(buffers[index])[:length], partial, name)
                            filled.put((index, length))
                            offset += length
                            if bar is not None:
                                bar.update(length)
                except urllib.error.HTTPError as error:
                    raise DownloadError(
                        f"downloading {name} failed: the server answered {error.code} {error.reason}"
                    ) from None
                except (OSError, ValueError) as error:  # dropped connection, timeout, incomplete read
                    failures += 1
                    if failures > TRANSFER_RETRIES:
                        raise DownloadError(
                            f"downloading {name} failed after {TRANSFER_RETRIES} retries: {error}",
                            "pull again to resume where it stopped",
                        ) from None
    finally:
        filled.put(None)
        hasher.join()
        if bar is not None:
            bar.close()
    if offset != expected_size:
        partial.unlink(missing_ok=True)
        raise DownloadError(
            f"{name} came down as {offset} bytes instead of {expected_size}; it was deleted", "pull again"
        )
    return str(digest.hexdigest())


def _fetch(repo: str, commit: str, hub_file: HubFile, cache_dir: Path, progress: ProgressFactory | None) -> Path:
    """One file into the Hugging Face cache layout (``blobs/<etag>``, ``snapshots/<commit>/<path>``).

    huggingface_hub does the metadata (``HEAD`` with its redirects, etag, commit, errors) and
    the per-blob file lock. The bytes are ours: huggingface_hub >= 2 downloads each attempt to
    a fresh temporary file and deletes it on failure, so an interrupted pull would start over,
    and its ``http_get`` tops out near 500 MB/s here. We keep ``blobs/<etag>.incomplete`` (as
    huggingface_hub 0.x did) and resume it with a Range request, so the cache stays shared.
    """
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import repo_folder_name
    from huggingface_hub.utils import WeakFileLock  # type: ignore[attr-defined]

    storage = cache_dir / repo_folder_name(repo_id=repo, repo_type="model")
    snapshot = storage / "snapshots" / commit / hub_file.path
    if snapshot.exists():
        return snapshot
    with hub_errors(repo):
        metadata = get_hf_file_metadata(hf_hub_url(repo, hub_file.path, revision=commit))
    etag = metadata.etag or hub_file.sha256 or ""
    blob = storage / "blobs" / etag
    blob.parent.mkdir(parents=True, exist_ok=True)
    incomplete = blob.with_name(f"{etag}.incomplete")
    with WeakFileLock(blob.with_name(f"{etag}.lock")):
        if not blob.exists():
            with hub_errors(repo):
                actual = _transfer(
                    metadata.location, incomplete, metadata.size or hub_file.size, hub_file.path, progress
                )
            if hub_file.sha256 and actual != hub_file.sha256:
                incomplete.unlink()
                raise DownloadError(
                    f"{hub_file.path} from {repo} has sha256 {actual[:12]}…, the Hub says "
                    f"{hub_file.sha256[:12]}…; the file was deleted",
                    "pull again; if it happens again, the mirror or proxy is serving wrong bytes",
                )
            os.replace(incomplete, blob)
        snapshot.parent.mkdir(parents=True, exist_ok=True)
        if not snapshot.exists():
            try:
                snapshot.symlink_to(os.path.relpath(blob, snapshot.parent))
            except OSError:  # no symlinks (Windows without developer mode): a hard link, as huggingface_hub does
                os.link(blob, snapshot)
    (storage / "refs").mkdir(exist_ok=True)
    (storage / "refs" / "main").write_text(commit)
    return snapshot


def download(
    quants: RepoQuants, choice: QuantChoice, cache_dir: Path, progress: ProgressFactory | None = None
) -> list[Path]:
    """Download every file of ``choice`` at the listed commit, resuming partial files; LFS sha256 checked."""
    with disk_errors(f"pulling {choice.first.path}"):
        cache_dir.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(cache_dir).free
    if choice.size > free:
        raise StoreError(
            f"not enough disk space: {choice.first.path} needs {choice.size / 2**30:.1f} GiB, "
            f"{cache_dir} has {free / 2**30:.1f} GiB free",
            "free some space, or point LLMRUN_HOME at a larger disk",
        )
    with disk_errors(f"pulling {choice.first.path}"):
        return [_fetch(quants.repo, quants.commit, hub_file, cache_dir, progress) for hub_file in choice.files]
