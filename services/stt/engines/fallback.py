"""A chain of STT engines (e.g. Deepgram -> local whisper) behind the one engine interface.

A session opens on the first engine whose circuit breaker allows it. When its stream fails, at open or
mid-stream, the session moves to the next engine, and the new stream hears again what the failed one
had not settled: the audio since its last final, with the VAD's marks, so nothing the caller said is
lost and nothing already delivered as a final is transcribed twice. While the caller is silent only a
short pre-roll is kept. A stream reports failure by raising ProviderError from ``results()``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import msgspec
from prometheus_client import Counter

from services.runtime.config import ConfigError, setting, settings_class
from services.runtime.resilience import CircuitBreaker, ProviderError, ProviderUnavailable
from services.stt.engines.base import SttEngine, SttResult, SttStream

log = logging.getLogger("voicebus.stt")

_BYTES_PER_MS = 32  # 16 kHz mono s16le
_PREROLL = 500 * _BYTES_PER_MS  # kept while the caller is silent: the next engine's pre-roll
_MAX_UNSETTLED = 30_000 * _BYTES_PER_MS  # a bound if an engine never settles (it should)

streams_served = Counter(
    "vb_stt_streams_total",
    "STT streams by the engine that served them; how: primary, fallback (the engines before it failed "
    "or were skipped at open), switched (took over mid-stream)",
    ["engine", "how"],
)


@settings_class
@dataclass(frozen=True, kw_only=True)
class FallbackSettings:
    """The STT chain's circuit breakers (one per engine, shared by the sessions of a process)."""

    breaker_threshold: int = setting(
        "VB_STT_BREAKER_THRESHOLD", 3, "Consecutive failures after which an STT engine is skipped."
    )
    breaker_cooldown_s: float = setting(
        "VB_STT_BREAKER_COOLDOWN", 30.0, "Seconds a skipped STT engine waits before one trial session."
    )

    def __post_init__(self) -> None:
        if self.breaker_threshold < 1 or self.breaker_cooldown_s <= 0:
            raise ConfigError("VB_STT_BREAKER_THRESHOLD must be >= 1 and VB_STT_BREAKER_COOLDOWN positive")


class FallbackSttEngine(SttEngine):
    """Engines in order of preference; the last is the one tried when every breaker is open."""

    name = "fallback"

    def __init__(self, engines: Sequence[SttEngine], settings: FallbackSettings | None = None) -> None:
        if not engines:
            raise ValueError("a fallback chain needs at least one engine")
        s = settings or FallbackSettings()
        self.engines = list(engines)
        self.breakers = [
            CircuitBreaker(e.name, threshold=s.breaker_threshold, cooldown_s=s.breaker_cooldown_s)
            for e in engines
        ]

    async def open(self, session: str, language: str) -> FallbackSttStream:
        """A stream on the first engine that opens."""
        stream = FallbackSttStream(self, session, language)
        await stream.start()
        return stream

    async def aclose(self) -> None:
        """Release every engine of the chain."""
        for engine in self.engines:
            await engine.aclose()

    async def open_from(self, first: int, session: str, language: str) -> tuple[int, SttStream]:
        """Open on the first engine from index ``first`` whose breaker allows; count failures."""
        error: ProviderError | None = None
        tried = False
        for index in range(first, len(self.engines)):
            engine, breaker = self.engines[index], self.breakers[index]
            last_resort = index == len(self.engines) - 1 and not tried
            if not breaker.allow() and not last_resort:
                continue
            tried = True
            try:
                return index, await engine.open(session, language)
            except ProviderError as failed:
                breaker.failure(failed)
                log.warning("stt: %s did not open: %s", engine.name, failed)
                error = failed
        raise error or ProviderUnavailable("stt", "no engine left in the chain")


@dataclass(slots=True)
class _Entry:
    at: int  # stream clock: bytes pushed before it
    pcm: bytes = b""  # a frame, or empty for a VAD mark
    mark: str = ""  # "started" | "ended"


class _Unsettled:
    """The audio and VAD marks a new engine must hear again if the current one fails."""

    def __init__(self) -> None:
        self.entries: deque[_Entry] = deque()
        self.pushed = 0
        self.in_speech = False
        self.frozen = False  # a switch is replaying the entries: keep them in place
        self._ends = 0  # "ended" marks still waiting for their flushed final

    def frame(self, pcm: bytes) -> None:
        self.entries.append(_Entry(self.pushed, pcm))
        self.pushed += len(pcm)
        if not self.frozen:
            idle = not self.in_speech and not self._ends
            self._drop_before(self.pushed - (_PREROLL if idle else _MAX_UNSETTLED), keep_ends=not idle)

    def mark(self, mark: str) -> None:
        self.entries.append(_Entry(self.pushed, mark=mark))
        self.in_speech = mark == "started"
        self._ends += mark == "ended"

    def start(self) -> int:
        """Stream time of the first entry: where a replaying engine's clock starts."""
        return self.entries[0].at if self.entries else self.pushed

    def flushed(self) -> None:
        """The answer to the oldest speech end came: that segment is settled."""
        while self.entries and self._ends:
            if self.entries.popleft().mark == "ended":
                self._ends -= 1
                break

    def settled_until(self, at: int) -> None:
        """A final settled the audio before ``at`` (its last word's end)."""
        self._drop_before(at, keep_ends=True)

    def _drop_before(self, at: int, *, keep_ends: bool) -> None:
        kept: list[_Entry] = []
        while self.entries and self.entries[0].at + len(self.entries[0].pcm) <= at:
            entry = self.entries.popleft()
            if entry.mark == "ended" and keep_ends:
                kept.append(entry)  # its flushed final is still owed
            elif entry.mark == "ended":
                self._ends -= 1
        self.entries.extendleft(reversed(kept))

    async def replay(self, stream: SttStream) -> None:
        """Feed everything to ``stream``, including what is pushed while this runs."""
        first_mark = next((e.mark for e in self.entries if e.mark), "")
        if first_mark == "ended" or (not first_mark and self.in_speech):
            await stream.speech_started()  # the start was settled away; the speech goes on
        i = 0
        while i < len(self.entries):
            entry = self.entries[i]
            i += 1
            if entry.pcm:
                await stream.push(entry.pcm)
            elif entry.mark == "started":
                await stream.speech_started()
            else:
                await stream.speech_ended()


