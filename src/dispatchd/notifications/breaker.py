"""A circuit breaker per channel (Nygard, "Release It!", ch. 5; the issue's "never hammering").

CLOSED: messages flow. OPEN (after an auth failure, or when at least ``min_samples`` of the last
``window`` sends include ``failure_rate`` failures): nothing is claimed, so no attempt is burned, until
``open_until``. The window (50 sends, at least 20, 50 %) is wide enough that 20 % random transient
failures do not open it (P(≥ 25 of 50) ≈ 10⁻⁵ per window), while a dead provider opens it after 20
sends. HALF_OPEN: one probe message is sent; success closes the circuit, failure re-opens it for twice
as long (up to ``max_cooldown_s``). Times come from the injectable clock.
"""

from __future__ import annotations

from collections import deque
from datetime import datetime, timedelta
from enum import StrEnum

from dispatchd.core import metrics
from dispatchd.core.clock import Clock
from dispatchd.core.logging import get_logger

log = get_logger("dispatchd.notifications.breaker")


class CircuitState(StrEnum):
    CLOSED = "CLOSED"
    OPEN = "OPEN"
    HALF_OPEN = "HALF_OPEN"


class CircuitBreaker:
    def __init__(
        self,
        channel: str,
        clock: Clock,
        *,
        window: int = 50,
        min_samples: int = 20,
        failure_rate: float = 0.5,
        cooldown_s: float = 30.0,
        max_cooldown_s: float = 600.0,
    ) -> None:
        self.channel = channel
        self.clock = clock
        self.window: deque[bool] = deque(maxlen=window)
        self.min_samples = min_samples
        self.failure_rate = failure_rate
        self.base_cooldown_s = cooldown_s
        self.cooldown_s = cooldown_s
        self.max_cooldown_s = max_cooldown_s
        self.state = CircuitState.CLOSED
        self.open_until: datetime | None = None
        self.reason: str | None = None
        self.opened_at: datetime | None = None
        metrics.CIRCUIT_STATE.labels(channel).set(0)

    def allowance(self) -> int | None:
        """How many messages may be claimed now: None = no limit, 1 = a probe, 0 = none."""
        if self.state is CircuitState.OPEN:
            if self.open_until is not None and self.clock.now() >= self.open_until:
                self.state = CircuitState.HALF_OPEN
                metrics.CIRCUIT_STATE.labels(self.channel).set(2)
                log.info("circuit half-open: probing", channel=self.channel)
            else:
                return 0
        return 1 if self.state is CircuitState.HALF_OPEN else None

    @property
    def is_probing(self) -> bool:
        return self.state is CircuitState.HALF_OPEN

    def record(self, ok: bool, *, opens: bool = False, reason: str | None = None) -> None:
        """Record one send outcome; ``opens`` (an auth failure) opens the circuit at once."""
        if self.state is CircuitState.HALF_OPEN:
            if ok:
                self._close()
            else:
                self._open(reason or "probe failed", longer=True)
            return
        self.window.append(ok)
        failures = self.window.count(False)
        if opens:
            self._open(reason or "auth failure", longer=False)
        elif len(self.window) >= self.min_samples and failures / len(self.window) >= self.failure_rate:
            self._open(reason or f"{failures} of the last {len(self.window)} sends failed", longer=False)

    def _open(self, reason: str, *, longer: bool) -> None:
        if longer:
            self.cooldown_s = min(self.max_cooldown_s, self.cooldown_s * 2)
        now = self.clock.now()
        if self.state is CircuitState.CLOSED:
            self.opened_at = now
        self.state = CircuitState.OPEN
        self.open_until = now + timedelta(seconds=self.cooldown_s)
        self.reason = reason
        self.window.clear()
        metrics.CIRCUIT_STATE.labels(self.channel).set(1)
        log.warning("circuit open", channel=self.channel, reason=reason, retry_in_s=self.cooldown_s)

    def _close(self) -> None:
        self.state = CircuitState.CLOSED
        self.open_until = self.opened_at = self.reason = None
        self.cooldown_s = self.base_cooldown_s
        self.window.clear()
        metrics.CIRCUIT_STATE.labels(self.channel).set(0)
        log.info("circuit closed: channel recovered", channel=self.channel)
