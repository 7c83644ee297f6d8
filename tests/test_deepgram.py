"""The Deepgram adapter, through the real SDK, against the local /v1/listen fake."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import traceback
import uuid
from collections.abc import AsyncIterator, Callable

import pytest

from services.runtime.resilience import ProviderError, ProviderRejected, ProviderTimeout, ProviderUnavailable
from services.stt.engines.base import SttResult, SttStream
from services.stt.engines.deepgram import DeepgramEngine, DeepgramSettings
from services.stt.engines.gating import ClockMap, SpeechGate
from tests.fakes.deepgram import (
    BYTES_PER_S,
    FakeDeepgram,
    HandshakeFault,
    StreamFault,
    Utterance,
    frames,
    silence,
    speech,
)

KEY = f"dg-test-{uuid.uuid4().hex}"
TEXT = "Book a table for two tonight."  # 6 words x 250 ms of speech
FRAME = 640


def settings(fake: FakeDeepgram, **overrides: object) -> DeepgramSettings:
    """Budgets tight enough for tests to see them work, loose enough for a busy 2-core machine."""
    values: dict[str, object] = {"api_key": KEY, "url": fake.url, "stall_s": 1.5, "finalize_timeout_s": 1.5}
    values.update(overrides)
    return DeepgramSettings(**values)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def engine(fake: FakeDeepgram, **overrides: object) -> AsyncIterator[DeepgramEngine]:
    dg = DeepgramEngine(settings(fake, **overrides))
    try:
        yield dg
    finally:
        await dg.aclose()


@pytest.fixture
async def fake() -> AsyncIterator[FakeDeepgram]:
    async with FakeDeepgram(api_key=KEY, script=[Utterance(TEXT)]) as server:
        yield server


async def push_ms(stream: SttStream, pcm: bytes) -> None:
    for frame in frames(pcm):
        await stream.push(frame)


async def say(stream: SttStream, speech_ms: int = 1500, *, lead_ms: int = 500, tail_ms: int = 400) -> None:
    """What the stt service does for one utterance: frames, with the VAD's marks around the speech."""
    await push_ms(stream, silence(lead_ms))
    await stream.speech_started()
    await push_ms(stream, speech(speech_ms))
    await stream.speech_ended()
    await push_ms(stream, silence(tail_ms))


async def collect(stream: SttStream, until: Callable[[SttResult], bool]) -> list[SttResult]:
    got: list[SttResult] = []
    async with asyncio.timeout(15), contextlib.aclosing(stream.results()) as results:
        async for result in results:
            got.append(result)
            if until(result):
                return got
    return got


async def failure(stream: SttStream) -> ProviderError:
    with pytest.raises(ProviderError) as raised:
        await collect(stream, lambda r: False)
    return raised.value


