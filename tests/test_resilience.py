"""Watchdogs and the circuit breaker: the primitives every provider adapter relies on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from services.runtime.resilience import CircuitBreaker, ProviderTimeout, watchdog


async def gen(gaps: list[float], closed: list[bool]) -> AsyncIterator[int]:
    try:
        for i, gap in enumerate(gaps):
            await asyncio.sleep(gap)
            yield i
    finally:
        closed.append(True)


async def test_watchdog_passes_a_healthy_stream_and_closes_it() -> None:
    closed: list[bool] = []
    items = [i async for i in watchdog(gen([0, 0, 0], closed), "p", first_s=1, stall_s=1)]
    assert items == [0, 1, 2]
    assert closed == [True]


async def test_watchdog_times_out_a_slow_first_item() -> None:
    closed: list[bool] = []
    with pytest.raises(ProviderTimeout, match="no first byte"):
        async for _ in watchdog(gen([5], closed), "p", first_s=0.05, stall_s=1):
            pass
    assert closed == [True]


async def test_watchdog_detects_a_stall_after_the_first_item() -> None:
    closed: list[bool] = []
    got = []
    with pytest.raises(ProviderTimeout, match="stalled") as err:
        async for i in watchdog(gen([0, 5], closed), "p", first_s=1, stall_s=0.05):
            got.append(i)
    assert got == [0]
    assert err.value.retryable
    assert closed == [True]


def test_breaker_opens_after_threshold_and_lets_one_trial_through_after_cooldown() -> None:
    now = [0.0]
    b = CircuitBreaker("p", threshold=2, cooldown_s=10, clock=lambda: now[0])
    assert b.allow()
    b.failure()
    assert b.allow()
    b.failure()
    assert b.is_open and not b.allow()
    now[0] = 10.0
    assert b.allow()  # half-open trial
    assert not b.allow()  # only one trial at a time
    b.failure()  # the trial failed: open again
    assert not b.allow()
    now[0] = 20.0
    assert b.allow()
    b.success()
    assert not b.is_open and b.failures == 0 and b.allow()
