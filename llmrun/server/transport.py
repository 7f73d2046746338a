"""HTTP plumbing shared by every API: streamed answers that end when the client goes, and answers not worth finishing.

A client that disconnects must free its slot at once, streamed or not. Starlette stops
sending to a gone client but leaves the body generator suspended until garbage
collection; ``EventStream`` closes it, which closes the ``Stream`` under it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

from fastapi import Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.types import Receive, Scope, Send

T = TypeVar("T")

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before the answer
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class Lenient(BaseModel):
    """A request body part that ignores fields it does not know, as the APIs llmrun speaks do."""

    model_config = ConfigDict(extra="allow")


class EventStream(StreamingResponse):
    """A streamed response (SSE or NDJSON) whose body generator is closed however the response ends."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                await close()


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it if the client disconnects first (so a non-streamed answer frees its slot)."""
    task: asyncio.Future[Any] = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher: asyncio.Future[Any] = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # the server is stopping: take the work down with us
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise ClientGone
    result: T = task.result()
    return result


def client_gone_response(_request: Request, _error: Any) -> Response:
    return Response(status_code=CLIENT_CLOSED_REQUEST)