async def test_an_utterance_gives_partials_then_a_flushed_final_with_words(fake: FakeDeepgram) -> None:
    async with engine(fake) as dg:
        stream = await dg.open("s1", "en")
        await say(stream)
        got = await collect(stream, lambda r: r.flushed)
        await stream.aclose()
        got += await collect(stream, lambda r: False)  # what CloseStream brought

    first_final = next(i for i, r in enumerate(got) if r.is_final)
    partials, final = got[:first_final], got[first_final]
    assert len(partials) >= 2 and all(TEXT.startswith(p.text) for p in partials)
    assert final.flushed and final.text == TEXT
    assert [w.text for w in final.words] == TEXT.split()
    # the speech began 500 ms into the stream: word times are on the stream's clock, not Deepgram's
    assert 500 <= final.words[0].start_ms < 750
    assert all(a.end_ms <= b.start_ms for a, b in zip(final.words, final.words[1:]))

    conn = fake.accepted[0]
    assert conn.headers["authorization"] == f"Token {KEY}"
    assert conn.query["model"] == "nova-3" and conn.query["encoding"] == "linear16"
    assert conn.query["sample_rate"] == "16000" and conn.query["interim_results"] == "true"
    assert conn.query["endpointing"] == "300" and conn.query["utterance_end_ms"] == "1000"
    assert conn.query["vad_events"] == "true" and conn.query["smart_format"] == "true"
    assert conn.messages == ["Finalize", "CloseStream"]
    assert (conn.closed_by, conn.close_code) == ("server", 1000)
    # only speech and its pre-/post-roll went out, and every second of it is accounted for
    assert conn.audio_bytes == (15 + 1500 // 20 + 15) * FRAME
    assert sum(r.billed_s for r in got) == pytest.approx(conn.audio_bytes / BYTES_PER_S)


async def test_without_pre_roll_word_times_still_follow_the_stream_clock(fake: FakeDeepgram) -> None:
    async with engine(fake, preroll_ms=0, postroll_ms=100) as dg:
        stream = await dg.open("s1", "en")
        await say(stream, lead_ms=2000)
        got = await collect(stream, lambda r: r.flushed)
        await stream.aclose()
    assert fake.accepted[0].audio_bytes == (1500 + 100) * BYTES_PER_S // 1000
    assert 2000 <= got[-1].words[0].start_ms < 2250


async def test_a_long_silence_is_not_sent_and_keepalives_beat_the_idle_rule() -> None:
    fake = FakeDeepgram(api_key=KEY, script=[Utterance(TEXT)], idle_s=0.6)
    async with fake, engine(fake, keepalive_s=0.2) as dg:
        stream = await dg.open("s1", "en")
        await push_ms(stream, silence(3000))  # a caller listening: none of it goes out
        conn = fake.accepted[0]
        await fake.until(lambda: conn.keepalives >= 4)  # 0.8 s without audio: past the 0.6 s rule
        await say(stream)
        got = await collect(stream, lambda r: r.flushed)
        await stream.aclose()

    assert got[-1].text == TEXT
    assert len(fake.connections) == 1 and conn.close_code == 1000  # never closed by the idle rule
    assert conn.audio_bytes == (15 + 1500 // 20 + 15) * FRAME


async def test_without_keepalives_the_idle_rule_closes_the_stream() -> None:
    async with FakeDeepgram(api_key=KEY, idle_s=0.3) as fake, engine(fake, keepalive_s=5.0) as dg:
        stream = await dg.open("s1", "en")
        error = await failure(stream)
        await stream.aclose()
    assert isinstance(error, ProviderUnavailable) and error.retryable
    assert "1011 NET-0001" in str(error)
    assert (fake.accepted[0].closed_by, fake.accepted[0].close_code) == ("server", 1011)


async def test_utterance_end_ends_an_utterance_that_got_no_speech_final() -> None:
    fake = FakeDeepgram(api_key=KEY, script=[Utterance(TEXT)], final_every_s=0.5)
    async with fake, engine(fake, endpointing_ms=0) as dg:
        stream = await dg.open("s1", "en")
        await push_ms(stream, silence(200))
        await stream.speech_started()  # the VAD never hears the end (a noisy line)
        await push_ms(stream, speech(1500) + silence(1300))
        got = await collect(stream, lambda r: r.endpoint)
        await stream.aclose()
    finals = [r for r in got if r.is_final]
    conn = fake.accepted[0]
    assert conn.query["endpointing"] == "false"
    assert len(finals) >= 2 and " ".join(r.text for r in finals if r.text) == TEXT
    assert [r.endpoint for r in finals] == [False] * (len(finals) - 1) + [True]
    assert not any(r.flushed for r in finals)  # no speech_ended: nothing answers the VAD
    # the last words were still interim at UtteranceEnd: the adapter had Deepgram finalize them
    assert conn.sent_types().index("UtteranceEnd") < len(conn.sent) - 1
    assert conn.messages[0] == "Finalize"


@pytest.mark.parametrize("refusal", [HandshakeFault(500), HandshakeFault(429, "Too many", retry_after=0.1)])
async def test_a_refusal_is_retried_once_within_the_budget(
    fake: FakeDeepgram, refusal: HandshakeFault
) -> None:
    fake.handshake_faults = [refusal]
    async with engine(fake) as dg:
        stream = await dg.open("s1", "en")
        await say(stream)
        got = await collect(stream, lambda r: r.flushed)
        await stream.aclose()
    assert got[-1].text == TEXT
    assert [c.status for c in fake.connections] == [refusal.status, 101]


@pytest.mark.parametrize(
    ("refusal", "kind", "attempts", "retry_after"),
    [
        (HandshakeFault(500, "Internal error"), ProviderUnavailable, 2, None),
        (HandshakeFault(503, "Overloaded"), ProviderUnavailable, 2, None),
        (HandshakeFault(429, "Too many requests", retry_after=30), ProviderUnavailable, 1, 30.0),
        (HandshakeFault(403, "Forbidden: project has no access"), ProviderRejected, 1, None),
    ],
)
async def test_handshake_refusals_map_to_provider_errors(
    fake: FakeDeepgram,
    refusal: HandshakeFault,
    kind: type[ProviderError],
    attempts: int,
    retry_after: float | None,
) -> None:
    fake.refuse_all = refusal
    async with engine(fake) as dg:
        with pytest.raises(ProviderError) as raised:
            await dg.open("s1", "en")
    error = raised.value
    assert type(error) is kind and error.status == refusal.status
    assert error.retryable is (kind is ProviderUnavailable)
    assert error.retry_after_s == retry_after  # a 30 s retry-after does not fit a voice budget
    assert refusal.dg_error in str(error)
    assert len(fake.connections) == attempts


async def test_a_bad_key_is_rejected_without_retry(fake: FakeDeepgram) -> None:
    async with engine(fake, api_key="dg-wrong-key-0123456789") as dg:
        with pytest.raises(ProviderRejected) as raised:
            await dg.open("s1", "en")
    assert raised.value.status == 401 and not raised.value.retryable
    assert "INVALID_AUTH" in str(raised.value)
    assert len(fake.connections) == 1


@pytest.mark.parametrize(
    ("fault", "kind", "message"),
    [
        (StreamFault("close", at_s=0.6), ProviderUnavailable, "1011 NET-0000"),
        (
            StreamFault("close", at_s=0.6, code=1008, reason="DATA-0000"),
            ProviderUnavailable,
            "1008 DATA-0000",
        ),
        (StreamFault("abort", at_s=0.6), ProviderUnavailable, "dropped"),
        (StreamFault("error", at_s=0.6), ProviderUnavailable, "decoder failed"),
        (StreamFault("hang", at_s=0.6), ProviderTimeout, "no answer to audio"),
        (StreamFault("hang"), ProviderTimeout, "no flushed final"),  # hangs on Finalize
    ],
)
async def test_a_broken_stream_is_detected_not_waited_out(
    fake: FakeDeepgram, fault: StreamFault, kind: type[ProviderError], message: str
) -> None:
    fake.stream_faults = [fault]
    async with engine(fake) as dg:
        stream = await dg.open("s1", "en")
        await push_ms(stream, silence(500))
        await stream.speech_started()
        await push_ms(stream, speech(1000))
        if fault.at_s is None:
            await stream.speech_ended()
            await push_ms(stream, silence(400))
        error = await failure(stream)
        await stream.aclose()
        await asyncio.wait_for(fake.accepted[0].closed.wait(), 10)
    assert type(error) is kind and error.retryable
    assert message in str(error)
    if fault.kind == "hang":  # the adapter let go of the silent connection itself
        assert fake.accepted[0].closed_by == "client"


async def test_no_key_in_logs_or_errors(fake: FakeDeepgram, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # the websockets handshake logs every header at DEBUG
    errors: list[BaseException] = []
    fake.refuse_all = HandshakeFault(401, "INVALID_AUTH")
    async with engine(fake) as dg:
        with pytest.raises(ProviderRejected) as rejected:
            await dg.open("s1", "en")
        errors.append(rejected.value)
    fake.refuse_all = None
    fake.stream_faults = [StreamFault("close", at_s=0.4)]
    async with engine(fake) as dg:
        stream = await dg.open("s2", "en")
        await say(stream)
        errors.append(await failure(stream))
        await stream.aclose()
        stream = await dg.open("s3", "en")
        await say(stream)
        await collect(stream, lambda r: r.flushed)
        await stream.aclose()

    assert any("Authorization" in r.getMessage() for r in caplog.records)  # the header was logged...
    assert KEY not in caplog.text  # ...but never its value
    for record in caplog.records:
        assert KEY not in record.getMessage()
    for error in errors:
        assert KEY not in "".join(traceback.format_exception(error)) + repr(error)
    assert KEY not in repr(settings(fake))


async def test_provider_text_echoing_the_key_is_scrubbed(fake: FakeDeepgram) -> None:
    fake.stream_faults = [StreamFault("close", at_s=0.4, reason=f"bad token {KEY}")]
    async with engine(fake) as dg:
        stream = await dg.open("s1", "en")
        await say(stream)
        error = await failure(stream)
        await stream.aclose()
    assert "bad token [secret]" in str(error)


def test_the_gate_sends_speech_with_pre_and_post_roll_only() -> None:
    gate = SpeechGate(preroll=3, postroll=2)
    assert [gate.push(bytes([i])) for i in range(5)] == [[]] * 5
    assert gate.start() == [b"\x02", b"\x03", b"\x04"]  # the last 3 bytes of silence
    assert gate.push(b"s") == [b"s"]
    gate.stop()
    assert [gate.push(b"p"), gate.push(b"q"), gate.push(b"x")] == [[b"p"], [b"q"], []]
    assert not gate.is_open


def test_the_clock_map_undoes_the_gaps_in_sent_audio() -> None:
    clock = ClockMap()
    clock.start_run(0.0, 0.2)  # the first run began 200 ms into the stream
    clock.start_run(1.0, 5.0)  # one second later in Deepgram's clock, after 3.8 s of unsent silence
    assert clock.to_stream_ms(0.5) == 700
    assert clock.to_stream_ms(1.25) == 5250
