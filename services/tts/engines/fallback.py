"""A chain of TTS engines behind the one engine interface: the first healthy engine speaks the reply.

Each engine has a circuit breaker; an engine whose breaker is open is skipped, so a provider that is
down costs the caller nothing after the first failures. When the serving engine fails, the reply
goes on with the next engine from the first chunk not yet fully spoken: a chunk cut off part-way is
spoken again whole, like a person restarting a sentence, rather than resumed mid-sentence in another
voice. Its new word timings are shifted past the audio already heard, so timings stay relative to
the chunk's start and "what was heard" counts the cut-off words too. No chunk is lost, and the only
repetition is the opening of the chunk that was cut.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from prometheus_client import Counter

from proto.events import WordTiming
from services.runtime.config import ConfigError, setting, settings_class
from services.runtime.resilience import CircuitBreaker, ProviderError, ProviderUnavailable
from services.tts.engines.base import SynthAudio, TtsEngine, TtsStream

log = logging.getLogger("voicebus.tts")

replies_served = Counter(
    "vb_tts_replies_total",
    "TTS replies by the engine that finished them; how: primary, fallback (the engines before it were "
    "skipped), took over (an engine before it failed on this reply)",
    ["engine", "how"],
)


@settings_class
@dataclass(frozen=True, kw_only=True)
class FallbackSettings:
    """The TTS chain's circuit breakers."""

    breaker_threshold: int = setting(
        "VB_TTS_BREAKER_THRESHOLD", 3, "Consecutive failures after which a TTS engine is skipped."
    )
    breaker_cooldown_s: float = setting(
        "VB_TTS_BREAKER_COOLDOWN", 30.0, "Seconds a failed TTS engine is skipped before one trial reply."
    )

    def __post_init__(self) -> None:
        if self.breaker_threshold < 1 or self.breaker_cooldown_s <= 0:
            raise ConfigError("VB_TTS_BREAKER_THRESHOLD must be >= 1 and VB_TTS_BREAKER_COOLDOWN > 0")


class FallbackTtsEngine(TtsEngine):
    """Engines in order of preference, each behind its own breaker."""

    name = "fallback"

    def __init__(self, engines: Sequence[TtsEngine], settings: FallbackSettings | None = None) -> None:
        if not engines:
            raise ValueError("a fallback chain needs at least one engine")
        s = settings or FallbackSettings()
        self.engines = list(engines)
        self.breakers = [
            CircuitBreaker(e.name, threshold=s.breaker_threshold, cooldown_s=s.breaker_cooldown_s)
            for e in self.engines
        ]

    async def open(self, session: str, reply_id: str, voice: str = "") -> FallbackStream:
        """A stream that picks its engine when audio is first asked for."""
        return FallbackStream(self, session, reply_id, voice)

    async def aclose(self) -> None:
        """Release every engine of the chain."""
        for engine in self.engines:
            await engine.aclose()


