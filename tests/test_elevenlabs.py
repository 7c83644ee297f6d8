"""The ElevenLabs engine against the local fake speaking the provider's protocol: the real adapter,
the real websockets client and the official SDK on the HTTP path."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from services.runtime.config import load
from services.runtime.resilience import ProviderError, ProviderRejected, ProviderTimeout, ProviderUnavailable
from services.tts.engines.base import SynthAudio, TtsStream
from services.tts.engines.elevenlabs import ElevenLabsEngine, ElevenLabsSettings, ElevenLabsStream
from tests.fakes.elevenlabs import CHAR_MS, FakeElevenLabs, Faults, char_pcm

KEY = f"sk_{uuid.uuid4().hex}"
RATE = 16000
VOICE = "21m00Tcm4TlvDq8ikWAM"


def settings(fake: FakeElevenLabs, **overrides: Any) -> ElevenLabsSettings:
    values: dict[str, Any] = {"api_key": KEY, "base_url": fake.url, "sample_rate": RATE, **overrides}
    return load(ElevenLabsSettings, environ={}, **values)


@asynccontextmanager
async def serving(
    faults: Faults | None = None, **overrides: Any
) -> AsyncIterator[tuple[FakeElevenLabs, ElevenLabsEngine]]:
    async with FakeElevenLabs(KEY, faults) as fake:
        engine = ElevenLabsEngine(settings(fake, **overrides))
        try:
            yield fake, engine
        finally:
            await engine.aclose()


class Listener:
    """Consumes a stream's audio in a task, so a test can push text while audio flows."""

    def __init__(self, stream: TtsStream) -> None:
        self.pieces: list[SynthAudio] = []
        self.error: BaseException | None = None
        self._changed = asyncio.Event()
        self._task = asyncio.create_task(self._run(stream))

    async def _run(self, stream: TtsStream) -> None:
        try:
            async for piece in stream.audio():
                self.pieces.append(piece)
                self._changed.set()
        except Exception as e:
            self.error = e
        finally:
            self._changed.set()

    def pcm(self, chunk: int) -> bytes:
        return b"".join(p.pcm for p in self.pieces if p.chunk == chunk)

    async def until(self, predicate: Any) -> None:
        async with asyncio.timeout(10):
            while not predicate(self):
                if self._task.done():
                    raise AssertionError(f"audio ended early: {self.error!r}")
                self._changed.clear()
                await self._changed.wait()

    async def done(self) -> list[SynthAudio]:
        async with asyncio.timeout(10):
            await self._task
        if self.error is not None:
            raise self.error
        return self.pieces


def spoken(text: str) -> bytes:
    """The fake's audio for one chunk as the adapter sends it (trailing space included)."""
    return b"".join(char_pcm(c, RATE) for c in text.strip() + " ")


async def speak(
    engine: ElevenLabsEngine, chunks: Sequence[str], reply: str = "r1", session: str = "s1"
) -> list[SynthAudio]:
    stream = await engine.open(session, reply)
    for i, text in enumerate(chunks):
        await stream.push_text(text, i)
    await stream.end()
    return await Listener(stream).done()


async def test_a_reply_of_two_chunks_comes_back_as_pcm_with_word_timings() -> None:
    chunks = ["Hello there.", "How are you today?"]
    async with serving() as (fake, engine):
        stream = await engine.open("s1", "turn-1")
        assert isinstance(stream, ElevenLabsStream)
        for i, text in enumerate(chunks):
            await stream.push_text(text, i)
        await stream.end()
        pieces = await Listener(stream).done()

    assert {p.sample_rate for p in pieces} == {RATE}
    assert [p.chunk for p in pieces] == sorted(p.chunk for p in pieces)
    for i, text in enumerate(chunks):
        assert b"".join(p.pcm for p in pieces if p.chunk == i) == spoken(text)
        words = [w for p in pieces if p.chunk == i for w in p.words]
        assert [w.text for w in words] == text.split()
        for w in words:  # times from the chunk's audio start, as the fake placed the letters
            first = text.index(w.text)
            last = first + max(k for k, c in enumerate(w.text) if c.isalnum())
            assert (w.start_ms, w.end_ms) == (first * CHAR_MS, (last + 1) * CHAR_MS)
    # the wire: one socket, key in the header and the context init, text flushed per chunk, then closed
    (handshake,) = fake.seen.handshakes
    assert handshake["path"] == f"/v1/text-to-speech/{VOICE}/multi-stream-input"
    assert handshake["query"]["model_id"] == "eleven_flash_v2_5"
    assert handshake["query"]["output_format"] == f"pcm_{RATE}"
    assert handshake["header_key"]
    (init,) = fake.seen.inits
    assert init["text"] == " " and init["context_id"] == "turn-1" and init["key_in_message"]
    assert set(init["voice_settings"]) >= {"stability", "similarity_boost"}
    assert fake.seen.texts == [("turn-1", "Hello there. ", True), ("turn-1", "How are you today? ", True)]
    assert fake.seen.closed == ["turn-1"] and fake.seen.finals == ["turn-1"]
    assert stream.transport == "websocket"
    assert stream.characters == sum(len(t) + 1 for t in chunks)


