"""Engine failover inside one reply, on a real bus: an engine that fails or goes silent on a chunk is
reported, and the next engine speaks the reply from that chunk on, on the same frame timeline."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator

import numpy as np
import pytest

from proto import events as ev
from proto.state import TtsState
from services.runtime.bus import Bus
from services.runtime.service import SessionContext
from services.tools.stack import NatsServer
from services.tts.config import TtsConfig
from services.tts.engines.base import TtsEngine, TtsError, TtsStream
from services.tts.engines.bench import BenchEngine
from services.tts.engines.chunked import ChunkedStream, Spoken
from services.tts.reply import Reply
from tests.conftest import runtime_config
from tests.support.nats import ContainerNats
from tests.support.tap import Tap

RATE: ev.AgentRate = 16_000


class Flaky(TtsEngine):
    """100 ms of tone per word at 16 kHz; raises on a chunk holding FAIL, says nothing on one holding HANG."""

    name = "flaky"

    async def open(self, session: str, reply_id: str, voice: str = "") -> TtsStream:
        return ChunkedStream(self.speak)

    async def speak(self, text: str, received: float) -> AsyncGenerator[Spoken, None]:
        if "FAIL" in text:
            raise TtsError("synthesiser crashed")
        if "HANG" in text:
            await asyncio.Event().wait()
        samples = RATE // 10 * len(text.split())
        yield Spoken(text, (np.sin(np.arange(samples) / 5) * 9000).astype(np.int16).tobytes(), RATE)


async def until_tap_hears(tap: Tap, ctx: SessionContext[TtsState]) -> None:
    """Wait until the tap receives what ``ctx`` publishes.

    nats-server 2.9 can leave a fresh subscription unseen by other connections for a few
    milliseconds (measured: ~4 % of publishes made right after the subscriber's flush are lost).
    """
    for _ in range(100):
        await ctx.mark(0, "tts_text")
        with contextlib.suppress(AssertionError):
            await tap.wait(ev.TurnMark, timeout=0.05)
            return
    raise AssertionError("the tap never heard the tts connection")


class Unreachable(TtsEngine):
    """A cloud engine whose provider refuses the connection."""

    name = "unreachable"

    async def open(self, session: str, reply_id: str, voice: str = "") -> TtsStream:
        raise ConnectionRefusedError("connection refused")


@pytest.fixture
async def tts_bus(nats_server: NatsServer | ContainerNats) -> AsyncIterator[Bus]:
    """A connection that publishes as the tts stage would."""
    connected = await Bus.connect(runtime_config(nats_server.url), "tts", "test-tts")
    yield connected
    await connected.close()


async def speak(
    tts_bus: Bus, bus: Bus, session: str, engines: list[TtsEngine], texts: list[str]
) -> tuple[Tap, ev.AgentAudioEnd, ev.ErrorEvent]:
    """Speak one reply (turn 1) with ``engines``; the tap, the reply's end and the one error reported."""
    ctx: SessionContext[TtsState] = SessionContext(
        tts_bus, ev.SessionSpec(session=session, output_rate=RATE), 1, "queue", None
    )
    reply = Reply(ctx, 1, 0, engines, TtsConfig(stall_s=0.5))
    for index, text in enumerate(texts):
        reply.add(
            ev.ReplyChunk(session=session, turn=1, index=index, text=text, last=index == len(texts) - 1)
        )
    async with Tap(bus, session) as tap:
        await until_tap_hears(tap, ctx)
        await reply.run()
        (end,) = await tap.wait(ev.AgentAudioEnd)
        (error,) = await tap.wait(ev.ErrorEvent)
    assert (error.stage, error.code, error.turn) == ("tts", "provider", 1)
    return tap, end, error


@pytest.mark.parametrize(
    ("trouble", "fallback", "said"),
    [
        ("FAIL", True, "synthesiser crashed; bench speaks from chunk 1"),
        ("HANG", True, "flaky said nothing for 0.5 s; bench speaks from chunk 1"),
        ("FAIL", False, "the rest of the reply is not spoken"),
    ],
)
async def test_the_fallback_engine_speaks_from_the_chunk_the_primary_failed_on(
    tts_bus: Bus, bus: Bus, session_id: str, trouble: str, fallback: bool, said: str
) -> None:
    engines: list[TtsEngine] = [Flaky(), BenchEngine(speed=16)] if fallback else [Flaky()]
    tap, end, error = await speak(
        tts_bus, bus, session_id, engines, ["one two", f"{trouble} three", "four five"]
    )
    assert said in error.message
    frames = tap.of(ev.AgentAudioFrame)
    assert [f.index for f in frames] == list(range(end.frames))
    assert {len(f.pcm) for f in frames} == {ev.frame_bytes(RATE)}
    words = [w.text for f in frames for w in f.words]
    if fallback:  # 200 ms from flaky, then 400 ms from bench (resampled from 24 kHz)
        assert sorted({f.chunk for f in frames}) == [0, 1, 2] and 30 <= end.frames <= 31
        assert words == ["one", "two", trouble, "three", "four", "five"]
    else:
        assert {f.chunk for f in frames} == {0} and end.frames == 10 and words == ["one", "two"]


async def test_an_engine_that_cannot_open_a_stream_hands_the_whole_reply_to_the_fallback(
    tts_bus: Bus, bus: Bus, session_id: str
) -> None:
    tap, end, error = await speak(tts_bus, bus, session_id, [Unreachable(), Flaky()], ["one two", "three"])
    assert (
        "unreachable could not open a stream: connection refused; flaky speaks from chunk 0" in error.message
    )
    assert end.frames == 15 and [f.index for f in tap.of(ev.AgentAudioFrame)] == list(range(15))
