"""The failure table of :mod:`dispatchd.notifications.classify`, code by code (the issue's table)."""

from __future__ import annotations

from datetime import UTC, datetime

import httpx
import pytest

from dispatchd.notifications.channels.base import Classification, ErrorKind
from dispatchd.notifications.classify import (
    classify_http,
    classify_transport,
    classify_wachap,
    parse_retry_after,
)

T, P, A, W, U = (
    ErrorKind.TEMPORARY,
    ErrorKind.PERMANENT,
    ErrorKind.ALERT,
    ErrorKind.WINDOW_CLOSED,
    ErrorKind.UNKNOWN,
)


def meta(code: int | str, message: str = "boom") -> dict:
    return {"error": {"message": f"(#{code}) {message}", "type": "OAuthException", "code": code}}


# (Meta code, kind, opens_circuit): every code the issue lists, plus the boundaries around the ranges
META_CASES = [
    (1, T, False),
    (2, T, False),
    (4, T, False),
    (80007, T, False),
    (130429, T, False),
    (131000, T, False),
    (131016, T, False),
    (131056, T, False),
    (131057, T, False),
    (100, P, False),
    (131008, P, False),
    (131009, P, False),
    (131026, P, False),
    (131050, P, False),
    (132000, P, False),
    (132005, P, False),
    (132016, P, False),
    (0, A, True),
    (3, A, False),
    (10, A, False),
    (190, A, True),
    (200, A, False),
    (250, A, False),
    (299, A, False),
    (368, A, False),
    (131031, A, True),
    (131042, A, True),
    (131047, W, False),
    (132017, U, False),
    (131999, U, False),
    (199, U, False),
    (300, U, False),
    (5, U, False),
    (999999, U, False),
]


@pytest.mark.parametrize(
    ("code", "kind", "opens_circuit"), META_CASES, ids=[f"meta-{c[0]}" for c in META_CASES]
)
def test_meta_code(code: int, kind: ErrorKind, opens_circuit: bool) -> None:
    # HTTP 400 is what Graph answers for most errors: the Meta code must win over it
    assert classify_http(400, meta(code)) == Classification(kind, f"META_{code}", None, opens_circuit)


HTTP_CASES = [
    (429, T, False),
    (502, T, False),
    (503, T, False),
    (400, P, False),
    (401, A, True),
    (403, A, True),
    (500, U, False),
    (418, U, False),
    (404, U, False),
    (504, U, False),
]


@pytest.mark.parametrize(
    ("status", "kind", "opens_circuit"), HTTP_CASES, ids=[f"http-{c[0]}" for c in HTTP_CASES]
)
@pytest.mark.parametrize("body", [None, "<html>Bad Gateway</html>", {"error": {"message": "no code"}}, {}])
def test_http_status_without_meta_code(
    status: int, kind: ErrorKind, opens_circuit: bool, body: object
) -> None:
    assert classify_http(status, body) == Classification(kind, f"HTTP_{status}", None, opens_circuit)


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (500, meta(131000), Classification(T, "META_131000")),
        (503, meta(123456), Classification(U, "META_123456")),  # unknown Meta code: UNKNOWN, not the status
        (401, meta(190), Classification(A, "META_190", opens_circuit=True)),
        (
            400,
            '{"error": {"code": 131047, "message": "(#131047) Re-engagement"}}',
            Classification(W, "META_131047"),
        ),
        (400, b'{"error": {"code": 131026}}', Classification(P, "META_131026")),
        (400, meta("131047"), Classification(W, "META_131047")),  # a code sent as a string
        (400, {"error": {"code": True}}, Classification(P, "HTTP_400")),  # not a code
    ],
)
def test_meta_code_decides_over_the_status_whatever_the_body_form(
    status: int, body: object, expected: Classification
) -> None:
    assert classify_http(status, body) == expected


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (httpx.ReadTimeout("slow"), "TIMEOUT"),
        (httpx.ConnectTimeout("slow"), "TIMEOUT"),
        (httpx.PoolTimeout("slow"), "TIMEOUT"),
        (TimeoutError(), "TIMEOUT"),
        (httpx.ConnectError("refused"), "CONNECTION"),
        (httpx.RemoteProtocolError("peer closed"), "CONNECTION"),
        (httpx.ReadError("reset"), "CONNECTION"),
        (ConnectionRefusedError(), "CONNECTION"),
        (OSError("network unreachable"), "CONNECTION"),
    ],
)
def test_transport_failures_are_temporary(exc: Exception, code: str) -> None:
    assert classify_transport(exc) == Classification(T, code)


def test_an_unexpected_exception_is_unknown() -> None:
    assert classify_transport(ValueError("bug")) == Classification(U, "EXCEPTION")


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "7"}, 7.0),
        ({"retry-after": "0"}, 0.0),
        (httpx.Headers({"RETRY-AFTER": "120"}), 120.0),
        ({"Retry-After": "later"}, None),
        ({"Retry-After": "-3"}, None),
        ({}, None),
        (None, None),
    ],
)
def test_retry_after_seconds_header(headers, expected: float | None) -> None:
    assert classify_http(429, None, headers).retry_after_s == expected
    assert classify_http(400, meta(130429), headers).retry_after_s == expected


def test_retry_after_http_date() -> None:
    now = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("Wed, 01 May 2024 12:01:30 GMT", now=now) == 90.0
    assert parse_retry_after("Wed, 01 May 2024 11:00:00 GMT", now=now) == 0.0  # already past
    assert parse_retry_after("Wed, 41 Foo 2024 99:00:00 GMT", now=now) is None


def test_retry_after_http_date_relative_to_the_clock() -> None:
    far_future = httpx.Headers({"Retry-After": "Fri, 01 Jan 2100 00:00:00 GMT"})
    assert classify_http(503, None, far_future).retry_after_s > 0


def wachap_error(message: str | None = None) -> dict:
    return {"status": "error"} if message is None else {"status": "error", "message": message}


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (200, wachap_error("Invalid access token"), Classification(A, "WACHAP_ERROR", None, True)),
        (200, wachap_error("Unauthorized"), Classification(A, "WACHAP_ERROR", None, True)),
        (200, wachap_error("Authentication failed"), Classification(A, "WACHAP_ERROR", None, True)),
        (200, wachap_error("Your subscription has expired"), Classification(A, "WACHAP_ERROR", None, True)),
        (200, wachap_error("Invalid number"), Classification(P, "WACHAP_ERROR")),
        (200, wachap_error("Number not registered on WhatsApp"), Classification(P, "WACHAP_ERROR")),
        (200, wachap_error("Phone number not exists"), Classification(P, "WACHAP_ERROR")),
        (200, wachap_error("Instance is busy"), Classification(U, "WACHAP_ERROR")),
        (200, wachap_error(), Classification(U, "WACHAP_ERROR")),
        (200, "<html>oops</html>", Classification(U, "WACHAP_ERROR")),
        (503, wachap_error("Invalid access token"), Classification(T, "HTTP_503")),
        (401, None, Classification(A, "HTTP_401", None, True)),
        (400, wachap_error("bad"), Classification(P, "HTTP_400")),
        (500, None, Classification(U, "HTTP_500")),
    ],
)
def test_wachap(status: int, body: object, expected: Classification) -> None:
    assert classify_wachap(status, body) == expected


def test_wachap_retry_after() -> None:
    assert classify_wachap(429, None, {"Retry-After": "3"}) == Classification(T, "HTTP_429", 3.0)