class FallbackStream(TtsStream):
    """One reply over the chain; remembers every chunk so that a later engine can take over.

    A chunk counts as spoken once all of its words came back with timings, or once audio of a later
    chunk arrived (engines without alignment); the next engine starts from the first chunk not spoken.
    """

    def __init__(self, chain: FallbackTtsEngine, session: str, reply_id: str, voice: str) -> None:
        self._chain, self._session, self._reply, self._voice = chain, session, reply_id, voice
        self._chunks: dict[int, str] = {}
        self._ended = self._cancelled = False
        self._inner: TtsStream | None = None
        self._replaying = False
        self._spoken: set[int] = set()
        self._words: dict[int, int] = {}
        #: ms of audio handed out per chunk, and per chunk the part of it from earlier engines
        self._heard_ms: dict[int, float] = {}
        self._shift_ms: dict[int, float] = {}
        #: names of the engines that produced audio for this reply, in order
        self.served_by: list[str] = []

    async def push_text(self, text: str, chunk: int) -> None:
        """Remember the chunk and hand it to the serving engine (unless a take-over is replaying)."""
        self._chunks[chunk] = text
        if self._inner is not None and not self._replaying:
            await self._inner.push_text(text, chunk)

    async def end(self) -> None:
        """No more text."""
        self._ended = True
        if self._inner is not None and not self._replaying:
            await self._inner.end()

    async def cancel(self) -> None:
        """Stop the serving engine now."""
        self._cancelled = True
        if self._inner is not None:
            await self._inner.cancel()

    async def audio(self) -> AsyncIterator[SynthAudio]:
        """Audio from the first engine whose breaker allows; on a failure, the next one takes over."""
        error: ProviderError | None = None
        for engine, breaker in zip(self._chain.engines, self._chain.breakers):
            if self._cancelled or not breaker.allow():
                continue
            produced = False
            try:
                async for piece in self._serve(engine):
                    if not produced:
                        breaker.success()
                        produced = True
                        self.served_by.append(engine.name)
                    yield piece
            except ProviderError as err:
                breaker.failure(err)
                error = err
                log.warning(
                    "tts engine %s failed %s (%s): %s",
                    engine.name,
                    "mid-reply" if self.served_by[-1:] == [engine.name] else "before any audio",
                    err.kind,
                    err,
                )
                continue
            except Exception as err:  # a bug, not a provider failure: count it and let it surface
                breaker.failure(err)
                raise
            except BaseException:
                if not produced:  # the caller closed the reply (barge-in): the engine did not fail
                    breaker.release()
                raise
            finally:
                inner, self._inner = self._inner, None
                if inner is not None:
                    await inner.cancel()
            if self._cancelled and not produced:
                breaker.release()
            elif not produced:
                breaker.success()
            how = "primary" if engine is self._chain.engines[0] else "took over" if error else "fallback"
            replies_served.labels(engine.name, how).inc()
            return
        if not self._cancelled:
            raise error or ProviderUnavailable(self._chain.name, "every engine is skipped by its breaker")

    async def _serve(self, engine: TtsEngine) -> AsyncIterator[SynthAudio]:
        inner = self._inner = await engine.open(self._session, self._reply, self._voice)
        self._shift_ms = {c: ms for c, ms in self._heard_ms.items() if c not in self._spoken}
        self._words = {}
        self._replaying, given = True, set[int]()
        try:  # in order, including chunks the caller pushes meanwhile
            while todo := [c for c in self._chunks if c not in self._spoken and c not in given]:
                for chunk in todo:
                    await inner.push_text(self._chunks[chunk], chunk)
                    given.add(chunk)
        finally:
            self._replaying = False
        if self._ended:
            await inner.end()
        async for piece in inner.audio():
            if self._cancelled:
                return
            yield self._track(piece)

    def _track(self, piece: SynthAudio) -> SynthAudio:
        """Note what was spoken; move the word times of a chunk spoken again past what was heard."""
        self._spoken.update(c for c in self._chunks if c < piece.chunk)
        self._words[piece.chunk] = self._words.get(piece.chunk, 0) + len(piece.words)
        if self._words[piece.chunk] >= _word_count(self._chunks.get(piece.chunk, "")):
            self._spoken.add(piece.chunk)
        self._heard_ms[piece.chunk] = (
            self._heard_ms.get(piece.chunk, 0.0) + len(piece.pcm) / 2 / piece.sample_rate * 1000
        )
        shift = round(self._shift_ms.get(piece.chunk, 0.0))
        if not shift or not piece.words:
            return piece
        words = tuple(
            WordTiming(text=w.text, start_ms=w.start_ms + shift, end_ms=w.end_ms + shift) for w in piece.words
        )
        return SynthAudio(pcm=piece.pcm, sample_rate=piece.sample_rate, chunk=piece.chunk, words=words)


def _word_count(text: str) -> int:
    """Words an aligned engine reports for ``text`` (tokens with a letter or digit)."""
    return sum(any(c.isalnum() for c in token) for token in text.split())
