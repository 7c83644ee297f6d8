"""Sending only speech to a streaming provider, and mapping its clock back to the caller's.

A provider that bills the audio it receives should get speech and a little around it, not the minutes
a caller spends listening. ``SpeechGate`` keeps a pre-roll ring while the VAD hears silence and lets a
post-roll through after it stops; ``ClockMap`` turns the provider's timestamps (which count only the
audio it was sent) back into stream time.
"""

from __future__ import annotations

import bisect
from collections import deque


class SpeechGate:
    """Which frames go out: from ``preroll`` bytes before ``start`` to ``postroll`` bytes after ``stop``."""

    def __init__(self, preroll: int, postroll: int) -> None:
        self._preroll, self._postroll = preroll, postroll
        self._ring: deque[bytes] = deque()
        self._ring_bytes = 0
        self._post_left: int | None = None  # bytes of post-roll still to send after a stop
        self.is_open = False

    def push(self, frame: bytes) -> list[bytes]:
        """The frames to send now (this one, or none while the gate is closed)."""
        if self.is_open:
            if self._post_left is not None:
                self._post_left -= len(frame)
                if self._post_left <= 0:
                    self.is_open, self._post_left = False, None
            return [frame]
        self._ring.append(frame)
        self._ring_bytes += len(frame)
        while self._ring_bytes > self._preroll:
            self._ring_bytes -= len(self._ring.popleft())
        return []

    def start(self) -> list[bytes]:
        """Speech began: open, and return the pre-roll to send first (empty if already open)."""
        self._post_left = None
        if self.is_open:
            return []
        self.is_open = True
        preroll = list(self._ring)
        self._ring.clear()
        self._ring_bytes = 0
        return preroll

    def stop(self) -> None:
        """Speech ended: let ``postroll`` more bytes through, then close."""
        if self.is_open:
            self._post_left = self._postroll
            if self._postroll <= 0:
                self.is_open, self._post_left = False, None


class ClockMap:
    """Provider seconds -> stream milliseconds, over the runs of audio the gate let through."""

    def __init__(self) -> None:
        self._provider: list[float] = []  # provider time at the start of each run
        self._stream: list[float] = []  # stream time of the same audio

    def start_run(self, provider_s: float, stream_s: float) -> None:
        """A run of contiguous audio begins: its first byte is at ``provider_s`` and ``stream_s``."""
        self._provider.append(provider_s)
        self._stream.append(stream_s)

    def to_stream_ms(self, provider_s: float) -> int:
        """Stream time (ms) of a provider timestamp."""
        i = bisect.bisect_right(self._provider, provider_s) - 1
        if i < 0:
            return round(provider_s * 1000)
        return round((self._stream[i] + provider_s - self._provider[i]) * 1000)
