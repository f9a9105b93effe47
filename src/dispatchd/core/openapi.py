"""The OpenAPI document tells the truth about errors: every operation lists the RFC 9457 problem answers
it can give, as ``application/problem+json`` with one shared ``Problem`` schema.

FastAPI documents only the success answer and a 422 in its own shape. :func:`document_problems` adds,
after FastAPI built the document, to each operation:

* 400 (``MALFORMED_REQUEST``: a NUL in the URL; ``MALFORMED_JSON``: a body that is not UTF-8 JSON);
* 401 and 403 when it needs an API key (every ``/v1`` route except the webhooks, which declare their
  own signature answers, and ``GET /v1/stream``, which takes a stream token);
* 404 when its path names something (``{id}``);
* 409 when it changes state (POST, PATCH, PUT, DELETE): ``CONFLICT``, ``INVALID_STATE`` and the
  domain's refusals;
* 413 ``PAYLOAD_TOO_LARGE`` when it takes a body (``DISPATCHD_MAX_BODY_BYTES``);
* 422 ``VALIDATION_ERROR`` when it takes parameters or a body (replacing FastAPI's own 422 shape);

and turns every error answer a route declares itself (``responses={429: …}``) into problem+json.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

PROBLEM_JSON = "application/problem+json"
PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}

#: RFC 9457 §3.1 members plus the stable ``code`` extension (core.errors.problem)
PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "type": "object",
    "description": "RFC 9457 problem details. Clients branch on `code`, never on `detail`.",
    "required": ["type", "title", "status", "detail", "code"],
    "properties": {
        "type": {"type": "string", "description": "A URI naming the problem type"},
        "title": {"type": "string"},
        "status": {"type": "integer", "minimum": 400, "maximum": 599},
        "detail": {"type": "string", "description": "For humans; may change"},
        "code": {"type": "string", "description": "Stable, e.g. VALIDATION_ERROR, RESOURCE_FULL"},
        "instance": {"type": "string", "description": "The request path"},
        "request_id": {"type": ["string", "null"], "description": "Echoes X-Request-ID"},
    },
    "additionalProperties": True,
}

DESCRIPTIONS = {
    400: "MALFORMED_REQUEST (a NUL character in the URL) or MALFORMED_JSON (a body that is not UTF-8 "
    "JSON, or nested too deeply to read)",
    401: "UNAUTHORIZED: no API key, an unknown or a revoked one",
    403: "FORBIDDEN: this key's role or subject may not do this",
    404: "`<KIND>_NOT_FOUND`: what the path names does not exist",
    409: "CONFLICT, INVALID_STATE or a domain refusal (RESOURCE_FULL, AGENT_UNAVAILABLE, …): the current "
    "state forbids it",
    413: "PAYLOAD_TOO_LARGE: the body exceeds DISPATCHD_MAX_BODY_BYTES (answered before authentication)",
    422: "VALIDATION_ERROR: a parameter or the body breaks the schema (see `errors`)",
    429: "RATE_LIMITED or TOO_MANY_STREAMS: retry after the `Retry-After` seconds",
    503: "The service or this route is not ready or not configured",
}

#: answers of routes whose module does not declare them (the realtime package is owned elsewhere)
EXTRA: dict[tuple[str, str], dict[int, str]] = {
    ("get", "/ready"): {503: "Not ready: the database is unreachable, or the sweeper stalled or lags"},
    ("get", "/v1/stream"): {
        401: "UNAUTHORIZED, STREAM_TOKEN_INVALID, STREAM_TOKEN_EXPIRED or KEY_REVOKED",
        403: "FORBIDDEN: a topic this key or token may not read",
        429: "TOO_MANY_STREAMS: DISPATCHD_STREAM_MAX_PER_KEY streams are open for this key",
    },
}

STATE_CHANGING = {"post", "put", "patch", "delete"}
#: paths answered without an API key: probes, and routes with their own authentication
KEYLESS = ("/health", "/ready", "/metrics", "/v1/webhooks/", "/v1/stream")


def _needs_key(path: str) -> bool:
    return path.startswith("/v1/") and not any(
        path == prefix or (prefix.endswith("/") and path.startswith(prefix)) for prefix in KEYLESS
    )


def _problem(status: int, description: str | None = None) -> dict[str, Any]:
    return {
        "description": description or DESCRIPTIONS.get(status, "Error"),
        "content": {PROBLEM_JSON: {"schema": PROBLEM_REF}},
    }


def _document_operation(path: str, method: str, operation: dict[str, Any]) -> None:
    responses: dict[str, Any] = operation.setdefault("responses", {})
    for status, answer in list(responses.items()):  # errors the route declared: as problem+json
        if status[:1] in "45":
            described = answer.get("description")
            generic = described in (None, "", "Validation Error")
            responses[status] = _problem(int(status), None if generic else described)
    wanted = {400}
    if _needs_key(path):
        wanted |= {401, 403}
    if "{" in path:
        wanted.add(404)
    if method in STATE_CHANGING and path.startswith("/v1/") and _needs_key(path):
        wanted.add(409)
    if "requestBody" in operation:
        wanted |= {413, 422}
    if operation.get("parameters"):
        wanted.add(422)
    for status in sorted(wanted):
        responses.setdefault(str(status), _problem(status))
    for status, description in EXTRA.get((method, path), {}).items():
        responses.setdefault(str(status), _problem(status, description))


def document_problems(app: FastAPI) -> None:
    """Make ``app.openapi()`` document every operation's problem answers (see the module docstring)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        schema = build()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        if "Problem" not in components:
            components["Problem"] = PROBLEM_SCHEMA
            for path, item in schema.get("paths", {}).items():
                for method, operation in item.items():
                    if isinstance(operation, dict) and "responses" in operation:
                        _document_operation(path, method, operation)
            for unused in ("HTTPValidationError", "ValidationError"):
                components.pop(unused, None)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
