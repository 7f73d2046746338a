"""The local model store: which names point at which GGUF files.

Layout under ``LLMRUN_HOME``::

    manifests/<quoted name>.json   one per model: files, sizes, sha256, source, time added, summary
    files/<sha256>/<file name>     copied GGUF files (split parts stay side by side, as llama.cpp wants)
    tmp/                           partial copies; never listed

Every write lands in ``tmp`` or beside its target first and is renamed into place,
so a crash never leaves a half entry: a manifest appears only after its files.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

from llmrun.errors import ModelNotFound, StoreError, UsageError

MANIFEST_VERSION = 1
HASH_CHUNK_BYTES = 8 << 20
Placement = Literal["copy", "move", "link", "adopt"]
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,199}$")


@dataclass(frozen=True)
class StoredFile:
    """One file of a model; ``path`` is relative to the store unless the model is linked."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class ModelEntry:
    """A model in the store."""

    name: str
    files: tuple[StoredFile, ...]
    source: str
    added_at: str
    linked: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    repo: str | None = None  # Hub repo it was pulled from
    revision: str | None = None  # Hub commit it is pinned to

    @property
    def size_bytes(self) -> int:
        return sum(stored.size for stored in self.files)

    @property
    def sha256(self) -> str:
        return self.files[0].sha256

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["files"] = [asdict(stored) for stored in self.files]
        return data


