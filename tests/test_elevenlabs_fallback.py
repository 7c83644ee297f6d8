"""The TTS fallback chain with the real ElevenLabs adapter (against its fake) in front of a local engine,
and the guarantee that the API key never shows up in logs or errors."""

from __future__ import annotations

import asyncio
import logging
import math
import traceback
from collections.abc import AsyncIterator

import pytest

from proto.events import WordTiming
from services.runtime.resilience import CircuitBreaker, ProviderError
from services.tts.engines.base import SynthAudio, TtsEngine, TtsStream
from services.tts.engines.elevenlabs import ElevenLabsEngine
from services.tts.engines.fallback import FallbackSettings, FallbackStream, FallbackTtsEngine
from tests.fakes.elevenlabs import FakeElevenLabs, Faults
from tests.test_elevenlabs import KEY, Listener, serving, settings, speak, spoken

TONE_RATE, TONE_MS = 22050, 30


class ToneEngine(TtsEngine):
    """A small local engine: TONE_MS of a fixed tone per character, words timed by their position."""

    name = "tone"

    async def open(self, session: str, reply_id: str, voice: str = "") -> TtsStream:
        return ToneStream()


class ToneStream(TtsStream):
    def __init__(self) -> None:
        self._queue: asyncio.Queue[tuple[int, str] | None] = asyncio.Queue()

    async def push_text(self, text: str, chunk: int) -> None:
        self._queue.put_nowait((chunk, text))

    async def end(self) -> None:
        self._queue.put_nowait(None)

    async def cancel(self) -> None:
        self._queue.put_nowait(None)

    async def audio(self) -> AsyncIterator[SynthAudio]:
        while (item := await self._queue.get()) is not None:
            chunk, text = item
            yield SynthAudio(pcm=tone(text), sample_rate=TONE_RATE, chunk=chunk, words=tone_words(text))


def tone(text: str) -> bytes:
    n = len(text) * TONE_RATE * TONE_MS // 1000
    return b"".join(int(6000 * math.sin(i / 7)).to_bytes(2, "little", signed=True) for i in range(n))


def tone_words(text: str) -> tuple[WordTiming, ...]:
    words, at = [], 0
    for token in text.split(" "):
        if token:
            words.append(WordTiming(text=token, start_ms=at * TONE_MS, end_ms=(at + len(token)) * TONE_MS))
        at += len(token) + 1
    return tuple(words)


CHUNKS = ["Hello there.", "How are you today?", "Fine, thanks."]


async def say(chain: FallbackTtsEngine, reply: str) -> tuple[FallbackStream, list[SynthAudio]]:
    stream = await chain.open("s1", reply)
    assert isinstance(stream, FallbackStream)
    for i, text in enumerate(CHUNKS):
        await stream.push_text(text, i)
    await stream.end()
    return stream, await Listener(stream).done()


async def test_a_drop_mid_chunk_continues_on_the_next_engine_and_the_breaker_then_skips_the_primary() -> None:
    # 5 letters per frame: "Hello there. " is 3 frames, so the drop comes one frame into chunk 1
    async with serving(Faults(drop_after_frames=4)) as (fake, primary):
        chain = FallbackTtsEngine([primary, ToneEngine()], FallbackSettings(breaker_threshold=1))
        stream, pieces = await say(chain, "turn-1")

        assert stream.served_by == ["elevenlabs", "tone"]
        assert [p.chunk for p in pieces] == sorted(p.chunk for p in pieces)
        ours = [p for p in pieces if p.sample_rate != TONE_RATE]
        theirs = [p for p in pieces if p.sample_rate == TONE_RATE]
        assert b"".join(p.pcm for p in ours if p.chunk == 0) == spoken(CHUNKS[0])  # spoken once, not again
        assert [(p.chunk, p.pcm) for p in theirs] == [(1, tone(CHUNKS[1])), (2, tone(CHUNKS[2]))]
        # chunk 1 is spoken again whole, its word times after the part already heard
        heard_ms = sum(len(p.pcm) for p in ours if p.chunk == 1) / 2 / 16000 * 1000
        assert heard_ms > 0
        (again,) = [p for p in theirs if p.chunk == 1]
        assert [w.start_ms for w in again.words] == [
            w.start_ms + round(heard_ms) for w in tone_words(CHUNKS[1])
        ]

        handshakes = len(fake.seen.handshakes)
        stream, pieces = await say(chain, "turn-2")
        assert stream.served_by == ["tone"]
        assert [p.chunk for p in pieces] == [0, 1, 2]
        assert len(fake.seen.handshakes) == handshakes  # the open breaker kept the chain off the provider
        assert chain.breakers[0].is_open and not chain.breakers[1].is_open


