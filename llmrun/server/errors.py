"""The one place a server error becomes a response: Anthropic's shape under /v1/messages, OpenAI's under the rest
of /v1, Ollama's under /api."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from llmrun.errors import LlmrunError, ModelNotFound, PromptTooLong


class Unauthorized(LlmrunError):
    http_status = 401


def _status(error: BaseException) -> int:
    if isinstance(error, LlmrunError):
        return error.http_status
    if isinstance(error, HTTPException):
        return error.status_code
    if isinstance(error, RequestValidationError):
        return 400
    return 500


def _message(error: BaseException) -> str:
    if isinstance(error, RequestValidationError):
        problems = []
        for problem in error.errors()[:3]:
            where = ".".join(str(part) for part in problem.get("loc", ()) if part != "body")
            problems.append(f"{where}: {problem.get('msg')}" if where else str(problem.get("msg")))
        return "invalid request: " + "; ".join(problems)
    if isinstance(error, HTTPException):
        return str(error.detail)
    if isinstance(error, LlmrunError):
        return str(error)
    return f"internal error: {type(error).__name__}: {error}"


def _param(error: BaseException) -> str | None:
    if isinstance(error, RequestValidationError) and error.errors():
        location = [str(part) for part in error.errors()[0].get("loc", ()) if part != "body"]
        return ".".join(location) or None
    return getattr(error, "param", None)


def openai_error_body(error: BaseException) -> dict[str, Any]:
    status = _status(error)
    code: str | None = None
    kind = "invalid_request_error"
    if isinstance(error, ModelNotFound):
        code = "model_not_found"
    elif isinstance(error, PromptTooLong):
        code = "context_length_exceeded"
    elif status == 401:
        kind, code = "authentication_error", "invalid_api_key"
    elif status == 503:
        kind, code = "server_error", "server_overloaded"
    elif status >= 500:
        kind = "server_error"
    elif status == 404:
        code = "not_found"
    return {"error": {"message": _message(error), "type": kind, "param": _param(error), "code": code}}


_ANTHROPIC_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
    413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error",
}  # fmt: skip


def anthropic_error_body(error: BaseException) -> dict[str, Any]:
    status = _status(error)
    kind = _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": _message(error)}}


def error_response(request: Request, error: BaseException) -> JSONResponse:
    status = _status(error)
    headers = {}
    retry_after = getattr(error, "retry_after_s", None)
    if status == 503 and retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if request.url.path.startswith("/v1/messages") or "anthropic-version" in request.headers:
        return JSONResponse(anthropic_error_body(error), status_code=status, headers=headers)
    if request.url.path.startswith("/v1"):
        return JSONResponse(openai_error_body(error), status_code=status, headers=headers)
    return JSONResponse({"error": _message(error)}, status_code=status, headers=headers)


def install(app: FastAPI) -> None:
    """Route every error through ``error_response``."""

    async def handle(request: Request, error: Exception) -> JSONResponse:
        return error_response(request, error)

    from llmrun.server.transport import ClientGone, client_gone_response

    app.add_exception_handler(ClientGone, client_gone_response)
    app.add_exception_handler(LlmrunError, handle)
    app.add_exception_handler(RequestValidationError, handle)
    app.add_exception_handler(HTTPException, handle)
    app.add_exception_handler(Exception, handle)