def validate_name(name: str) -> str:
    if not NAME_RE.match(name) or ".." in name:
        raise UsageError(
            f"{name!r} is not a valid model name",
            "use letters, digits and . _ - : / (up to 200 characters), starting with a letter or digit",
        )
    return name


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _atomic_write_text(target: Path, text: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


class Store:
    """The models under one ``LLMRUN_HOME``."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.manifests_dir = home / "manifests"
        self.files_dir = home / "files"
        self.tmp_dir = home / "tmp"

    # -- reading --------------------------------------------------------------

    def _manifest_path(self, name: str) -> Path:
        return self.manifests_dir / f"{quote(name, safe='')}.json"

    def _read_manifest(self, path: Path) -> ModelEntry | None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return ModelEntry(
                name=data["name"],
                files=tuple(StoredFile(**stored) for stored in data["files"]),
                source=data.get("source", ""),
                added_at=data.get("added_at", ""),
                linked=bool(data.get("linked", False)),
                info=data.get("info", {}),
                repo=data.get("repo"),
                revision=data.get("revision"),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None  # unreadable manifests are skipped, never fatal for list

    def entries(self) -> list[ModelEntry]:
        """Every model, by name."""
        if not self.manifests_dir.is_dir():
            return []
        entries = (self._read_manifest(path) for path in self.manifests_dir.glob("*.json"))
        return sorted((entry for entry in entries if entry), key=lambda entry: entry.name)

    def find(self, name: str) -> ModelEntry | None:
        path = self._manifest_path(name)
        try:
            exists = path.exists()
        except OSError:  # a name too long for a file name (a request's model, say) names no stored model
            exists = False
        if exists:
            return self._read_manifest(path)
        # Names are case-insensitive when unambiguous (Hub repos are).
        matches = [entry for entry in self.entries() if entry.name.lower() == name.lower()]
        return matches[0] if len(matches) == 1 else None

    def get(self, name: str) -> ModelEntry:
        entry = self.find(name)
        if entry is None:
            raise ModelNotFound(
                f"model {name!r} is not in the local store", f"pull it with `llmrun pull {name}`, or see `llmrun list`"
            )
        return entry

    def file_path(self, entry: ModelEntry, index: int = 0) -> Path:
        stored = entry.files[index]
        return Path(stored.path) if entry.linked else self.home / stored.path

    def is_complete(self, entry: ModelEntry) -> bool:
        return all(self.file_path(entry, index).exists() for index in range(len(entry.files)))

    def model_path(self, entry: ModelEntry) -> Path:
        """The path llama.cpp loads (the first part of a split model), checked to exist."""
        missing = [
            self.file_path(entry, index)
            for index in range(len(entry.files))
            if not self.file_path(entry, index).exists()
        ]
        if missing:
            raise StoreError(
                f"model {entry.name!r} points at {missing[0]}, which no longer exists",
                f"remove it with `llmrun rm {entry.name}` and import or pull it again",
            )
        return self.file_path(entry)

    def total_size(self) -> int:
        return sum(entry.size_bytes for entry in self.entries() if not entry.linked)

    # -- writing --------------------------------------------------------------

    @contextmanager
    def _temp_file(self) -> Iterator[Path]:
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self.tmp_dir, suffix=".partial")
        os.close(fd)
        path = Path(name)
        try:
            yield path
        finally:
            path.unlink(missing_ok=True)

    def _check_free_space(self, needed_bytes: int) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.home).free
        if needed_bytes > free:
            raise StoreError(
                f"not enough disk space: the model needs {needed_bytes / 2**20:.0f} MiB, "
                f"{self.home} has {free / 2**20:.0f} MiB free",
                "free some space, or point LLMRUN_HOME at a larger disk",
            )

    def _copy_in(
        self, source: Path, folder: str | None, expected_sha256: str | None, move: bool
    ) -> tuple[StoredFile, bool]:
        """Copy (or move) one file into ``files/<folder>/``, hashing it on the way; True if it was not there before.

        ``folder`` is the sha256 of the model's first file: split parts must sit side by side for llama.cpp.
        ``None`` means this is the first file, whose own hash names the folder.
        """
        with self._temp_file() as partial:
            digest = hashlib.sha256()
            if move:
                with open(source, "rb") as stream:
                    while chunk := stream.read(HASH_CHUNK_BYTES):
                        digest.update(chunk)
                os.replace(source, partial)
            else:
                with open(source, "rb") as reader, open(partial, "wb") as writer:
                    while chunk := reader.read(HASH_CHUNK_BYTES):
                        digest.update(chunk)
                        writer.write(chunk)
                    writer.flush()
                    os.fsync(writer.fileno())
            sha256 = digest.hexdigest()
            if expected_sha256 and sha256 != expected_sha256.lower():
                raise StoreError(
                    f"{source.name} has sha256 {sha256[:12]}…, expected {expected_sha256[:12]}…; it was not added",
                    "the download is corrupt or was tampered with: fetch it again",
                )
            target = self.files_dir / (folder or sha256) / source.name
            target.parent.mkdir(parents=True, exist_ok=True)
            created = not target.exists()
            if created:
                os.replace(partial, target)
            size = target.stat().st_size
        return StoredFile(str(target.relative_to(self.home)), size, sha256), created

    def _copy_all(self, source_files: list[Path], expected_sha256: str | None, move: bool) -> tuple[StoredFile, ...]:
        """Copy every part; if one fails, the parts already copied for this call are removed again."""
        self._check_free_space(sum(path.stat().st_size for path in source_files))
        records: list[StoredFile] = []
        created: list[Path] = []
        try:
            for index, path in enumerate(source_files):
                folder = records[0].sha256 if records else None
                record, is_new = self._copy_in(path, folder, expected_sha256 if index == 0 else None, move)
                if is_new:
                    created.append(self.home / record.path)
                records.append(record)
        except BaseException:
            for path in created:
                path.unlink(missing_ok=True)
            raise
        return tuple(records)

    def add(
        self,
        name: str,
        source_files: list[Path],
        *,
        source: str,
        info: dict[str, Any],
        placement: Placement = "copy",
        replace: bool = False,
        expected_sha256: str | None = None,
        known_sha256: list[str] | None = None,
        repo: str | None = None,
        revision: str | None = None,
    ) -> ModelEntry:
        """Add a model whose files have already been validated; the manifest is written last.

        ``placement``: ``copy`` or ``move`` the files into the store, ``link`` to them where they are
        (never deleted by llmrun), or ``adopt`` files already under the store (the Hub cache).
        ``known_sha256`` spares hashing files just verified (link and adopt).
        """
        validate_name(name)
        if not replace and self.find(name) is not None:
            raise StoreError(
                f"a model named {name!r} already exists", "choose another --name, or replace it with --force"
            )
        if placement in ("link", "adopt"):
            hashes = known_sha256 or [sha256_of(path) for path in source_files]
            stored = tuple(
                StoredFile(
                    str(path.absolute() if placement == "link" else path.absolute().relative_to(self.home)),
                    path.stat().st_size,
                    sha256,
                )
                for path, sha256 in zip(source_files, hashes, strict=True)
            )
            if expected_sha256 and stored[0].sha256 != expected_sha256.lower():
                raise StoreError(f"{source_files[0].name} does not have the expected sha256; it was not added")
        else:
            stored = self._copy_all(source_files, expected_sha256, move=placement == "move")
        entry = ModelEntry(
            name=name,
            files=stored,
            source=source,
            added_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            linked=placement == "link",
            info=info,
            repo=repo,
            revision=revision,
        )
        data = {"version": MANIFEST_VERSION, **entry.to_dict()}
        _atomic_write_text(self._manifest_path(name), json.dumps(data, indent=2) + "\n")
        return entry

    def remove(self, name: str) -> int:
        """Remove a model; returns the bytes freed (files no other model uses)."""
        entry = self.get(name)
        manifest = self._manifest_path(entry.name)
        manifest.unlink()
        if entry.linked:
            return 0
        # Hub files are snapshot links to blobs: compare what the paths lead to.
        still_used = {self.file_path(other, i).resolve() for other in self.entries() if not other.linked
                      for i in range(len(other.files))}  # fmt: skip
        freed = 0
        for index in range(len(entry.files)):
            path = self.file_path(entry, index)
            target = path.resolve()
            if target in still_used:
                continue
            try:
                freed += target.stat().st_size
                target.unlink()
                if path.is_symlink():
                    path.unlink()
                path.parent.rmdir()
            except OSError:
                pass  # already gone, or the folder still holds another part
        return freed

    def prune(self, hub_cache: Path | None) -> tuple[int, int]:
        """Delete what no model uses: orphaned copies, partial files, old Hub revisions; returns (files, bytes).

        ``hub_cache`` is pruned only when it is llmrun's own (a shared cache belongs to other tools too).
        """
        in_use = {self.file_path(entry, index).resolve() for entry in self.entries()
                  for index in range(len(entry.files))}  # fmt: skip
        candidates: list[Path] = []
        for folder in (self.files_dir, self.tmp_dir):
            if folder.is_dir():
                candidates += [path for path in folder.rglob("*") if path.is_file() and not path.is_symlink()]
        if hub_cache is not None and hub_cache.is_dir():
            candidates += [path for path in hub_cache.glob("models--*/blobs/*") if not path.name.endswith(".lock")]
        removed = freed = 0
        for path in candidates:
            if path.resolve() in in_use:
                continue
            size = path.stat().st_size
            path.unlink(missing_ok=True)
            removed += 1
            freed += size
        if hub_cache is not None and hub_cache.is_dir():
            for link in hub_cache.glob("models--*/snapshots/**/*"):
                if link.is_symlink() and not link.exists():
                    link.unlink()
        for root in (self.files_dir, self.tmp_dir, hub_cache):
            if root is not None and root.is_dir():
                for directory in sorted(
                    (p for p in folder.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True
                ):
                    if not any(directory.iterdir()):
                        directory.rmdir()
        return removed, freed
