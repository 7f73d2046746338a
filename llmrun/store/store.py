"""The local model store: which names point at which GGUF files.

Layout under ``LLMRUN_HOME``::

    manifests/<quoted name>.json   one per model: files, sizes, sha256, source, time added, summary
    files/<sha256>/<file name>     copied GGUF files (split parts stay side by side, as llama.cpp wants)
    tmp/                           partial copies; never listed
    store.lock                     held by whoever changes the names (import, pull, rm, prune, repair)

Every write lands in ``tmp`` or beside its target first and is renamed into place,
so a crash never leaves a half entry: a manifest appears only after its files. Copies
and hashes happen outside the lock; placing the files and writing the manifest happen
inside it, after the name is checked again, so of two processes adding one name exactly
one wins and the other leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, unquote

from llmrun.errors import ModelNotFound, StoreError, UsageError

MANIFEST_VERSION = 1
HASH_CHUNK_BYTES = 8 << 20
Placement = Literal["copy", "move", "link", "adopt"]
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,199}$")
LOCK_TIMEOUT_S = 300.0  # the lock is held for renames and small writes only; a wait this long means a stuck process
# A partial file written to within this long belongs to a copy or download still under way.
LIVE_PARTIAL_S = 120.0
FULL_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


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
    damage: str | None = None  # why its manifest could not be read (its fields are then what could be recovered)

    @property
    def size_bytes(self) -> int:
        return sum(stored.size for stored in self.files)

    @property
    def sha256(self) -> str:
        return self.files[0].sha256

    def to_dict(self) -> dict[str, Any]:
        """The manifest's fields."""
        data = asdict(self)
        data["files"] = [asdict(stored) for stored in self.files]
        del data["damage"]
        return data


def validate_name(name: str) -> str:
    if not NAME_RE.match(name) or ".." in name:
        raise UsageError(
            f"{name!r} is not a valid model name",
            "use letters, digits and . _ - : / (up to 200 characters), starting with a letter or digit",
        )
    return name


def sha256_of(path: Path, on_bytes: Callable[[int], None] | None = None) -> str:
    """The file's sha256, read in chunks into one reused buffer; ``on_bytes`` hears of each chunk (a progress bar)."""
    digest = hashlib.sha256()
    buffer = bytearray(HASH_CHUNK_BYTES)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as stream:
        while length := stream.readinto(buffer):
            digest.update(view[:length])
            if on_bytes is not None:
                on_bytes(length)
    return digest.hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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


def disk_error(error: OSError, doing: str) -> StoreError:
    """An operating-system error while writing the store, as one line naming the path and the problem."""
    where = f" ({error.filename})" if error.filename else ""
    if error.errno == errno.EFBIG:
        return StoreError(
            f"the file grew past what this file system or process allows (`ulimit -f`): {doing} stopped{where}; "
            "nothing was added",
            "raise the limit, or point LLMRUN_HOME at another file system",
        )
    if error.errno in FULL_DISK_ERRNOS:
        return StoreError(
            f"the disk is full: {doing} stopped{where}; nothing was added",
            "free some space, or point LLMRUN_HOME at a larger disk",
        )
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StoreError(
            f"{doing} failed{where}: {error.strerror}",
            "LLMRUN_HOME must be a folder you can write to: check its permissions, or point it elsewhere",
        )
    if error.errno in (errno.ENOTDIR, errno.EEXIST):
        return StoreError(
            f"the store cannot be made{where}: a file stands where a folder should be",
            "point LLMRUN_HOME at a folder, or move that file away",
        )
    return StoreError(f"{doing} failed{where}: {error.strerror or error}")


@contextmanager
def disk_errors(doing: str) -> Iterator[None]:
    """Operating-system errors inside become ``disk_error``'s one line."""
    try:
        yield
    except OSError as error:
        raise disk_error(error, doing) from error


