"""The log of every exchange of `run` and `chat`: a SQLite database under the data dir (stdlib sqlite3).

A conversation is a row in ``conversations``; each prompt and answer is a row in ``responses``
(with the model, system prompt, options, token counts and timings); ``responses_fts`` indexes
prompts and answers for ``llmrun logs -q``. ``/undo`` and ``/regen`` mark a response undone
rather than deleting it: the log stays a record, a continued conversation leaves it out.
``api_responses`` keeps the OpenAI Responses API's stored responses (the response object and
the conversation up to it), so ``previous_response_id`` works across server restarts.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from llmrun.errors import LlmrunError, ModelNotFound

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    name TEXT UNIQUE,
    model TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS responses (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id TEXT NOT NULL REFERENCES conversations(id),
    model TEXT NOT NULL,
    prompt TEXT NOT NULL,
    system TEXT,
    options TEXT NOT NULL,
    response TEXT NOT NULL,
    finish_reason TEXT,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    time_to_first_token_s REAL,
    generation_tokens_per_s REAL,
    undone INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS responses_conversation ON responses(conversation_id, id);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS api_responses (
    id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    response TEXT NOT NULL,
    conversation TEXT NOT NULL,
    created_at TEXT NOT NULL
);
"""
FTS_SCHEMA = """
CREATE VIRTUAL TABLE IF NOT EXISTS responses_fts USING fts5(prompt, response, content='responses', content_rowid='id');
CREATE TRIGGER IF NOT EXISTS responses_fts_insert AFTER INSERT ON responses BEGIN
    INSERT INTO responses_fts(rowid, prompt, response) VALUES (new.id, new.prompt, new.response);
END;
"""


@dataclass(frozen=True)
class Exchange:
    """One prompt and its answer, as logged."""

    model: str
    prompt: str
    system: str | None
    options: dict[str, Any]
    response: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token_s: float
    generation_tokens_per_s: float

    @classmethod
    def of(
        cls, model: str, prompt: str, system: str | None, sampling: Any, max_tokens: int | None, result: Any
    ) -> Exchange:
        """The record of one generation (``sampling`` a SamplingParams, ``result`` a GenerationResult)."""
        options = sampling.logged()
        if max_tokens:
            options["max_tokens"] = max_tokens
        return cls(
            model=model, prompt=prompt, system=system, options=options, response=result.text,
            finish_reason=result.finish_reason, prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens, time_to_first_token_s=result.time_to_first_token_s,
            generation_tokens_per_s=result.generation_tokens_per_s,
        )  # fmt: skip


