"""HTTP plumbing shared by every route: the request context middleware and the RFC 9457 problem+json
error handlers (RFC 9457 "Problem Details for HTTP APIs"; OWASP secure headers)."""

from __future__ import annotations

import json
import time
import uuid

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dispatchd.core.errors import DispatchdError, problem
from dispatchd.core.logging import get_logger

log = get_logger("dispatchd.http")

PROBLEM_JSON = "application/problem+json"

SECURITY_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-resource-policy", b"same-origin"),
)


class RequestContext:
    """Pure ASGI middleware: a request id per request (``X-Request-ID`` in and out), bound to every log
    line, one access log line, and the security headers (OWASP secure headers: nosniff, DENY framing,
    no referrer, same-origin resources)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if "\x00" in scope["path"] or b"%00" in scope.get("query_string", b""):
            await _refuse_nul(scope, send)
            return
        headers = dict(scope.get("headers") or ())
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")[:200] or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id)
        started = time.perf_counter()
        status = 500

        async def send_with_headers(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [
                    *message["headers"],
                    (b"x-request-id", request_id.encode("latin-1")),
                    *SECURITY_HEADERS,
                ]
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            log.info(
                "request",
                method=scope["method"],
                path=scope["path"],
                status=status,
                duration_ms=round((time.perf_counter() - started) * 1000, 2),
            )


async def _refuse_nul(scope, send) -> None:
    """A NUL character in the path or query: refused before routing (no database can store one)."""
    body = json.dumps(
        problem(
            status=400,
            code="MALFORMED_REQUEST",
            title="Malformed request",
            detail="the URL contains a NUL character",
            instance=scope["path"].replace("\x00", ""),
        )
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 400,
            "headers": [(b"content-type", PROBLEM_JSON.encode()), *SECURITY_HEADERS],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _problem_response(
    request: Request, status: int, code: str, title: str, detail: str, headers: dict | None = None, **extra
) -> JSONResponse:
    body = problem(
        status=status,
        code=code,
        title=title,
        detail=detail,
        instance=request.url.path,
        request_id=getattr(request.state, "request_id", None),
        **extra,
    )
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def install_problem_handlers(app: FastAPI) -> None:
    """Answer every error as RFC 9457 problem+json: domain errors with their code, invalid input as
    400 MALFORMED_JSON / 422 VALIDATION_ERROR, routing errors by status, anything else as 500
    INTERNAL_ERROR (logged with its traceback, never shown)."""

    @app.exception_handler(DispatchdError)
    async def _domain_error(request: Request, exc: DispatchdError) -> JSONResponse:
        return _problem_response(
            request, exc.status, exc.code, exc.title, exc.detail, headers=exc.headers, **exc.extra
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(error.get("type") == "json_invalid" for error in errors):
            return _problem_response(
                request, 400, "MALFORMED_JSON", "Malformed JSON", "the request body is not valid JSON"
            )
        details = [
            {
                "loc": [str(part) for part in error.get("loc", ())],
                "msg": error.get("msg", ""),
                "type": error.get("type"),
            }
            for error in errors
        ]
        summary = "; ".join(f"{'.'.join(d['loc'])}: {d['msg']}" for d in details[:5])
        return _problem_response(request, 422, "VALIDATION_ERROR", "Invalid input", summary, errors=details)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 401: "UNAUTHORIZED", 403: "FORBIDDEN"}
        code = codes.get(exc.status_code, f"HTTP_{exc.status_code}")
        detail = exc.detail if isinstance(exc.detail, str) else code
        return _problem_response(request, exc.status_code, code, code.replace("_", " ").capitalize(), detail)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", path=request.url.path)
        return _problem_response(
            request,
            500,
            "INTERNAL_ERROR",
            "Internal error",
            "an unexpected error occurred; see the server log",
        )