# What a manifest cut short (a crash, a full disk) still tells: its files and where they came from.
_STRING_FIELD_RE = re.compile(r'"(path|sha256|source|added_at|repo|revision)":\s*"((?:[^"\\]|\\.)*)"')
_SIZE_FIELD_RE = re.compile(r'"size":\s*(\d+)')


def _salvage(text: str) -> tuple[list[StoredFile], dict[str, str], bool]:
    """The files (in order) and first-level string fields still legible in a damaged manifest, and ``linked``."""
    files_start = text.find('"files"')
    info_start = text.find('"info"')
    files: list[StoredFile] = []
    fields: dict[str, str] = {}
    for match in _STRING_FIELD_RE.finditer(text):
        key = match[1]
        try:
            value = json.loads(f'"{match[2]}"')
        except ValueError:  # an escape cut in half
            continue
        in_files = files_start >= 0 and match.start() > files_start and key in ("path", "sha256")
        if in_files and key == "path":
            size_match = _SIZE_FIELD_RE.search(text, match.end(), match.end() + 80)
            files.append(StoredFile(value, int(size_match[1]) if size_match else -1, ""))
        elif in_files and files:
            files[-1] = StoredFile(files[-1].path, files[-1].size, value)
        elif not in_files and (info_start < 0 or match.start() < info_start or key in ("repo", "revision")):
            fields.setdefault(key, value)
    return files, fields, '"linked": true' in text


def _size_problem(path: Path, size: int) -> str | None:
    """``path`` missing, unreadable or not ``size`` bytes long (a stat, no reading), or None."""
    try:
        actual = path.stat().st_size
    except FileNotFoundError:
        return f"{path} is missing"
    except OSError as error:
        return f"{path} cannot be read ({error.strerror})"
    return None if actual == size else f"{path} is {actual} bytes, {size} were stored"


class NameTaken(StoreError):
    """Another model has the name (added by another process meanwhile, perhaps)."""

    http_status = 409


class ChecksumMismatch(StoreError):
    """A file to add does not have the sha256 it should: it was not added."""


class FilesGone(StoreError):
    """A file being linked or adopted was deleted (by another process) before the model could be listed."""


def _well_typed(entry: ModelEntry) -> bool:
    """A manifest edited by hand (or by another program) holds what the code reading it expects."""
    texts = (entry.name, entry.source, entry.added_at)
    optional = (entry.repo, entry.revision)
    files = all(isinstance(stored.path, str) and type(stored.size) is int and isinstance(stored.sha256, str)
                for stored in entry.files)  # fmt: skip
    return (
        all(isinstance(text, str) for text in texts)
        and all(value is None or isinstance(value, str) for value in optional)
        and isinstance(entry.info, dict)
        and files
    )


@dataclass(frozen=True)
class Orphan:
    """A file in the store that no model uses: a copy whose manifest never came, or a stale partial."""

    path: Path
    size: int