@dataclass(slots=True)
class _Active:
    index: int
    stream: SttStream
    offset_ms: int  # stream time of the engine stream's clock zero
    judged: bool = False  # its breaker has heard a success or a failure from this stream


class FallbackSttStream(SttStream):
    """Forwards to the active engine's stream; a pump task moves the session on when it fails."""

    def __init__(self, chain: FallbackSttEngine, session: str, language: str) -> None:
        self._chain, self._session, self._language = chain, session, language
        self._unsettled = _Unsettled()
        self._active: _Active | None = None
        self._live: SttStream | None = None  # where pushes go; None while a switch replays
        self._results: asyncio.Queue[SttResult | ProviderError | None] = asyncio.Queue()
        self._pump: asyncio.Task[None] | None = None
        self._retired: list[asyncio.Task[None]] = []
        #: the engines that served this session, in order
        self.served_by: list[str] = []

    @property
    def engine(self) -> str:
        """Name of the engine serving now."""
        return self.served_by[-1]

    async def start(self) -> None:
        """Open on the first engine that works; raises the last failure if none does."""
        index, stream = await self._chain.open_from(0, self._session, self._language)
        self._activate(index, stream, 0, "primary" if index == 0 else "fallback")
        self._live = stream
        self._pump = asyncio.create_task(self._run(), name="stt.fallback")

    async def push(self, pcm: bytes) -> None:
        """Keep the frame until it is settled, and forward it."""
        self._unsettled.frame(pcm)
        if self._live is not None:
            await self._live.push(pcm)

    async def speech_started(self) -> None:
        """Forward the VAD's mark and remember it for a replay."""
        self._unsettled.mark("started")
        if self._live is not None:
            await self._live.speech_started()

    async def speech_ended(self) -> None:
        """Forward the VAD's mark and remember it for a replay."""
        self._unsettled.mark("ended")
        if self._live is not None:
            await self._live.speech_ended()

    async def results(self) -> AsyncIterator[SttResult]:
        """Results of whichever engine serves; raises when the last engine has failed too."""
        while True:
            item = await self._results.get()
            if not isinstance(item, SttResult):
                self._results.put_nowait(item)
                if item is None:
                    return
                raise item
            yield item

    async def aclose(self) -> None:
        """Stop the pump, close the active stream and the failed ones still closing."""
        if self._pump is not None:
            self._pump.cancel()
            await asyncio.gather(self._pump, return_exceptions=True)
        if self._active is not None:
            if not self._active.judged:  # a session that ends silent proves nothing either way
                self._chain.breakers[self._active.index].release()
            await self._active.stream.aclose()
        await asyncio.gather(*self._retired, return_exceptions=True)
        self._results.put_nowait(None)

    def _activate(self, index: int, stream: SttStream, offset: int, how: str) -> None:
        self._active = _Active(index, stream, offset // _BYTES_PER_MS)
        self.served_by.append(self._chain.engines[index].name)
        streams_served.labels(self.engine, how).inc()

    async def _run(self) -> None:
        try:
            while self._active is not None:
                active = self._active
                try:
                    async for result in active.stream.results():
                        self._deliver(active, result)
                except ProviderError as error:
                    if not await self._switch(active, error):
                        return
                else:
                    self._results.put_nowait(None)
                    return
        except Exception as error:  # a bug here must still end results()
            log.exception("stt: fallback pump crashed")
            self._results.put_nowait(ProviderUnavailable("stt", f"fallback error: {type(error).__name__}"))

    async def _switch(self, failed: _Active, error: ProviderError) -> bool:
        """Move to the next engine and replay the unsettled audio; False when none is left."""
        failed.judged = True
        self._chain.breakers[failed.index].failure(error)
        self._live, self._unsettled.frozen = None, True
        self._retired.append(asyncio.create_task(failed.stream.aclose(), name="stt.fallback.close"))
        try:
            index, stream = await self._chain.open_from(failed.index + 1, self._session, self._language)
        except ProviderError as last:
            log.error("stt: no engine left after %s failed: %s", self.engine, error)
            self._results.put_nowait(last)
            return False
        before = self.engine
        self._activate(index, stream, self._unsettled.start(), "switched")
        log.warning("stt: %s failed (%s); session continues on %s", before, error, self.engine)
        try:
            await self._unsettled.replay(stream)
        except ProviderError as replay_error:
            assert self._active is not None
            return await self._switch(self._active, replay_error)
        self._live, self._unsettled.frozen = stream, False  # no await since the replay's last check
        return True

    def _deliver(self, active: _Active, result: SttResult) -> None:
        words = tuple(
            msgspec.structs.replace(
                w, start_ms=w.start_ms + active.offset_ms, end_ms=w.end_ms + active.offset_ms
            )
            for w in result.words
        )
        if result.is_final:
            active.judged = True
            self._chain.breakers[active.index].success()
            if result.flushed:
                self._unsettled.flushed()
            elif words:
                self._unsettled.settled_until(words[-1].end_ms * _BYTES_PER_MS)
        self._results.put_nowait(dataclasses.replace(result, words=words))
