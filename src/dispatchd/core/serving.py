"""What ``dispatchd serve`` adds to uvicorn against connections that never finish a request.

uvicorn 0.54 has a keep-alive timeout (idle between requests) and ``limit_concurrency``, but no timeout
for reading a request's headers: a socket that connects and sends nothing, or sends its headers a byte a
minute (slowloris), is kept open for ever, holding a file descriptor. :class:`HeaderTimeoutProtocol`
closes such a connection after ``header_timeout_s`` seconds. A slow *body* is not timed here: put nginx
in front (``client_body_timeout``, docs/operations.md). Source: OWASP API4:2023 (unrestricted resource
consumption); CWE-400.
"""

from __future__ import annotations

import gc
import resource
from asyncio import TimerHandle

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from dispatchd.core.logging import get_logger

log = get_logger("dispatchd.serving")

#: below this many open files, a warning at start (each connection holds one)
LOW_FILE_LIMIT = 4096


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, closing a connection whose request headers are not complete
    ``header_timeout_s`` seconds after it opened (or after its next request began)."""

    header_timeout_s: float = 10.0

    _header_timer: TimerHandle | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_header_timer()

    def on_headers_complete(self) -> None:
        self._disarm_header_timer()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()


def raise_file_limit() -> int:
    """Raise the soft limit of open files (RLIMIT_NOFILE) to the hard limit; return the new soft limit,
    warning when it stays below :data:`LOW_FILE_LIMIT`."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 65_536)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft < LOW_FILE_LIMIT:
        log.warning(
            "the open-file limit is low: each connection holds one; raise it (ulimit -n, LimitNOFILE=)",
            limit=soft,
            recommended=LOW_FILE_LIMIT,
        )
    return soft


def tune_garbage_collector() -> None:
    """Make CPython's full collections rare for a long-running server: everything alive once the app is
    built is moved out of the collector's sight (``gc.freeze``), and the youngest generation is collected
    every 50,000 allocations instead of 700.

    Why: with 10,000 open streams a full collection walks millions of objects and paused the server up
    to 2 s, which set the realtime fan-out's p99 (docs/benchmarks.md, "Realtime"). Young garbage is still
    collected; only the cadence changes (the approach Instagram described for its Django servers)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def share_rate(rate: str | None, processes: int) -> str | None:
    """One process's share of a drain rate in ``limits`` syntax: ``share_rate("80/second", 3)`` →
    ``"26 per 1 second"`` (rounded down, at least 1), so that ``processes`` processes together stay
    within ``rate``. ``None`` or ``""`` (no limit) and one process: ``rate`` unchanged.

    Why: each process keeps its own limiter in memory (``notifications.delivery.Lane``), so N processes
    each draining ``DISPATCHD_CHANNEL_RATE`` would send N times Meta's allowance."""
    if not rate or processes <= 1:
        return rate
    from limits import parse

    item = parse(rate)
    return f"{max(1, item.amount // processes)} per {item.multiples} {item.GRANULARITY.name}"
