"""Every path, environment variable and default of llmrun, read in one place."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path


@dataclass(frozen=True)
class EnvVar:
    """An environment variable llmrun reads, with its default and help text."""

    name: str
    default: str
    help: str


ENV_VARS: tuple[EnvVar, ...] = (
    EnvVar("LLMRUN_HOME", "platform user data dir", "Where models and the store live."),
    EnvVar(
        "LLMRUN_HF_CACHE",
        "LLMRUN_HOME/hub",
        "A Hugging Face cache to pull into and reuse (e.g. ~/.cache/huggingface/hub).",
    ),
    EnvVar("LLMRUN_THREADS", "physical cores", "CPU threads for generation."),
    EnvVar("LLMRUN_GPU_LAYERS", "auto", "Layers to offload: a number, or auto (all on GPU builds)."),
    EnvVar("LLMRUN_HOST", "127.0.0.1:11435", "Where `serve` listens, and the server `ps` and `stop` talk to."),
    EnvVar(
        "LLMRUN_SERVER",
        "",
        "`run` and `chat` send requests to this server (a URL, or auto: the local `llmrun serve` when one runs).",
    ),
    EnvVar("LLMRUN_API_KEY", "", "A key `serve` requires of every request (and `ps` and `stop` send)."),
    EnvVar(
        "LLMRUN_AMX",
        "0",
        "1 lets llama.cpp use AMX on CPUs that have it (off by default: its AMX kernels crashed here).",
    ),
    EnvVar("LLMRUN_DEBUG", "0", "1 shows tracebacks and llama.cpp's own log lines."),
    EnvVar("NO_COLOR", "", "Any value turns colour off."),
)

APP_NAME = "llmrun"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})  # binding elsewhere lets other machines in
DEFAULT_MODEL = "smollm2"
# KV cache may take at most this share of available memory when the context is
# sized automatically; the rest is for the weights, compute buffers and the OS.
KV_CACHE_MEMORY_SHARE = 0.5
MIN_AUTO_CONTEXT = 512

# llama.cpp's defaults (common/common.h), but for the repeat penalty: 1.1 as in Ollama,
# which keeps small models out of loops.
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_K = 40
DEFAULT_TOP_P = 0.95
DEFAULT_MIN_P = 0.05
DEFAULT_REPEAT_PENALTY = 1.1
DEFAULT_REPEAT_LAST_N = 64
DEFAULT_DRAFT_MAX = 16  # speculative decoding: most tokens guessed at once
DEFAULT_STREAM_INTERVAL_MS = 20  # serve: running answers' new text is sent 50 times a second (see EngineWorker)
KV_CACHE_TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")  # as llama.cpp's --cache-type-k


@dataclass(frozen=True)
class Settings:
    """Resolved settings for one process."""

    home: Path
    threads: int | None
    gpu_layers: str
    debug: bool
    default_model: str
    no_log: bool
    hf_cache: Path | None  # LLMRUN_HF_CACHE: a shared Hugging Face cache, never pruned by llmrun
    host: tuple[str, int] = ("127.0.0.1", 11435)  # LLMRUN_HOST
    api_key: str | None = None  # LLMRUN_API_KEY
    server: str | None = None  # LLMRUN_SERVER: where run and chat send requests (a URL, or auto)
    amx: bool = False  # LLMRUN_AMX: let llama.cpp use AMX (see machine.refuse_amx)

    @property
    def logs_path(self) -> Path:
        return self.home / "logs.db"

    @property
    def history_path(self) -> Path:
        """Chat input history, in the platform's state dir (beside the store when LLMRUN_HOME is set)."""
        if os.environ.get("LLMRUN_HOME", "").strip():
            return self.home / "chat_history"
        from platformdirs import user_state_path

        return user_state_path(APP_NAME, appauthor=False) / "chat_history"

    @property
    def user_catalog_path(self) -> Path:
        """The user's own catalog entries, laid over the shipped catalog (beside the store when LLMRUN_HOME is set)."""
        if os.environ.get("LLMRUN_HOME", "").strip():
            return self.home / "models.toml"
        from platformdirs import user_config_path

        return user_config_path(APP_NAME, appauthor=False) / "models.toml"

    @property
    def hub_cache(self) -> Path:
        """Where Hub downloads go: the shared cache if set, else our own under the home."""
        return self.hf_cache or self.home / "hub"


def _default_home() -> Path:
    # platformdirs costs ~15 ms to import; only pay it when LLMRUN_HOME is unset.
    from platformdirs import user_data_path

    return user_data_path(APP_NAME, appauthor=False)


def env_flag(value: str | None) -> bool:
    """True for 1, true, yes, on (any case)."""
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        number = int(value)
    except ValueError:
        from llmrun.errors import UsageError

        raise UsageError(f"{name}={value!r} is not a whole number", f"unset {name} or set it to e.g. 4") from None
    return number


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Read the environment once per process."""
    home_env = os.environ.get("LLMRUN_HOME", "").strip()
    home = Path(home_env).expanduser() if home_env else _default_home()
    return Settings(
        home=home.resolve(),
        threads=_env_int("LLMRUN_THREADS"),
        gpu_layers=os.environ.get("LLMRUN_GPU_LAYERS", "").strip() or "auto",
        debug=env_flag(os.environ.get("LLMRUN_DEBUG")),
        default_model=os.environ.get("LLMRUN_DEFAULT_MODEL", "").strip() or DEFAULT_MODEL,
        no_log=env_flag(os.environ.get("LLMRUN_NO_LOG")),
        hf_cache=Path(hf_cache).expanduser().resolve()
        if (hf_cache := os.environ.get("LLMRUN_HF_CACHE", "").strip())
        else None,
        host=_host_port(os.environ.get("LLMRUN_HOST", "")),
        api_key=os.environ.get("LLMRUN_API_KEY", "").strip() or None,
        server=os.environ.get("LLMRUN_SERVER", "").strip() or None,
        amx=env_flag(os.environ.get("LLMRUN_AMX")),
    )


def _host_port(value: str) -> tuple[str, int]:
    """``LLMRUN_HOST``: ``host``, ``host:port``, ``:port`` or ``http://host:port``."""
    text = value.strip().removeprefix("http://").rstrip("/")
    if not text:
        return ("127.0.0.1", 11435)
    host, sep, port = text.rpartition(":") if text.count(":") == 1 or text.startswith("[") else ("", "", "")
    if not sep:
        return (text, 11435)
    try:
        return (host.strip("[]") or "127.0.0.1", int(port))
    except ValueError:
        from llmrun.errors import UsageError

        raise UsageError(f"LLMRUN_HOST={value!r} has no valid port", "write e.g. 127.0.0.1:11435") from None
