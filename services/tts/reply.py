"""One reply on its way from text chunks to frames on the bus, with engine failover and a watchdog.

The chunks of a reply (turn, generation) are pushed into one engine stream in index order as they
arrive; its audio becomes frames (``ReplyAudio``) published at once, egress does the pacing. If the
engine fails, or stays silent for ``VB_TTS_STALL_TIMEOUT`` while text waits, the failure is reported
and the next engine of the chain speaks the reply from the first chunk that has no audio yet (the
rest of a chunk cut off mid-way is lost rather than said twice). Frames keep counting, so the reply
stays one timeline. Only the first frame and the end are published inside the "tts.reply" span.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from prometheus_client import Counter

from proto import events as ev
from proto import subjects as sj
from proto.state import TtsReply
from services.runtime import metrics, tracing
from services.runtime.service import SessionContext
from services.tts.config import TtsConfig
from services.tts.engines.base import SynthAudio, TtsEngine, TtsError, TtsStream
from services.tts.engines.chunked import speakable
from services.tts.framing import Frame, ReplyAudio

log = logging.getLogger("voicebus.tts")

engine_failures = Counter(
    "vb_tts_engine_failures_total", "Replies an engine failed or stalled on, by engine", ["engine"]
)

#: How long a failed or cancelled engine stream may take to close before the reply goes on without it.
CLOSE_TIMEOUT_S = 1.0

_Item = SynthAudio | Exception | None  # a piece of audio, a failure of the stream, or its end


class BadChunk(ValueError):
    """A chunk that contradicts the reply's earlier chunks (after its last chunk, a second end)."""


class Stalled(TtsError):
    """The engine produced nothing for the stall timeout while text was waiting to be spoken."""