async def test_cancel_closes_the_context_and_late_frames_never_reach_the_next_reply() -> None:
    async with serving() as (fake, engine):
        fake.chars_per_frame, fake.frame_gap_s = 2, 0.02
        first = await engine.open("s1", "turn-1")
        await first.push_text("This answer is going to be interrupted by the caller quite soon.", 0)
        listener = Listener(first)
        await listener.until(lambda c: c.pieces)
        await first.cancel()
        heard = len(listener.pieces)
        await listener.done()
        assert len(listener.pieces) == heard  # nothing after the cancel
        await fake.wait(lambda s: s.closed == ["turn-1"] and "turn-1" in s.late)

        after = await speak(engine, ["Yes?"], reply="turn-2")
        assert b"".join(p.pcm for p in after) == spoken("Yes?")
        assert {p.chunk for p in after} == {0}
        assert engine.socket("s1", VOICE).dropped >= fake.seen.late.count("turn-1")
        assert len(fake.seen.handshakes) == 1  # the same socket served both replies


async def test_a_context_per_reply_never_reaches_the_five_context_limit() -> None:
    async with serving() as (fake, engine):
        for n in range(7):
            if n % 2:  # every other reply is interrupted after its first audio
                stream = await engine.open("s1", f"turn-{n}")
                await stream.push_text("A reply the caller talks over.", 0)
                listener = Listener(stream)
                await listener.until(lambda c: c.pieces)
                await stream.cancel()
                await listener.done()
            else:
                assert await speak(engine, ["Short answer."], reply=f"turn-{n}")
    assert fake.seen.opened == [f"turn-{n}" for n in range(7)]
    assert sorted(fake.seen.closed) == sorted(fake.seen.opened)
    assert fake.seen.max_active <= 2 and "max_active_conversations" not in fake.seen.errors
    assert len(fake.seen.handshakes) == 1


async def test_the_context_limit_error_is_recovered_on_a_fresh_socket() -> None:
    async with serving(Faults(on_connection=1, max_contexts=0)) as (fake, engine):
        pieces = await speak(engine, ["Hello there.", "Still here."])
    assert fake.seen.errors == ["max_active_conversations"]
    assert len(fake.seen.handshakes) == 2
    assert b"".join(p.pcm for p in pieces if p.chunk == 1) == spoken("Still here.")


async def test_an_input_timeout_mid_reply_reconnects_without_losing_or_repeating_chunks() -> None:
    async with serving(Faults(on_connection=1, inactivity_s=0.3), keepalive_s=30.0) as (fake, engine):
        stream = await engine.open("s1", "turn-1")
        listener = Listener(stream)
        await stream.push_text("First part.", 0)
        await listener.until(lambda c: c.pcm(0) == spoken("First part."))
        await fake.wait(lambda s: "input_timeout_exceeded" in s.errors)  # the LLM was slow
        await stream.push_text("Second part.", 1)
        await stream.end()
        pieces = await listener.done()
    assert b"".join(p.pcm for p in pieces if p.chunk == 1) == spoken("Second part.")
    assert b"".join(p.pcm for p in pieces if p.chunk == 0) == spoken("First part.")
    assert len(fake.seen.handshakes) == 2
    assert [t for _, t, _ in fake.seen.texts] == ["First part. ", "Second part. "]


async def test_keepalives_hold_a_context_open_while_the_llm_is_slow() -> None:
    async with serving(Faults(inactivity_s=0.4), keepalive_s=0.1) as (fake, engine):
        stream = await engine.open("s1", "turn-1")
        listener = Listener(stream)
        await stream.push_text("First part.", 0)
        await listener.until(lambda c: c.pcm(0) == spoken("First part."))
        await fake.wait(lambda s: len(s.keepalives) >= 10)  # about a second without text
        await stream.push_text("Second part.", 1)
        await stream.end()
        await listener.done()
    assert set(fake.seen.keepalives) == {"turn-1"}
    assert fake.seen.errors == [] and len(fake.seen.handshakes) == 1
    assert listener.pcm(1) == spoken("Second part.")


