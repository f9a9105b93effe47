"""The circuit breaker opens for a dead channel, not for ordinary transient noise."""

from __future__ import annotations

import random

from dispatchd.core.clock import ManualClock
from dispatchd.notifications.breaker import CircuitBreaker, CircuitState


def test_twenty_percent_random_failures_never_open_it():
    """The benchmark against a provider failing 20 % of calls found the first breaker (20 sends, 50 %)
    opening about once per 2,500 sends, each time stalling the channel for 30 s."""
    breaker = CircuitBreaker("whatsapp_cloud", ManualClock())
    rng = random.Random(20)
    for _ in range(20_000):
        breaker.record(rng.random() >= 0.2)
        assert breaker.state is CircuitState.CLOSED


def test_a_dead_channel_opens_it_after_twenty_sends_and_a_probe_closes_it():
    clock = ManualClock()
    breaker = CircuitBreaker("whatsapp_cloud", clock)
    for _ in range(19):
        breaker.record(False)
    assert breaker.state is CircuitState.CLOSED
    breaker.record(False)
    assert breaker.state is CircuitState.OPEN and breaker.allowance() == 0
    clock.advance(30)
    assert breaker.allowance() == 1 and breaker.state is CircuitState.HALF_OPEN
    breaker.record(False)  # the probe fails: twice as long
    assert breaker.state is CircuitState.OPEN and breaker.cooldown_s == 60
    clock.advance(60)
    assert breaker.allowance() == 1
    breaker.record(True)
    assert breaker.state is CircuitState.CLOSED and breaker.allowance() is None


def test_an_auth_failure_opens_it_at_once():
    breaker = CircuitBreaker("whatsapp_cloud", ManualClock())
    breaker.record(False, opens=True, reason="META_190")
    assert breaker.state is CircuitState.OPEN and breaker.reason == "META_190"