class Reply:
    """Synthesis of one reply (turn, generation)."""

    def __init__(
        self,
        ctx: SessionContext[Any],
        turn: int,
        generation: int,
        engines: Sequence[TtsEngine],
        cfg: TtsConfig,
        *,
        parent: Context | None = None,
        replay: bool = False,
    ) -> None:
        self.ctx, self.turn, self.generation = ctx, turn, generation
        self.engines, self.cfg = engines, cfg
        #: Restored after a takeover: spoken again from frame 0, without timing marks.
        self.replay = replay
        self.chunks: dict[int, str] = {}
        self.last: int | None = None
        self.task: asyncio.Task[None] | None = None
        self.cancelled = False
        self.audio = ReplyAudio(ctx.spec.output_rate, self.chunks, cfg.resample_quality)
        self._more = asyncio.Event()  # chunks arrived (or the last one did)
        self._received = time.monotonic()
        self._span = tracing.tracer().start_span(
            "tts.reply", context=parent, attributes=tracing.clean({"turn": turn, "generation": generation})
        )
        # watchdog: what the current engine was given and what it has said
        self._pushed = -1  # highest chunk pushed
        self._spoken = -1  # highest chunk with audio, whichever engine spoke it
        self._end_sent = False
        self._progress = 0.0  # monotonic time of the last push or piece

    @property
    def key(self) -> tuple[int, int]:
        """(turn, generation)."""
        return self.turn, self.generation

    def add(self, chunk: ev.ReplyChunk) -> bool:
        """Take a chunk; False if it is a repeat. Raises BadChunk if it contradicts the earlier ones."""
        if chunk.index in self.chunks:
            return False
        if self.last is not None and chunk.index > self.last:
            raise BadChunk(f"chunk {chunk.index} comes after the last chunk {self.last} of turn {self.turn}")
        if chunk.last:
            if any(i > chunk.index for i in self.chunks):
                raise BadChunk(f"chunk {chunk.index} says it is the last but later chunks came before it")
            self.last = chunk.index
        self.chunks[chunk.index] = chunk.text
        self._more.set()
        return True

    def restore(self, saved: TtsReply) -> None:
        """Take the chunks a predecessor had received."""
        self.chunks.update(saved.chunks)
        self.last = saved.last
        self._more.set()

    def state(self) -> TtsReply:
        """What a successor needs to speak this reply again."""
        return TtsReply(turn=self.turn, generation=self.generation, chunks=dict(self.chunks), last=self.last)

    @property
    def text(self) -> str:
        """The reply's text so far, chunks in order."""
        return " ".join(self.chunks[i].strip() for i in sorted(self.chunks) if self.chunks[i].strip())

    async def cancel(self) -> None:
        """Stop now: nothing more of this reply is published once this returns."""
        self.cancelled = True
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    # --- synthesis --------------------------------------------------------------------------------

    async def run(self) -> None:
        """Speak the reply to its end, then publish AgentAudioEnd."""
        try:
            await self._speak()
            for frame in self.audio.finish():
                await self._publish(frame)
            with trace.use_span(self._span):
                end = ev.AgentAudioEnd(
                    session=self.ctx.session,
                    turn=self.turn,
                    generation=self.generation,
                    frames=self.audio.frames,
                    text=self.text,
                )
                await self.ctx.publish(sj.AUDIO_OUT, end)
        finally:
            self._span.set_attributes({"frames": self.audio.frames, "cancelled": self.cancelled})
            self._span.end()

    async def _speak(self) -> None:
        for n, engine in enumerate(self.engines):
            try:
                await self._speak_with(engine, self._spoken + 1)
                return
            except TtsError as e:
                engine_failures.labels(engine.name).inc()
                then = (
                    f"{self.engines[n + 1].name} speaks from chunk {self._spoken + 1}"
                    if n + 1 < len(self.engines)
                    else "the rest of the reply is not spoken"
                )
                message = f"tts engine {engine.name} failed on turn {self.turn}: {e}; {then}"
                log.warning(message, exc_info=e.__cause__ is not None)
                await self.ctx.report("provider", message, turn=self.turn, retryable=e.retryable)

    async def _open(self, engine: TtsEngine, reply_id: str) -> TtsStream:
        try:
            async with asyncio.timeout(self.cfg.stall_s):
                return await engine.open(self.ctx.session, reply_id, self.ctx.spec.agent.voice)
        except TtsError:
            raise
        except TimeoutError:
            raise Stalled(f"{engine.name} did not open a stream in {self.cfg.stall_s:.1f} s") from None
        except Exception as e:  # a connection error of a cloud engine is still the engine's failure
            raise TtsError(f"{engine.name} could not open a stream: {e}") from e

    async def _close(self, engine: TtsEngine, stream: TtsStream) -> None:
        """Close a stream that failed or was cancelled, without letting a provider delay the stop."""
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await stream.cancel()
        except Exception:  # the stream is dead already; the reply goes on without it
            log.warning("could not close a %s stream", engine.name, exc_info=True)

    async def _speak_with(self, engine: TtsEngine, start: int) -> None:
        reply_id = f"{self.ctx.session}.{self.turn}.{self.generation}"
        stream = await self._open(engine, reply_id)
        self._span.set_attribute("engine", engine.name)
        self._pushed, self._end_sent, self._progress = start - 1, False, time.monotonic()
        items: asyncio.Queue[_Item] = asyncio.Queue()
        helpers = [
            asyncio.create_task(self._push(stream, start, items), name=f"tts-push:{reply_id}"),
            asyncio.create_task(self._read(stream, items), name=f"tts-read:{reply_id}"),
        ]
        finished = False
        try:
            while (piece := await self._next(items, engine)) is not None:
                self._spoken = max(self._spoken, piece.chunk)
                self._progress = time.monotonic()
                for frame in self.audio.add(piece):
                    await self._publish(frame)
            finished = True
        finally:
            for helper in helpers:
                helper.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            if not finished:
                await self._close(engine, stream)

    async def _next(self, items: asyncio.Queue[_Item], engine: TtsEngine) -> SynthAudio | None:
        """The next piece, or None at the end; raises TtsError if the stream failed or stalled."""
        while True:
            waiting = self._end_sent or self._pushed > self._spoken
            patience = self.cfg.stall_s - (time.monotonic() - self._progress) if waiting else self.cfg.stall_s
            try:
                async with asyncio.timeout(max(0.0, patience)):
                    item = await items.get()
            except TimeoutError:
                if waiting and time.monotonic() - self._progress >= self.cfg.stall_s:
                    raise Stalled(f"{engine.name} said nothing for {self.cfg.stall_s:.1f} s") from None
                continue
            if isinstance(item, TtsError):
                raise item
            if isinstance(item, Exception):  # an engine bug is still the engine's failure
                raise TtsError(f"{type(item).__name__}: {item}") from item
            return item

    async def _push(self, stream: TtsStream, start: int, items: asyncio.Queue[_Item]) -> None:
        """Feed the stream the chunks from ``start`` on, in index order, as they arrive; then end it."""
        try:
            index = start
            while True:
                while index in self.chunks:
                    if speakable(self.chunks[index]):
                        if self._pushed <= self._spoken and not self._end_sent:
                            self._progress = time.monotonic()  # the watchdog starts with this chunk
                        await stream.push_text(self.chunks[index], index)
                        self._pushed = index
                    index += 1
                if self.last is not None and index > self.last:
                    await stream.end()
                    self._end_sent, self._progress = True, time.monotonic()
                    return
                self._more.clear()
                await self._more.wait()
        except Exception as e:  # handed to the reading loop, which fails over
            items.put_nowait(e)

    async def _read(self, stream: TtsStream, items: asyncio.Queue[_Item]) -> None:
        try:
            async for piece in stream.audio():
                items.put_nowait(piece)
            items.put_nowait(None)
        except Exception as e:  # handed to the reading loop, which fails over
            items.put_nowait(e)

    async def _publish(self, frame: Frame) -> None:
        event = ev.AgentAudioFrame(
            session=self.ctx.session,
            turn=self.turn,
            generation=self.generation,
            index=frame.index,
            chunk=frame.chunk,
            pcm=frame.pcm,
            sample_rate=self.ctx.spec.output_rate,
            words=frame.words,
        )
        if frame.index > 0:
            await self.ctx.publish(sj.AUDIO_OUT, event)
            return
        at_ns = time.time_ns()
        with trace.use_span(self._span):  # the first frame carries the trace to egress
            await self.ctx.publish(sj.AUDIO_OUT, event)
        if not self.replay:
            ttfb = time.monotonic() - self._received
            self._span.set_attribute("ttfb_ms", round(ttfb * 1000, 1))
            metrics.turn_phase.labels("tts", "tts_ttfb").observe(ttfb)
            await self.ctx.mark(self.turn, "tts_first_audio", at_ns=at_ns)
