"""The STT fallback chain: Deepgram (through the SDK, against the fake) first, another engine next."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from services.runtime.resilience import ProviderError, ProviderRejected, ProviderTimeout, ProviderUnavailable
from services.stt.engines.base import SttEngine, SttResult, SttStream
from services.stt.engines.deepgram import DeepgramEngine
from services.stt.engines.fallback import FallbackSettings, FallbackSttEngine
from tests.fakes.deepgram import FakeDeepgram, HandshakeFault, StreamFault, Utterance, silence, speech
from tests.test_deepgram import KEY, TEXT, collect, push_ms, say, settings


class SpeechMeter(SttEngine):
    """A real engine for the chain's second place: at each speech end it says how much speech it heard."""

    name = "meter"

    def __init__(self) -> None:
        self.opened = 0

    async def open(self, session: str, language: str) -> SttStream:
        self.opened += 1
        return _MeterStream()


class _MeterStream(SttStream):
    def __init__(self) -> None:
        self._heard, self._in_speech = 0, False
        self._out: asyncio.Queue[SttResult | None] = asyncio.Queue()

    async def push(self, pcm: bytes) -> None:
        self._heard += len(pcm) if self._in_speech else 0

    async def speech_started(self) -> None:
        self._in_speech = True

    async def speech_ended(self) -> None:
        self._out.put_nowait(SttResult(f"{self._heard // 32} ms", is_final=True, flushed=True))
        self._heard, self._in_speech = 0, False

    async def results(self) -> AsyncIterator[SttResult]:
        while (item := await self._out.get()) is not None:
            yield item

    async def aclose(self) -> None:
        self._out.put_nowait(None)


@contextlib.asynccontextmanager
async def chain(*engines: SttEngine, threshold: int = 3) -> AsyncIterator[FallbackSttEngine]:
    fallback = FallbackSttEngine(
        engines, FallbackSettings(breaker_threshold=threshold, breaker_cooldown_s=60)
    )
    try:
        yield fallback
    finally:
        await fallback.aclose()


def deepgram(fake: FakeDeepgram, name: str, **overrides: object) -> DeepgramEngine:
    return DeepgramEngine(settings(fake, **overrides), name=name)


async def test_a_mid_utterance_switch_keeps_the_whole_utterance() -> None:
    primary = FakeDeepgram(api_key=KEY, script=[Utterance(TEXT)])
    backup = FakeDeepgram(api_key=KEY, script=[Utterance(TEXT)])
    primary.stream_faults = [StreamFault("close", at_s=0.8)]  # 0.5 s into the speech
    async with primary, backup, chain(deepgram(primary, "deepgram"), deepgram(backup, "backup")) as stt:
        stream = await stt.open("s1", "en")
        await push_ms(stream, silence(500))
        await stream.speech_started()
        await push_ms(stream, speech(700))
        await asyncio.wait_for(primary.accepted[0].closed.wait(), 10)  # the caller is still talking
        await push_ms(stream, speech(800))
        await stream.speech_ended()
        await push_ms(stream, silence(400))
        got = await collect(stream, lambda r: r.flushed)
        served = list(stream.served_by)
        await stream.aclose()

    final = got[-1]
    assert final.text == TEXT  # 1.5 s of speech at 250 ms a word: all of it reached the backup
    assert served == ["deepgram", "backup"]
    assert primary.accepted[0].close_code == 1011
    # the backup heard the segment as a fresh stream would: pre-roll, speech, post-roll
    assert backup.accepted[0].audio_bytes == (300 + 1500 + 300) * 32
    # its word times are on the session's clock (speech began 500 ms in), not the backup's own
    assert 500 <= final.words[0].start_ms < 750


async def test_a_finalize_that_never_comes_back_switches_and_still_answers_the_speech_end() -> None:
    primary = FakeDeepgram(api_key=KEY, script=[Utterance(TEXT)])
    backup = FakeDeepgram(api_key=KEY, script=[Utterance(TEXT)])
    primary.stream_faults = [StreamFault("hang")]  # goes silent on Finalize
    async with primary, backup, chain(deepgram(primary, "deepgram"), deepgram(backup, "backup")) as stt:
        stream = await stt.open("s1", "en")
        await say(stream)
        got = await collect(stream, lambda r: r.flushed)
        await stream.aclose()
        await asyncio.wait_for(primary.accepted[0].closed.wait(), 10)
    assert got[-1].text == TEXT and got[-1].flushed
    assert primary.accepted[0].finalizes == 1 and primary.accepted[0].closed_by == "client"
    assert backup.accepted[0].finalizes == 1


