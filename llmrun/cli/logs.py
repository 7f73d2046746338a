"""``llmrun logs``: the recent exchanges of `run` and `chat`, searchable."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from llmrun.cli.output import notice, print_json
from llmrun.settings import get_settings


def logs_command(
    count: Annotated[int, typer.Option("-n", "--count", min=0, help="How many, newest first; 0 for all.")] = 3,
    query: Annotated[str | None, typer.Option("-q", "--query", help="Only exchanges containing these words.")] = None,
    cid: Annotated[str | None, typer.Option("--cid", help="Only this conversation (id or name), in order.")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Show logged prompts and answers (full-text search with -q)."""
    from llmrun.logs import LogStore

    settings = get_settings()
    if not settings.logs_path.exists():
        if json_output:
            print_json([])
        else:
            notice("nothing logged yet: `llmrun run` and `llmrun chat` log every exchange")
        return
    store = LogStore(settings.logs_path)
    conversation = store.find_conversation(cid) if cid else None
    responses = store.responses(conversation_id=conversation, limit=count or None, query=query)
    if not cid:
        responses.reverse()  # oldest of the selection first, like a transcript
    if json_output:
        print_json([logged.to_dict() for logged in responses])
        return
    for logged in responses:
        exchange = logged.exchange
        name = f" ({logged.conversation_name})" if logged.conversation_name else ""
        sys.stdout.write(
            f"# {logged.created_at}  conversation {logged.conversation_id}{name}  model {exchange.model}\n\n"
            + (f"## System\n\n{exchange.system}\n\n" if exchange.system else "")
            + f"## Prompt\n\n{exchange.prompt}\n\n## Response\n\n{exchange.response}\n\n"
        )
