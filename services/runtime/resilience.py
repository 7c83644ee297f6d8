"""Voice-sized failure handling shared by every engine.

Typed provider errors, watchdogs on streams, and a circuit breaker that stops trying a provider that
keeps failing. A caller waits a second or two, not the SDKs' minutes: adapters wrap provider streams in
``watchdog`` (a deadline for the first item and for every gap after it), classify failures as
``ProviderError`` with ``retryable``, and a stage's fallback chain skips providers whose breaker is
open.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

from prometheus_client import Counter, Gauge

T = TypeVar("T")

provider_failures = Counter(
    "vb_provider_failures_total", "Provider calls that failed, by kind", ["provider", "kind"]
)
breaker_open = Gauge(
    "vb_provider_breaker_open", "1 while the provider's circuit breaker is open", ["provider"]
)


class ProviderError(Exception):
    """A provider call failed. ``retryable``: trying again (same or next provider) may succeed."""

    kind = "error"

    def __init__(
        self,
        provider: str,
        message: str,
        *,
        retryable: bool,
        status: int | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(f"{provider}: {message}")
        self.provider, self.retryable, self.status, self.retry_after_s = (
            provider,
            retryable,
            status,
            retry_after_s,
        )


class ProviderTimeout(ProviderError):
    """No first byte, or a silent stall mid-stream, within the voice budget."""

    kind = "timeout"

    def __init__(self, provider: str, message: str) -> None:
        super().__init__(provider, message, retryable=True)


class ProviderUnavailable(ProviderError):
    """Connection refused or dropped, 5xx, overloaded, rate limited: another try may work."""

    kind = "unavailable"

    def __init__(
        self, provider: str, message: str, *, status: int | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(provider, message, retryable=True, status=status, retry_after_s=retry_after_s)


class ProviderRejected(ProviderError):
    """The provider refused the request itself (bad key, bad input): retrying the same will not help."""

    kind = "rejected"

    def __init__(self, provider: str, message: str, *, status: int | None = None) -> None:
        super().__init__(provider, message, retryable=False, status=status)


async def watchdog(
    items: AsyncIterator[T], provider: str, *, first_s: float, stall_s: float
) -> AsyncIterator[T]:
    """Yield from ``items`` under deadlines: ``first_s`` for the first item, ``stall_s`` for each gap.

    Raises ProviderTimeout when one passes. The wrapped iterator is closed when this one is.
    """
    limit = first_s
    try:
        while True:
            try:
                item = await asyncio.wait_for(anext(items), limit)
            except StopAsyncIteration:
                return
            except TimeoutError:
                what = "no first byte" if limit == first_s else "stream stalled"
                raise ProviderTimeout(provider, f"{what} within {limit:.1f}s") from None
            limit = stall_s
            yield item
    finally:
        aclose: Callable[[], object] | None = getattr(items, "aclose", None)
        if aclose is not None:
            await aclose()  # type: ignore[misc]


class CircuitBreaker:
    """Opens after ``threshold`` consecutive failures; after ``cooldown_s`` lets one trial through.

    Used by fallback chains: while a provider's breaker is open the chain goes straight to the next
    engine instead of spending the caller's time on a provider that is down.
    """

    def __init__(
        self,
        provider: str,
        *,
        threshold: int = 3,
        cooldown_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.provider, self.threshold, self.cooldown_s, self._clock = provider, threshold, cooldown_s, clock
        self.failures = 0
        self._opened_at: float | None = None
        self._trial = False

    @property
    def is_open(self) -> bool:
        """Whether calls should skip this provider right now."""
        if self._opened_at is None:
            return False
        # half-open once the cooldown has passed: the next call is a trial
        return self._trial or self._clock() - self._opened_at < self.cooldown_s

    def allow(self) -> bool:
        """Take permission for one call (marks the half-open trial as taken)."""
        if self.is_open:
            return False
        if self._opened_at is not None:
            self._trial = True
        return True

    def success(self) -> None:
        """The call worked: close the breaker."""
        self.failures, self._opened_at, self._trial = 0, None, False
        breaker_open.labels(self.provider).set(0)

    def release(self) -> None:
        """The call was abandoned (e.g. a barge-in) before it showed success or failure.

        Frees a half-open trial so that the next call can be the trial; without it the breaker would
        stay open for good.
        """
        self._trial = False

    def failure(self, error: BaseException | None = None) -> None:
        """The call failed: count it; open (again) at the threshold or when a trial fails."""
        self.failures += 1
        if error is not None:
            provider_failures.labels(self.provider, getattr(error, "kind", "error")).inc()
        if self._trial or self.failures >= self.threshold:
            self._opened_at, self._trial = self._clock(), False
            breaker_open.labels(self.provider).set(1)