async def test_http_stream_serves_the_reply_when_the_websocket_handshake_fails() -> None:
    chunks = ["Hello there.", "How are you?"]
    async with serving(Faults(ws_status=503)) as (fake, engine):
        stream = await engine.open("s1", "turn-1")
        for i, text in enumerate(chunks):
            await stream.push_text(text, i)
        await stream.end()
        pieces = await Listener(stream).done()
        assert stream.transport == "http"
        for i, text in enumerate(chunks):
            assert b"".join(p.pcm for p in pieces if p.chunk == i) == spoken(text)
        assert [r["body"]["text"] for r in fake.seen.http] == [t + " " for t in chunks]
        assert fake.seen.http[1]["body"]["previous_text"] == "Hello there. "
        assert {r["query"]["output_format"] for r in fake.seen.http} == {f"pcm_{RATE}"}
        assert {r["body"]["model_id"] for r in fake.seen.http} == {"eleven_flash_v2_5"}

        await speak(engine, ["Again."], reply="turn-2")
        assert len(fake.seen.handshakes) == 1  # the WebSocket is skipped for a while
        assert len(fake.seen.http) == 3


async def test_a_bad_key_is_rejected_at_the_handshake_without_trying_http() -> None:
    async with FakeElevenLabs(KEY) as fake:
        engine = ElevenLabsEngine(settings(fake, api_key="sk_wrong_key_0123456789"))
        try:
            with pytest.raises(ProviderRejected) as err:
                await speak(engine, ["Hello."])
        finally:
            await engine.aclose()
    assert err.value.status == 401 and not err.value.retryable
    assert fake.seen.http == []


@pytest.mark.parametrize(
    ("faults", "error", "retryable"),
    [
        (Faults(ws_status=503, http_status=401), ProviderRejected, False),
        (Faults(ws_status=503, http_status=422), ProviderRejected, False),
        (Faults(ws_status=503, http_status=429), ProviderUnavailable, True),
        (Faults(ws_status=503, http_drop_after_bytes=4000), ProviderUnavailable, True),
        (Faults(ws_status=503, http_stall_after_bytes=4000), ProviderTimeout, True),
        (Faults(ws_status=503, http_first_byte_delay_s=30), ProviderTimeout, True),
        (Faults(first_audio_delay_s=30), ProviderTimeout, True),
        (Faults(stall_after_frames=2), ProviderTimeout, True),
        (Faults(drop_after_frames=2), ProviderUnavailable, True),
        (Faults(ws_handshake_delay_s=30), ProviderTimeout, True),
    ],
    ids=[
        "http-401",
        "http-422",
        "http-429",
        "http-drop",
        "http-stall",
        "http-slow",
        "ws-slow",
        "ws-stall",
        "ws-drop",
        "ws-handshake-hangs",
    ],
)
async def test_each_fault_ends_in_its_typed_error_within_the_budget(
    faults: Faults, error: type[ProviderError], retryable: bool
) -> None:
    async with serving(faults, first_audio_s=0.3, stall_s=0.3, connect_s=0.3) as (fake, engine):
        with pytest.raises(error) as err:
            await speak(engine, ["A sentence long enough to span several audio frames."])
    assert err.value.retryable is retryable
    if faults.http_status == 429:
        assert err.value.retry_after_s == 1.0
    if faults.ws_handshake_delay_s:
        assert fake.seen.http == []  # a host that does not answer is not tried again over HTTP
    elif isinstance(err.value, ProviderTimeout):
        assert "0.3s" in str(err.value)  # the engine's budget fired, not the fake's delay


async def test_the_fake_buffers_until_the_schedule_or_a_flush_and_insists_on_the_opening_space() -> None:
    """The fake's own protocol rules, spoken to with a bare websockets client (what the tests rely on)."""
    async with FakeElevenLabs(KEY) as fake:
        url = fake.url.replace("http", "ws") + f"/v1/text-to-speech/{VOICE}/multi-stream-input"
        query = f"?model_id=eleven_flash_v2_5&output_format=pcm_{RATE}"
        async with connect(url + query, additional_headers={"xi-api-key": KEY}) as ws:
            await ws.send(json.dumps({"text": "Hello ", "context_id": "a"}))
            error = json.loads(await ws.recv())
            with pytest.raises(ConnectionClosed):
                await ws.recv()
        assert error["error"] == "invalid_input_message" and ws.close_code == 1008

        async with connect(url + query, additional_headers={"xi-api-key": KEY}) as ws:
            schedule = {"chunk_length_schedule": [50]}
            await ws.send(json.dumps({"text": " ", "context_id": "a", "generation_config": schedule}))
            await ws.send(json.dumps({"text": "Not yet. ", "context_id": "a"}))  # below 50 characters
            await ws.send(json.dumps({"text": "Now. ", "context_id": "a", "flush": True}))
            chars = ""
            while chars != "Not yet. Now. ":
                message = json.loads(await ws.recv())
                assert message["contextId"] == "a"
                chars += "".join(message["alignment"]["chars"])
            assert fake.seen.texts == [("a", "Not yet. ", False), ("a", "Now. ", True)]
            await ws.send(json.dumps({"context_id": "a", "close_context": True}))
            assert json.loads(await ws.recv()) == {"isFinal": True, "contextId": "a"}
