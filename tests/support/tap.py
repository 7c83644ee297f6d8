"""Watch a session's events from a test: every subject of the session, decoded, in arrival order."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from proto import codec
from proto import events as ev
from proto import subjects as sj
from services.runtime.bus import Bus

E = TypeVar("E", bound=ev.Event)
T = TypeVar("T")


@dataclass(frozen=True)
class CallerFrame:
    """One 20 ms frame of a UserAudio, with its VAD probability and the event's seq and ts."""

    index: int
    pcm: bytes
    speech_prob: float
    seq: int
    ts: int


def caller_frames(events: Iterable[ev.Event]) -> list[CallerFrame]:
    """The frames of the UserAudio events among ``events``, one by one, in event order."""
    return [
        CallerFrame(index, pcm, prob, audio.seq, audio.ts)
        for audio in events
        if isinstance(audio, ev.UserAudio)
        for (index, pcm), prob in zip(audio.each_frame(), audio.speech_probs, strict=True)
    ]


class Tap:
    """Collects every event of a session (core subscription on ``vb.<session>.>``)."""

    def __init__(self, bus: Bus, session: str) -> None:
        self.bus, self.session = bus, session
        self.events: list[tuple[str, ev.Event, float]] = []
        self.refused: list[tuple[str, str]] = []
        self._changed = asyncio.Condition()
        self._sub: Subscription | None = None

    async def __aenter__(self) -> Tap:
        self._sub = await self.bus.nc.subscribe(sj.session_all(self.session), cb=self._on_msg)
        await self.bus.nc.flush()
        return self

    async def __aexit__(self, *_: Any) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()

    async def _on_msg(self, msg: Msg) -> None:
        try:
            event = codec.decode(msg.subject, msg.data)
        except codec.ContractError as e:
            self.refused.append((msg.subject, str(e)))
            return
        self.events.append((msg.subject, event, time.monotonic()))
        async with self._changed:
            self._changed.notify_all()

    def of(self, kind: type[E], where: Callable[[E], bool] = lambda _: True) -> list[E]:
        """Events of ``kind`` seen so far that satisfy ``where``."""
        return [e for _, e, _ in self.events if isinstance(e, kind) and where(e)]

    def agent_frames(
        self, where: Callable[[ev.AgentAudioFrame], bool] = lambda _: True
    ) -> list[ev.AgentAudioFrame]:
        """The 20 ms frames the TTS sent on ``audio.out`` so far (its ``AgentAudio`` events split)."""
        return [f for a in self.of(ev.AgentAudio) for f in a.split() if where(f)]

    def frames(self, where: Callable[[CallerFrame], bool] = lambda _: True) -> list[CallerFrame]:
        """Caller frames seen so far (UserAudio events taken apart) that satisfy ``where``."""
        return [f for f in caller_frames(e for _, e, _ in self.events) if where(f)]

    async def wait(
        self,
        kind: type[E],
        where: Callable[[E], bool] = lambda _: True,
        count: int = 1,
        timeout: float = 10.0,
    ) -> list[E]:
        """Wait until ``count`` events of ``kind`` satisfying ``where`` have arrived; return them."""
        return await self._wait(lambda: self.of(kind, where), count, timeout, kind.__name__)

    async def wait_agent_frames(
        self,
        where: Callable[[ev.AgentAudioFrame], bool] = lambda _: True,
        count: int = 1,
        timeout: float = 10.0,
    ) -> list[ev.AgentAudioFrame]:
        """Wait until the TTS has sent ``count`` frames satisfying ``where``; return them."""
        return await self._wait(lambda: self.agent_frames(where), count, timeout, "agent frames")

    async def wait_frames(
        self,
        where: Callable[[CallerFrame], bool] = lambda _: True,
        count: int = 1,
        timeout: float = 10.0,
    ) -> list[CallerFrame]:
        """Wait until ``count`` caller frames satisfying ``where`` have arrived; return them."""
        return await self._wait(lambda: self.frames(where), count, timeout, "caller frames")

    async def _wait(self, seen: Callable[[], list[T]], count: int, timeout: float, what: str) -> list[T]:
        async def enough() -> list[T]:
            async with self._changed:
                await self._changed.wait_for(lambda: len(seen()) >= count)
            return seen()

        try:
            return await asyncio.wait_for(enough(), timeout)
        except TimeoutError:
            last = [type(e).__name__ for _, e, _ in self.events][-30:]
            raise AssertionError(f"timed out waiting for {count} {what}; last seen: {last}") from None
