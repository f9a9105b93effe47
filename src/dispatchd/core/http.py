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
from starlette.routing import Match

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


class BodyLimit:
    """Pure ASGI middleware: request bodies capped before anything reads them (OWASP API4:2023,
    unrestricted resource consumption).

    A ``Content-Length`` over the limit is answered 413 PAYLOAD_TOO_LARGE (problem+json) at once, before
    the application runs (so before authentication). A body without one (chunked) is counted as it
    streams: the chunk that crosses the limit gets the same 413, and the application then sees the
    client disconnect (what it sends afterwards is dropped). Nothing beyond the limit is buffered; the
    server closes the connection without reading the rest. ``limits`` maps path prefixes to their own
    limit (the first that matches wins; the webhook's). WebSocket and lifespan scopes pass through."""

    def __init__(self, app, max_bytes: int, limits: dict[str, int] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.limits = tuple((limits or {}).items())

    def limit_for(self, path: str) -> int:
        """The limit in bytes of a request to ``path``."""
        return next((limit for prefix, limit in self.limits if path.startswith(prefix)), self.max_bytes)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _send_too_large(scope, send, limit)
            return
        received = 0
        refused = False
        response_started = False

        async def limited_receive():
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    refused = True
                    if not response_started:
                        await _send_too_large(scope, send, limit)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message) -> None:
            nonlocal response_started
            if refused:
                return  # the 413 is the answer
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        await self.app(scope, limited_receive, guarded_send)


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers") or ():
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _send_too_large(scope, send, limit: int) -> None:
    await _send_problem(
        send,
        problem(
            status=413,
            code="PAYLOAD_TOO_LARGE",
            title="Payload too large",
            detail=f"the request body exceeds {limit} bytes",
            instance=scope["path"],
            limit_bytes=limit,
        ),
        extra_headers=[(b"connection", b"close")],
    )


async def _send_problem(send, body: dict, extra_headers: list | None = None) -> None:
    """Answer a problem object from a middleware, before any route runs."""
    encoded = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": body["status"],
            "headers": [
                (b"content-type", PROBLEM_JSON.encode()),
                (b"content-length", str(len(encoded)).encode()),
                *(extra_headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": encoded})


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


def _allowed_methods(request: Request) -> str:
    """Every method some route serves at this path (Starlette's 405 names only the first route's),
    found by asking each route whether it fully matches the path with that method."""
    allowed = [
        method
        for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
        if any(
            route.matches({**request.scope, "method": method})[0] is Match.FULL
            for route in request.app.router.routes
        )
    ]
    return ", ".join(allowed)


def install_problem_handlers(app: FastAPI) -> None:
    """Answer every error as RFC 9457 problem+json: domain errors with their code, invalid input as
    400 MALFORMED_JSON / 422 VALIDATION_ERROR (also a body that is not UTF-8, or so deep that it raises
    ``RecursionError``), routing errors by status (a 405 with its ``Allow`` header), anything else as 500
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
        if exc.status_code == 400:  # FastAPI could not read the body (not UTF-8, not decodable)
            return _problem_response(
                request, 400, "MALFORMED_JSON", "Malformed JSON", "the request body is not valid UTF-8 JSON"
            )
        codes = {
            404: "NOT_FOUND",
            405: "METHOD_NOT_ALLOWED",
            401: "UNAUTHORIZED",
            403: "FORBIDDEN",
            413: "PAYLOAD_TOO_LARGE",
        }
        code = codes.get(exc.status_code, f"HTTP_{exc.status_code}")
        detail = exc.detail if isinstance(exc.detail, str) else code
        # exc.headers carries what the status needs (RFC 9110 §15.5.6: a 405 names the methods in Allow)
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = _allowed_methods(request) or headers.get("Allow", "")
        return _problem_response(
            request,
            exc.status_code,
            code,
            code.replace("_", " ").capitalize(),
            detail,
            headers=headers or None,
        )

    @app.exception_handler(RecursionError)
    async def _too_deep(request: Request, exc: RecursionError) -> JSONResponse:
        log.warning("input nested too deeply", path=request.url.path)  # no traceback: nothing to debug
        return _problem_response(
            request, 400, "MALFORMED_JSON", "Malformed JSON", "the request body is nested too deeply"
        )

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
