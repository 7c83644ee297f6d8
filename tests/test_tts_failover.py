"""Engine failure inside one reply, on a real bus: through the fallback chain the next engine goes on
with the reply on the same frame timeline and the switch is reported; with no engine left, the reply
ends with what was said. Local engines count a sentence that takes too long as a failure."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator

import numpy as np
import pytest

from proto import events as ev
from proto.state import TtsState
from services.runtime.bus import Bus
from services.runtime.resilience import ProviderError
from services.runtime.service import SessionContext
from services.tools.stack import NatsServer
from services.tts.config import TtsConfig
from services.tts.engines.base import TtsEngine, TtsStream
from services.tts.engines.bench import BenchEngine
from services.tts.engines.chunked import ChunkedStream, Spoken
from services.tts.engines.fallback import FallbackTtsEngine
from services.tts.reply import Reply
from tests.conftest import runtime_config
from tests.support.nats import ContainerNats
from tests.support.tap import Tap

RATE: ev.AgentRate = 16_000


class Flaky(TtsEngine):
    """100 ms of tone per word at 16 kHz; fails on a chunk holding FAIL, says nothing on one holding HANG."""

    name = "flaky"

    async def open(self, session: str, reply_id: str, voice: str = "") -> TtsStream:
        return ChunkedStream(self.name, self.speak, stall_s=0.5)

    async def speak(self, text: str, received: float) -> AsyncGenerator[Spoken, None]:
        if "FAIL" in text:
            raise ProviderError(self.name, "synthesiser crashed", retryable=False)
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


@pytest.fixture
async def tts_bus(nats_server: NatsServer | ContainerNats) -> AsyncIterator[Bus]:
    """A connection that publishes as the tts stage would."""
    connected = await Bus.connect(runtime_config(nats_server.url), "tts", "test-tts")
    yield connected
    await connected.close()


@pytest.mark.parametrize(
    ("trouble", "chain", "said"),
    [
        ("FAIL", True, "tts engine flaky failed on turn 1; bench took over"),
        ("HANG", True, "tts engine flaky failed on turn 1; bench took over"),
        ("FAIL", False, "tts failed on turn 1 after 10 frames: flaky: synthesiser crashed"),
    ],
)
async def test_a_failing_engine_hands_the_rest_of_the_reply_on_or_ends_it_with_what_was_said(
    tts_bus: Bus, bus: Bus, session_id: str, trouble: str, chain: bool, said: str
) -> None:
    engine = FallbackTtsEngine([Flaky(), BenchEngine(speed=16)]) if chain else Flaky()
    ctx: SessionContext[TtsState] = SessionContext(
        tts_bus, ev.SessionSpec(session=session_id, output_rate=RATE), 1, "queue", None
    )
    reply = Reply(ctx, 1, 0, engine, TtsConfig())
    for index, text in enumerate(["one two", f"{trouble} three", "four five"]):
        reply.add(ev.ReplyChunk(session=session_id, turn=1, index=index, text=text, last=index == 2))
    async with Tap(bus, session_id) as tap:
        await until_tap_hears(tap, ctx)
        await reply.run()
        (end,) = await tap.wait(ev.AgentAudioEnd)
        (error,) = await tap.wait(ev.ErrorEvent)
    assert (error.stage, error.code, error.turn, error.message) == ("tts", "provider", 1, said)
    frames = tap.agent_frames()
    assert [f.index for f in frames] == list(range(end.frames))
    assert {len(f.pcm) for f in frames} == {ev.frame_bytes(RATE)}
    words = [w.text for f in frames for w in f.words]
    if chain:  # 200 ms from flaky, then 400 ms from bench (resampled from 24 kHz)
        assert sorted({f.chunk for f in frames}) == [0, 1, 2] and 30 <= end.frames <= 31
        assert words == ["one", "two", trouble, "three", "four", "five"]
    else:
        assert {f.chunk for f in frames} == {0} and end.frames == 10 and words == ["one", "two"]