async def test_a_stall_between_chunks_hands_the_rest_of_the_reply_over_without_repeating() -> None:
    async with serving(Faults(stall_after_frames=3), stall_s=0.3, first_audio_s=0.3) as (_, primary):
        chain = FallbackTtsEngine([primary, ToneEngine()])
        stream, pieces = await say(chain, "turn-1")
    assert stream.served_by == ["elevenlabs", "tone"]
    assert [(p.chunk, p.sample_rate) for p in pieces if p.sample_rate == TONE_RATE] == [
        (1, TONE_RATE),
        (2, TONE_RATE),
    ]
    assert {p.chunk for p in pieces if p.sample_rate != TONE_RATE} == {0}
    assert [w.start_ms for p in pieces if p.chunk == 1 for w in p.words] == [
        w.start_ms for w in tone_words(CHUNKS[1])
    ]


async def test_a_rejected_key_before_any_audio_sends_the_whole_reply_to_the_next_engine() -> None:
    async with FakeElevenLabs(KEY) as fake:
        primary = ElevenLabsEngine(settings(fake, api_key="sk_not_the_key_0123456789"))
        chain = FallbackTtsEngine([primary, ToneEngine()])
        try:
            stream, pieces = await say(chain, "turn-1")
        finally:
            await chain.aclose()
    assert stream.served_by == ["tone"]
    assert [(p.chunk, p.pcm) for p in pieces] == [(i, tone(t)) for i, t in enumerate(CHUNKS)]
    assert chain.breakers[0].failures == 1


async def test_cancel_through_the_chain_closes_the_provider_context() -> None:
    async with serving() as (fake, primary):
        fake.chars_per_frame, fake.frame_gap_s = 2, 0.02
        chain = FallbackTtsEngine([primary, ToneEngine()])
        stream = await chain.open("s1", "turn-1")
        await stream.push_text("A long answer that the caller interrupts right away.", 0)
        listener = Listener(stream)
        await listener.until(lambda c: c.pieces)
        await stream.cancel()
        await listener.done()
        await fake.wait(lambda s: s.closed == ["turn-1"])
    assert chain.breakers[0].failures == 0


async def test_the_api_key_appears_in_no_log_line_and_no_error(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "sk_wrong_key_for_the_leak_test_42"
    errors: list[BaseException] = []
    scenarios = [
        (Faults(), {}),
        (Faults(), {"api_key": wrong}),
        (Faults(ws_status=503, http_status=401), {}),
        (Faults(ws_status=503, http_status=429), {}),
        (Faults(ws_status=503, http_drop_after_bytes=2000), {}),
        (Faults(drop_after_frames=1), {}),
        (Faults(on_connection=1, max_contexts=0), {}),
    ]
    for faults, overrides in scenarios:
        async with serving(faults, **overrides) as (_, engine):
            try:
                await speak(engine, ["Is my key safe?"])
            except ProviderError as e:
                errors.append(e)
            assert KEY not in repr(engine.settings)
    assert len(errors) >= 4  # the faults did fail
    text = "\n".join(caplog.messages) + "\n".join(
        "".join(traceback.format_exception(r.exc_info[1]))
        for r in caplog.records
        if r.exc_info and r.exc_info[1]
    )
    for e in errors:
        while e is not None:
            text += f"\n{e!s} {e!r}"
            e = e.__cause__ or e.__context__  # type: ignore[assignment]
    assert caplog.records  # the scenarios did log
    assert KEY not in text and wrong not in text


async def test_a_half_open_trial_cut_short_by_a_barge_in_is_freed_for_the_next_reply() -> None:
    now = [0.0]
    async with serving(Faults(first_audio_delay_s=30), first_audio_s=0.3) as (fake, primary):
        chain = FallbackTtsEngine([primary, ToneEngine()])
        chain.breakers[0] = breaker = CircuitBreaker(
            "elevenlabs", threshold=1, cooldown_s=10, clock=lambda: now[0]
        )
        stream, _ = await say(chain, "turn-1")  # the provider times out: the breaker opens
        assert stream.served_by == ["tone"] and breaker.is_open

        now[0] = 11.0  # cooldown over: the next reply is the trial
        trial = await chain.open("s1", "turn-2")
        await trial.push_text("Are you back?", 0)
        listener = Listener(trial)
        await fake.wait(lambda s: "turn-2" in s.opened)
        await trial.cancel()  # barge-in before the provider said anything
        assert await listener.done() == []
        await fake.wait(lambda s: "turn-2" in s.closed)
    assert not breaker.is_open and breaker.allow()  # neither stuck half-open nor counted as a failure
