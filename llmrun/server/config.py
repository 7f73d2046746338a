"""The ``serve --config`` file: upstream engines (``[upstreams.NAME]``) and settings of local models
(``[models.NAME]``). A mistake in it is one line naming the file, the table and what to fix."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmrun.errors import UsageError
from llmrun.settings import DEFAULT_DRAFT_MAX

DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_READ_TIMEOUT_S = 300.0  # the longest wait for a response, or between two of its chunks
DEFAULT_HEALTH_INTERVAL_S = 10.0
UPSTREAM_KEYS = {"urls", "url", "api_key_env", "models", "connect_timeout_s", "read_timeout_s", "health_interval_s"}
MODEL_KEYS = {"draft", "draft_max", "draft_min", "lookup"}
MAX_DRAFT = 47  # as --draft-max: verify rows stay below llama.cpp's 64-row tiled path


@dataclass(frozen=True)
class UpstreamConfig:
    """One ``[upstreams.NAME]`` table of the config file."""

    name: str
    urls: tuple[str, ...]
    models: tuple[str, ...] = ()  # empty: those its /v1/models lists
    api_key_env: str | None = None
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S
    health_interval_s: float = DEFAULT_HEALTH_INTERVAL_S


@dataclass(frozen=True)
class ModelConfig:
    """One ``[models.NAME]`` table: how the server runs that local model (speculative decoding, for now)."""

    name: str
    draft: str | None = None  # a draft model's reference, resolved (and pulled) like any model
    lookup: bool = False
    draft_max: int = DEFAULT_DRAFT_MAX
    draft_min: int = 0


@dataclass(frozen=True)
class ServeConfig:
    upstreams: tuple[UpstreamConfig, ...] = ()
    models: dict[str, ModelConfig] = field(default_factory=dict)


def load_config(path: Path) -> ServeConfig:
    """The upstreams and model settings of a ``serve --config`` file."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised on Python 3.10 only
        import tomli as tomllib

    where = str(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise UsageError(f"cannot read the config {where}: {error.strerror}", "give an existing TOML file") from None
    except tomllib.TOMLDecodeError as error:
        raise UsageError(f"{where} is not valid TOML: {error}", "fix its syntax") from None
    unknown = set(data) - {"upstreams", "models"}
    if unknown:
        raise UsageError(f"{where}: unknown table {sorted(unknown)[0]!r}",
                         "the config holds [upstreams.NAME] and [models.NAME] tables")  # fmt: skip
    for table in ("upstreams", "models"):
        if not isinstance(data.get(table, {}), dict):
            raise UsageError(f"{where}: {table} must be tables", f"write [{table}.NAME] tables")
    upstreams = tuple(_upstream(where, name, table) for name, table in data.get("upstreams", {}).items())
    models = {name: _model(where, name, table) for name, table in data.get("models", {}).items()}
    return ServeConfig(upstreams, models)


def _upstream(where: str, name: str, table: Any) -> UpstreamConfig:
    at = f"{where}: [upstreams.{name}]"
    if not isinstance(table, dict):
        raise UsageError(f"{at} is not a table", 'write urls = ["http://host:port"] under it')
    unknown = set(table) - UPSTREAM_KEYS
    if unknown:
        raise UsageError(
            f"{at} has an unknown key {sorted(unknown)[0]!r}", f"known keys: {', '.join(sorted(UPSTREAM_KEYS))}"
        )
    urls = table.get("urls", [table["url"]] if "url" in table else [])
    if isinstance(urls, str):
        urls = [urls]
    if not urls or not all(isinstance(url, str) and url.startswith(("http://", "https://")) for url in urls):
        raise UsageError(f"{at} needs urls, a list of http(s) URLs", 'e.g. urls = ["http://10.0.0.5:8000"]')
    models = table.get("models", [])
    if not isinstance(models, list) or not all(isinstance(model, str) and model.strip() for model in models):
        raise UsageError(f"{at}: models must be a list of names", 'e.g. models = ["qwen2.5-72b"]')
    key_env = table.get("api_key_env")
    if key_env is not None and (not isinstance(key_env, str) or not key_env.strip()):
        raise UsageError(f"{at}: api_key_env must name an environment variable", 'e.g. api_key_env = "GPU_BOX_KEY"')
    times = {}
    for key, default in (("connect_timeout_s", DEFAULT_CONNECT_TIMEOUT_S), ("read_timeout_s", DEFAULT_READ_TIMEOUT_S),
                         ("health_interval_s", DEFAULT_HEALTH_INTERVAL_S)):  # fmt: skip
        value = table.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise UsageError(f"{at}: {key} must be a number of seconds above 0", f"e.g. {key} = {default:g}")
        times[key] = float(value)
    return UpstreamConfig(
        name=name, urls=tuple(url.rstrip("/").removesuffix("/v1") for url in urls),
        models=tuple(model.strip() for model in models), api_key_env=key_env, **times,
    )  # fmt: skip


def _model(where: str, name: str, table: Any) -> ModelConfig:
    at = f"{where}: [models.{name}]"
    if not isinstance(table, dict):
        raise UsageError(f"{at} is not a table", "write e.g. lookup = true under it")
    unknown = set(table) - MODEL_KEYS
    if unknown:
        known = ", ".join(sorted(MODEL_KEYS))
        raise UsageError(f"{at} has an unknown key {sorted(unknown)[0]!r}", f"known keys: {known}")
    draft = table.get("draft")
    if draft is not None and (not isinstance(draft, str) or not draft.strip()):
        raise UsageError(f"{at}: draft must name a model", 'e.g. draft = "qwen2.5:0.5b"')
    lookup = table.get("lookup", False)
    if not isinstance(lookup, bool):
        raise UsageError(f"{at}: lookup must be true or false", "e.g. lookup = true")
    if lookup and draft:
        raise UsageError(f"{at} has both lookup and draft, two ways to guess tokens", "keep one of them")
    numbers = {}
    for key, default, low in (("draft_max", DEFAULT_DRAFT_MAX, 1), ("draft_min", 0, 0)):
        value = table.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= MAX_DRAFT:
            raise UsageError(f"{at}: {key} must be a whole number from {low} to {MAX_DRAFT}", f"e.g. {key} = {default}")
        numbers[key] = value
    if numbers["draft_min"] > numbers["draft_max"]:
        raise UsageError(f"{at}: draft_min is more than draft_max", "lower draft_min")
    return ModelConfig(name, draft.strip() if draft else None, lookup, **numbers)