@dataclass(frozen=True)
class LoggedResponse:
    id: int
    conversation_id: str
    conversation_name: str | None
    created_at: str
    exchange: Exchange

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "conversation_id": self.conversation_id,
            "conversation_name": self.conversation_name,
            "created_at": self.created_at,
            **self.exchange.__dict__,
        }


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class LogStore:
    """The log database; opened per operation, so several llmrun processes can log at once."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(self.path, timeout=10, isolation_level="IMMEDIATE")  # writers queue
        try:
            connection.executescript(SCHEMA)
            with suppress(sqlite3.OperationalError):  # an SQLite without FTS5: search falls back to LIKE
                connection.executescript(FTS_SCHEMA)
            with connection:
                yield connection
        except sqlite3.DatabaseError as error:
            raise LlmrunError(
                f"the log database {self.path} cannot be used: {error}", "move it away, or use --no-log"
            ) from None
        finally:
            connection.close()

    def log_id(self, create: bool = True) -> str | None:
        """This database's own id (made once): a client and a server that log to the same one log an exchange once.
        None when the database is not there and ``create`` is false."""
        if not create and not self.path.is_file():
            return None
        with self._connect() as db:
            db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('id', ?)", (uuid.uuid4().hex,))
            return str(db.execute("SELECT value FROM meta WHERE key = 'id'").fetchone()[0])

    def new_conversation(self, model: str) -> str:
        conversation_id = uuid.uuid4().hex[:12]
        with self._connect() as db:
            db.execute(
                "INSERT INTO conversations (id, model, created_at) VALUES (?, ?, ?)", (conversation_id, model, _now())
            )
        return conversation_id

    def log(self, conversation_id: str, exchange: Exchange) -> int:
        with self._connect() as db:
            cursor = db.execute(
                "INSERT INTO responses (conversation_id, model, prompt, system, options, response, finish_reason,"
                " prompt_tokens, completion_tokens, time_to_first_token_s, generation_tokens_per_s, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (conversation_id, exchange.model, exchange.prompt, exchange.system, json.dumps(exchange.options),
                 exchange.response, exchange.finish_reason, exchange.prompt_tokens, exchange.completion_tokens,
                 exchange.time_to_first_token_s, exchange.generation_tokens_per_s, _now()),
            )  # fmt: skip
            return int(cursor.lastrowid or 0)

    def save_api_response(self, response: dict[str, Any], conversation: list[dict[str, Any]]) -> None:
        """Keep a Responses API response, and the conversation up to and including it."""
        with self._connect() as db:
            db.execute(
                "INSERT OR REPLACE INTO api_responses (id, model, response, conversation, created_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (response["id"], response.get("model", ""), json.dumps(response, ensure_ascii=False),
                 json.dumps(conversation, ensure_ascii=False), _now()),
            )  # fmt: skip

    def api_response(self, response_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        """A stored Responses API response and its conversation, or None."""
        with self._connect() as db:
            row = db.execute("SELECT response, conversation FROM api_responses WHERE id = ?", (response_id,)).fetchone()
        return (json.loads(row[0]), json.loads(row[1])) if row else None

    def delete_api_response(self, response_id: str) -> bool:
        with self._connect() as db:
            return db.execute("DELETE FROM api_responses WHERE id = ?", (response_id,)).rowcount > 0

    def undo_last(self, conversation_id: str) -> None:
        with self._connect() as db:
            db.execute(
                "UPDATE responses SET undone = 1 WHERE id = (SELECT MAX(id) FROM responses"
                " WHERE conversation_id = ? AND undone = 0)",
                (conversation_id,),
            )

    def name_conversation(self, conversation_id: str, name: str) -> None:
        with self._connect() as db:
            db.execute("UPDATE conversations SET name = NULL WHERE name = ?", (name,))
            db.execute("UPDATE conversations SET name = ? WHERE id = ?", (name, conversation_id))

    def find_conversation(self, id_or_name: str) -> str:
        with self._connect() as db:
            row = db.execute(
                "SELECT id FROM conversations WHERE id = ? OR name = ?", (id_or_name, id_or_name)
            ).fetchone()
        if row is None:
            raise ModelNotFound(f"no conversation {id_or_name!r} in the log", "see `llmrun logs` for ids")
        return str(row[0])

    def latest_conversation(self) -> str | None:
        with self._connect() as db:
            row = db.execute("SELECT conversation_id FROM responses ORDER BY id DESC LIMIT 1").fetchone()
        return str(row[0]) if row else None

    def responses(
        self, *, conversation_id: str | None = None, limit: int | None = None, query: str | None = None,
        include_undone: bool = True,
    ) -> list[LoggedResponse]:  # fmt: skip
        """Responses, newest first (or, for one conversation without a limit, in order)."""
        where, params = ["1 = 1"], []
        if conversation_id:
            where.append("r.conversation_id = ?")
            params.append(conversation_id)
        if not include_undone:
            where.append("r.undone = 0")
        with self._connect() as db:
            if query:
                if _has_fts(db):
                    where.append("r.id IN (SELECT rowid FROM responses_fts WHERE responses_fts MATCH ?)")
                    params.append(_fts_query(query))
                else:
                    where.append("(r.prompt LIKE ? OR r.response LIKE ?)")
                    params += [f"%{query}%", f"%{query}%"]
            order = "ASC" if conversation_id and limit is None else "DESC"
            sql = (
                "SELECT r.id, r.conversation_id, c.name, r.created_at, r.model, r.prompt, r.system, r.options,"
                " r.response, r.finish_reason, r.prompt_tokens, r.completion_tokens, r.time_to_first_token_s,"
                " r.generation_tokens_per_s FROM responses r JOIN conversations c ON c.id = r.conversation_id"
                f" WHERE {' AND '.join(where)} ORDER BY r.id {order}"
            )
            if limit is not None:
                sql += f" LIMIT {int(limit)}"
            rows = db.execute(sql, params).fetchall()
        return [
            LoggedResponse(row[0], row[1], row[2], row[3], Exchange(row[4], row[5], row[6], json.loads(row[7]),
                           row[8], row[9] or "", row[10] or 0, row[11] or 0, row[12] or 0.0, row[13] or 0.0))
            for row in rows
        ]  # fmt: skip


def _has_fts(db: sqlite3.Connection) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE name = 'responses_fts'").fetchone() is not None


def _fts_query(text: str) -> str:
    """Plain words, each quoted, so user text is never parsed as FTS syntax."""
    return " ".join('"' + word.replace('"', '""') + '"' for word in text.split())