class Store:
    """The models under one ``LLMRUN_HOME``."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.manifests_dir = home / "manifests"
        self.files_dir = home / "files"
        self.tmp_dir = home / "tmp"

    # -- reading --------------------------------------------------------------

    def _check_home(self) -> None:
        if self.home.exists() and not self.home.is_dir():
            raise StoreError(
                f"the store folder {self.home} is a file, not a folder",
                "point LLMRUN_HOME at a folder (or unset it), or move that file away",
            )

    def _manifest_path(self, name: str) -> Path:
        return self.manifests_dir / f"{quote(name, safe='')}.json"

    def _read_manifest(self, path: Path) -> ModelEntry | None:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None  # removed since it was listed
        except (OSError, UnicodeDecodeError) as error:
            return self._damaged(path, "", f"its manifest {path} cannot be read ({error})")
        try:
            data = json.loads(text)
            entry = ModelEntry(
                name=data["name"],
                files=tuple(StoredFile(**stored) for stored in data["files"]),
                source=data.get("source", ""),
                added_at=data.get("added_at", ""),
                linked=bool(data.get("linked", False)),
                info=data.get("info", {}),
                repo=data.get("repo"),
                revision=data.get("revision"),
            )
            if not _well_typed(entry):
                raise TypeError("a field of the wrong type")
            return entry
        except (ValueError, KeyError, TypeError, AttributeError):
            return self._damaged(path, text, f"its manifest {path} is not valid (cut short, or edited)")

    def _damaged(self, path: Path, text: str, damage: str) -> ModelEntry:
        """An entry for a manifest that cannot be read: listed as damaged, never hidden, its files still in use."""
        files, fields, linked = _salvage(text)
        return ModelEntry(
            name=unquote(path.name.removesuffix(".json")),
            files=tuple(files),
            source=fields.get("source", ""),
            added_at=fields.get("added_at", ""),
            linked=linked,
            repo=fields.get("repo"),
            revision=fields.get("revision"),
            damage=damage,
        )

    def entries(self) -> list[ModelEntry]:
        """Every model, by name; one whose manifest is damaged is there too, with ``damage`` saying why."""
        self._check_home()
        if not self.manifests_dir.is_dir():
            return []
        entries = (self._read_manifest(path) for path in self.manifests_dir.glob("*.json"))
        return sorted((entry for entry in entries if entry), key=lambda entry: entry.name)

    def find(self, name: str) -> ModelEntry | None:
        self._check_home()
        path = self._manifest_path(name)
        try:
            exists = path.exists()
        except OSError:  # a name too long for a file name (a request's model, say) names no stored model
            exists = False
        if exists and (entry := self._read_manifest(path)) is not None:
            return entry
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

    def problem(self, entry: ModelEntry) -> str | None:
        """What is visibly wrong with a model without reading its bytes (a damaged manifest, a file missing or
        of the wrong size), or None; ``llmrun verify`` also hashes."""
        if entry.damage:
            return entry.damage
        if not entry.files:
            return "its manifest names no file"
        return next(filter(None, (self.file_problem(entry, index) for index in range(len(entry.files)))), None)

    def file_problem(self, entry: ModelEntry, index: int) -> str | None:
        """One file of a model missing, unreadable or of another size than was stored, or None."""
        return _size_problem(self.file_path(entry, index), entry.files[index].size)

    def is_complete(self, entry: ModelEntry) -> bool:
        return self.problem(entry) is None

    def model_path(self, entry: ModelEntry) -> Path:
        """The path llama.cpp loads (the first part of a split model), checked to be there whole."""
        problem = self.problem(entry)
        if problem is not None:
            hint = (
                f"import the file again with `llmrun import PATH --name {entry.name} --force`"
                if entry.linked and not entry.source.startswith("hf:")
                else f"run `llmrun verify --repair {entry.name}`, or remove it with `llmrun rm {entry.name}`"
            )
            raise StoreError(f"model {entry.name!r} is damaged: {problem}", hint)
        return self.file_path(entry)

    @staticmethod
    def total_size(entries: list[ModelEntry]) -> int:
        """The bytes these models take in the store (linked files live elsewhere)."""
        return sum(entry.size_bytes for entry in entries if not entry.linked and not entry.damage)

    def _paths_in_use(self) -> set[Path]:
        """What every model's files lead to (Hub files are snapshot links to blobs)."""
        return {self.file_path(entry, index).resolve() for entry in self.entries()
                for index in range(len(entry.files))}  # fmt: skip

    def orphans(self) -> list[Orphan]:
        """Copies no model uses, and partial copies and manifests no process is still writing (a killed import
        leaves them; ``verify`` reports them)."""
        in_use = self._paths_in_use()
        found: list[Orphan] = []
        now = time.time()
        for folder, pattern in ((self.files_dir, "*"), (self.tmp_dir, "*"), (self.manifests_dir, ".*.tmp")):
            if not folder.is_dir():
                continue
            for path in sorted(folder.rglob(pattern)):
                try:
                    stat = path.lstat()
                except FileNotFoundError:
                    continue
                if not path.is_file() or path.is_symlink() or path.resolve() in in_use:
                    continue
                if folder != self.files_dir and now - stat.st_mtime < LIVE_PARTIAL_S:
                    continue  # a copy, or a manifest's temporary file, another process may still be writing
                found.append(Orphan(path, stat.st_size))
        return found

    # -- writing --------------------------------------------------------------

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Held while the names change: one process at a time places files and writes or removes manifests."""
        from filelock import FileLock, Timeout

        self._check_home()
        with disk_errors("locking the store"):
            self.home.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.home / "store.lock"), timeout=LOCK_TIMEOUT_S)
        try:
            lock.acquire()
        except Timeout:
            raise StoreError(
                f"the store {self.home} stayed locked for {LOCK_TIMEOUT_S:.0f} s",
                "another llmrun is changing it; wait for it, or end it if it is stuck",
            ) from None
        try:
            yield
        finally:
            lock.release()

    def _check_free_space(self, needed_bytes: int) -> None:
        with disk_errors("checking free space"):
            self.home.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(self.home).free
        if needed_bytes > free:
            raise StoreError(
                f"not enough disk space: the model needs {needed_bytes / 2**20:.0f} MiB, "
                f"{self.home} has {free / 2**20:.0f} MiB free",
                "free some space, or point LLMRUN_HOME at a larger disk",
            )

    def _stage(self, source: Path, move: bool, staged: list[tuple[Path, str]]) -> StoredFile:
        """Copy (or move) one file into ``tmp/``, hashing it on the way; the partial copy is appended to ``staged``
        (the caller places or deletes it). The returned record's path is the file's name only, for now."""
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self.tmp_dir, suffix=".partial")
        os.close(fd)
        partial = Path(name)
        staged.append((partial, source.name))
        digest = hashlib.sha256()
        if move:
            with open(source, "rb") as stream:
                while chunk := stream.read(HASH_CHUNK_BYTES):
                    digest.update(chunk)
            os.replace(source, partial)
        else:
            with open(source, "rb") as reader, open(partial, "wb") as writer:
                try:
                    while chunk := reader.read(HASH_CHUNK_BYTES):
                        digest.update(chunk)
                        writer.write(chunk)
                    writer.flush()
                    os.fsync(writer.fileno())
                except OSError as error:
                    error.filename = error.filename or str(partial)  # a failed write names no file
                    raise
        return StoredFile(source.name, partial.stat().st_size, digest.hexdigest())

    def _place(self, staged: list[tuple[Path, str]], records: list[StoredFile]) -> tuple[StoredFile, ...]:
        """Rename staged copies into ``files/<sha256 of the first>/`` (split parts side by side, as llama.cpp wants).

        A file already there is replaced by the fresh copy: same bytes when healthy, and healed when not.
        """
        folder = self.files_dir / records[0].sha256
        folder.mkdir(parents=True, exist_ok=True)
        placed = []
        for (partial, file_name), record in zip(staged, records, strict=True):
            target = folder / file_name
            os.replace(partial, target)
            placed.append(StoredFile(str(target.relative_to(self.home)), record.size, record.sha256))
        return tuple(placed)

    def _drop_unused(self, entry: ModelEntry) -> int:
        """Delete the files of an entry just unlisted that no other model uses; returns the bytes freed."""
        if entry.linked:
            return 0
        still_used = self._paths_in_use()
        inside = self.home.resolve()
        freed = 0
        for index in range(len(entry.files)):
            path = self.file_path(entry, index)
            target = path.resolve()
            if target in still_used or not target.is_relative_to(inside):  # never a file outside the store
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

    def _name_taken(self, name: str) -> StoreError:
        return NameTaken(f"a model named {name!r} already exists", "choose another --name, or replace it with --force")

    def add(
        self,
        name: str,
        source_files: list[Path],
        *,
        source: str,
        info: dict[str, Any],
        placement: Placement = "copy",
        replace: bool | Callable[[ModelEntry], bool] = False,
        expected_sha256: str | None = None,
        known_sha256: list[str] | None = None,
        repo: str | None = None,
        revision: str | None = None,
    ) -> ModelEntry:
        """Add a model whose files have already been validated; the manifest is written last.

        ``placement``: ``copy`` or ``move`` the files into the store, ``link`` to them where they are
        (never deleted by llmrun), or ``adopt`` files already under the store (the Hub cache).
        ``known_sha256`` spares hashing files just verified (link and adopt). ``replace``: True, or which model
        of the same name may be replaced; the files of the model replaced are deleted when no model uses them.
        """
        validate_name(name)

        def may_replace(old: ModelEntry) -> bool:
            return replace(old) if callable(replace) else replace

        existing = self.find(name)
        if existing is not None and not may_replace(existing):
            raise self._name_taken(name)  # early, before a copy that could only be thrown away
        staged: list[tuple[Path, str]] = []
        try:
            with disk_errors(f"adding {name}"):
                records = self._prepare(source_files, placement, expected_sha256, known_sha256, staged)
                with self.lock():
                    replaced = self.find(name)
                    if replaced is not None and not may_replace(replaced):
                        raise self._name_taken(name)  # another process added it while we copied
                    if not staged:
                        self._check_still_there(name, source_files, records)
                    stored = self._place(staged, records) if staged else tuple(records)
                    entry = ModelEntry(
                        name=name,
                        files=stored,
                        source=source,
                        added_at=_now(),
                        linked=placement == "link",
                        info=info,
                        repo=repo,
                        revision=revision,
                    )
                    self._write_manifest(entry)
                    if replaced is not None:
                        self._drop_unused(replaced)
        finally:
            for partial, _ in staged:
                partial.unlink(missing_ok=True)
        return entry

    def _check_still_there(self, name: str, paths: list[Path], records: list[StoredFile]) -> None:
        """Files linked or adopted are not ours until the manifest names them: an `rm` of another model using the
        same Hub blob may have deleted one meanwhile."""
        for path, record in zip(paths, records, strict=True):
            if _size_problem(path, record.size) is not None:
                raise FilesGone(f"{path} was removed while {name} was being added; nothing was added", "run it again")

    def _prepare(
        self,
        source_files: list[Path],
        placement: Placement,
        expected_sha256: str | None,
        known_sha256: list[str] | None,
        staged: list[tuple[Path, str]],
    ) -> list[StoredFile]:
        """The records of the files to add; copies and moves are staged in ``tmp/`` (added to ``staged``)."""
        if placement in ("link", "adopt"):
            hashes = known_sha256 or [sha256_of(path) for path in source_files]
            records = [
                StoredFile(
                    str(path.absolute() if placement == "link" else path.absolute().relative_to(self.home)),
                    path.stat().st_size,
                    sha256,
                )
                for path, sha256 in zip(source_files, hashes, strict=True)
            ]
        else:
            self._check_free_space(sum(path.stat().st_size for path in source_files))
            records = [self._stage(path, placement == "move", staged) for path in source_files]
        if expected_sha256 and records[0].sha256 != expected_sha256.lower():
            raise ChecksumMismatch(
                f"{source_files[0].name} has sha256 {records[0].sha256[:12]}…, expected {expected_sha256[:12]}…; "
                "it was not added",
                "the download is corrupt or was tampered with: fetch it again",
            )
        return records

    def copy(self, source: str, destination: str, *, replace: bool = False) -> ModelEntry:
        """Another name for a model: a manifest of its own naming the same files (stored once; `rm` of one
        name leaves them for the other)."""
        validate_name(destination)
        with disk_errors(f"copying {source}"), self.lock():
            entry = self.get(source)
            if (problem := self.problem(entry)) is not None:
                raise StoreError(
                    f"{entry.name} is damaged: {problem}", f"mend it with `llmrun verify --repair {source}`"
                )
            replaced = self.find(destination)
            if replaced is not None and replaced.name == entry.name:
                raise UsageError(f"{destination!r} is {entry.name!r} itself", "give the copy another name")
            if replaced is not None and not replace:
                raise NameTaken(f"a model named {destination!r} already exists", "choose another name, or use --force")
            copied = dataclasses.replace(entry, name=destination, added_at=_now())  # (here ``replace`` is the flag)
            self._write_manifest(copied)
            if replaced is not None:
                self._drop_unused(replaced)
        return copied

    def rewrite(self, entry: ModelEntry) -> None:
        """Write an entry's manifest again (``verify --repair`` rebuilding one that was damaged)."""
        with disk_errors(f"rewriting {entry.name}"), self.lock():
            self._write_manifest(entry)

    def _write_manifest(self, entry: ModelEntry) -> None:
        """The entry's manifest, replacing any of that name at once (written beside it, then renamed)."""
        data = {"version": MANIFEST_VERSION, **entry.to_dict()}
        _atomic_write_text(self._manifest_path(entry.name), json.dumps(data, indent=2) + "\n")

    def remove(self, name: str) -> int:
        """Remove a model; returns the bytes freed (files no other model uses)."""
        with disk_errors(f"removing {name}"), self.lock():
            entry = self.get(name)
            self._manifest_path(entry.name).unlink(missing_ok=True)
            return self._drop_unused(entry)

    def remove_orphans(self, orphans: list[Orphan]) -> int:
        """Delete orphans found earlier that are still orphans; returns the bytes freed."""
        freed = 0
        with disk_errors("removing orphans"), self.lock():
            still = {orphan.path for orphan in self.orphans()}
            for orphan in orphans:
                if orphan.path in still:
                    orphan.path.unlink(missing_ok=True)
                    freed += orphan.size
                    with suppress(OSError):  # the folder holds more
                        orphan.path.parent.rmdir()
        return freed

    def prune(self, hub_cache: Path | None) -> tuple[int, int]:
        """Delete what no model uses: orphaned copies, partial files, old Hub revisions; returns (files, bytes).

        ``hub_cache`` is pruned only when it is llmrun's own (a shared cache belongs to other tools too).
        Files written in the last ``LIVE_PARTIAL_S`` (a copy or download under way, or a download whose pull is
        about to list it) are left alone.
        """
        with disk_errors("pruning the store"), self.lock():
            orphans = self.orphans()
            if hub_cache is not None and hub_cache.is_dir():
                in_use = self._paths_in_use()
                now = time.time()
                for path in hub_cache.glob("models--*/blobs/*"):
                    if path.name.endswith(".lock") or path.resolve() in in_use:
                        continue
                    try:
                        stat = path.stat()
                    except FileNotFoundError:  # a download finishing: its .incomplete was just renamed
                        continue
                    # A download under way, or one just finished whose pull waits for this lock to list it.
                    if now - stat.st_mtime >= LIVE_PARTIAL_S:
                        orphans.append(Orphan(path, stat.st_size))
            freed = 0
            for orphan in orphans:
                orphan.path.unlink(missing_ok=True)
                freed += orphan.size
            if hub_cache is not None and hub_cache.is_dir():
                for link in hub_cache.glob("models--*/snapshots/**/*"):
                    if link.is_symlink() and not link.exists():
                        link.unlink()
            for root in (self.files_dir, self.tmp_dir, hub_cache):
                if root is not None and root.is_dir():
                    folders = sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts))
                    for directory in reversed(folders):
                        if not any(directory.iterdir()):
                            directory.rmdir()
        return len(orphans), freed