async def test_words_already_final_are_not_transcribed_again_after_a_switch() -> None:
    script = [Utterance("Book a table.", hz=300), Utterance("For two tonight.", hz=500)]
    primary = FakeDeepgram(api_key=KEY, script=script)
    backup = FakeDeepgram(api_key=KEY, script=script)
    primary.stream_faults = [StreamFault("close", at_s=1.75)]  # 300 ms into the second sentence
    async with primary, backup, chain(deepgram(primary, "deepgram"), deepgram(backup, "backup")) as stt:
        stream = await stt.open("s1", "en")
        await push_ms(stream, silence(500))
        await stream.speech_started()
        await push_ms(stream, speech(750, hz=300) + silence(400))  # a pause: Deepgram's endpointing
        first = await collect(stream, lambda r: r.is_final)
        await push_ms(stream, speech(300, hz=500))
        await asyncio.wait_for(primary.accepted[0].closed.wait(), 10)
        await push_ms(stream, speech(450, hz=500))
        await stream.speech_ended()
        await push_ms(stream, silence(400))
        rest = await collect(stream, lambda r: r.flushed)
        await stream.aclose()

    assert first[-1].text == "Book a table." and first[-1].endpoint
    assert [r.text for r in rest if r.is_final and r.text] == ["For two tonight."]
    # the backup got only what was not settled: from the end of "table." (1200 ms) on, i.e. 50 ms of
    # the first sentence, the pause, the second sentence and the post-roll
    assert backup.accepted[0].audio_bytes == (50 + 400 + 750 + 300) * 32


async def test_the_breaker_opens_and_sessions_go_straight_to_the_next_engine() -> None:
    meter = SpeechMeter()
    async with (
        FakeDeepgram(api_key=KEY) as down,
        chain(deepgram(down, "deepgram"), meter, threshold=2) as stt,
    ):
        down.refuse_all = HandshakeFault(500, "Internal error")
        attempts = []
        for session in ("s1", "s2", "s3"):
            stream = await stt.open(session, "en")
            await say(stream)
            got = await collect(stream, lambda r: r.flushed)
            assert got[-1].text == "1500 ms" and stream.served_by == ["meter"]
            await stream.aclose()
            attempts.append(len(down.connections))
        assert stt.breakers[0].is_open
    assert attempts == [2, 4, 4]  # two sessions tried (with one retry each), the third did not
    assert meter.opened == 3


async def test_a_rejected_key_falls_back_at_open_without_retry() -> None:
    meter = SpeechMeter()
    async with (
        FakeDeepgram(api_key=KEY) as fake,
        chain(deepgram(fake, "deepgram", api_key="dg-revoked"), meter) as stt,
    ):
        stream = await stt.open("s1", "en")
        await say(stream, speech_ms=800)
        got = await collect(stream, lambda r: r.flushed)
        await stream.aclose()
    assert got[-1].text == "800 ms"
    assert [c.status for c in fake.connections] == [401]


async def test_when_the_last_engine_fails_too_results_raise() -> None:
    primary = FakeDeepgram(api_key=KEY, script=[Utterance(TEXT)])
    backup = FakeDeepgram(api_key=KEY)
    primary.stream_faults = [StreamFault("abort", at_s=0.6)]
    async with primary, backup, chain(deepgram(primary, "deepgram"), deepgram(backup, "backup")) as stt:
        stream = await stt.open("s1", "en")
        backup.refuse_all = HandshakeFault(503, "Overloaded")
        await say(stream)
        with pytest.raises(ProviderError) as raised:
            await collect(stream, lambda r: False)
        await stream.aclose()
    assert isinstance(raised.value, ProviderUnavailable) and "503" in str(raised.value)
    assert not isinstance(raised.value, ProviderTimeout | ProviderRejected)
