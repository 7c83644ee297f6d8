"""One reply on its way from text chunks to frames on the bus.

The chunks of a reply (turn, generation) are pushed into one engine stream in index order as they
arrive; its audio becomes frames (``ReplyAudio``) published at once, egress does the pacing. The frames
of all the audio the engine has handed over by then leave together, in ``AgentAudio`` events of up to
10 frames: a TTS faster than real time (or a process running behind) sends fewer messages, and nothing
is held back waiting for more. The engine is usually a fallback chain: when the engine speaking fails,
the next one goes on with the reply and the frames keep counting, so the reply stays one timeline; the
switch is reported to the session. If every engine fails, the reply ends with what was said. Only the
first audio and the end are published inside the "tts.reply" span. ``cancel`` does not rely on the
task's cancellation alone: on Python 3.11 ``asyncio.wait_for`` inside the NATS client's publish can
drop it, and the reply would then wait for chunks that never come, so a stop is also queued and checked
before every publish.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context

from proto import events as ev
from proto import subjects as sj
from proto.state import TtsReply
from services.runtime import metrics, tracing, usage
from services.runtime.resilience import ProviderError
from services.runtime.service import SessionContext
from services.tts.config import TtsConfig
from services.tts.engines.base import SynthAudio, TtsEngine, TtsStream
from services.tts.engines.chunked import speakable
from services.tts.engines.fallback import FallbackStream
from services.tts.framing import Frame, ReplyAudio, groups

log = logging.getLogger("voicebus.tts")

#: How long a failed or cancelled engine stream may take to close before the reply goes on without it.
CLOSE_TIMEOUT_S = 1.0


class _Stop:
    """Put in the reply's queue by ``cancel``: the reply stops even if the task's cancellation was lost."""


_Item = SynthAudio | Exception | _Stop | None  # audio, a failure of the stream, a stop, or its end


class BadChunk(ValueError):
    """A chunk that contradicts the reply's earlier chunks (after its last chunk, a second end)."""


class Reply:
    """Synthesis of one reply (turn, generation)."""

    def __init__(
        self,
        ctx: SessionContext[Any],
        turn: int,
        generation: int,
        engine: TtsEngine,
        cfg: TtsConfig,
        *,
        parent: Context | None = None,
        replay: bool = False,
    ) -> None:
        self.ctx, self.turn, self.generation = ctx, turn, generation
        self.engine, self.cfg = engine, cfg
        #: Restored after a takeover: spoken again from frame 0, without timing marks.
        self.replay = replay
        self.chunks: dict[int, str] = {}
        self.last: int | None = None
        self.task: asyncio.Task[None] | None = None
        self.cancelled = False
        self.audio = ReplyAudio(ctx.spec.output_rate, self.chunks, cfg.resample_quality)
        self._more = asyncio.Event()  # chunks arrived (or the last one did)
        self._received = time.monotonic()
        self._chars = 0  # characters handed to the engine: what a cloud TTS bills
        self._items: asyncio.Queue[_Item] = asyncio.Queue()
        self._span = tracing.tracer().start_span(
            "tts.reply", context=parent, attributes=tracing.clean({"turn": turn, "generation": generation})
        )

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
        self._items.put_nowait(_Stop())
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    # --- synthesis --------------------------------------------------------------------------------

    async def run(self) -> None:
        """Speak the reply to its end, then publish AgentAudioEnd."""
        try:
            await self._speak()
            await self._publish_all(self.audio.finish())
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
        reply_id = f"{self.ctx.session}.{self.turn}.{self.generation}"
        items = self._items
        stream: TtsStream | None = None
        helpers: list[asyncio.Task[None]] = []
        finished = False
        try:
            stream = await self.engine.open(self.ctx.session, reply_id, self.ctx.spec.agent.voice)
            helpers = [
                asyncio.create_task(self._push(stream, items), name=f"tts-push:{reply_id}"),
                asyncio.create_task(self._read(stream, items), name=f"tts-read:{reply_id}"),
            ]
            switches = 0
            ready: list[Frame] = []
            while (item := await items.get()) is not None:
                if isinstance(item, Exception):
                    await self._publish_all(ready)
                    raise item
                if isinstance(item, _Stop):
                    raise asyncio.CancelledError
                switches = await self._report_switch(stream, switches)
                ready += self.audio.add(item)
                if items.empty():  # all the engine has produced so far goes out now; nothing waits
                    await self._publish_all(ready)
                    ready = []
            await self._publish_all(ready)
            finished = True
        except ProviderError as e:
            message = f"tts failed on turn {self.turn} after {self.audio.frames} frames: {e}"
            log.warning(message)
            await self.ctx.report("provider", message, turn=self.turn, retryable=e.retryable)
        finally:
            # the stream first: its own stop ends its audio even if a helper's cancellation is lost
            if stream is not None and not finished:
                await self._close(stream)
            for helper in helpers:
                helper.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            served = stream.served_by if isinstance(stream, FallbackStream) else []
            if served:
                self._span.set_attribute("engines", ",".join(served))
            with trace.use_span(self._span, end_on_exit=False):
                # the first engine received the text as it came; a takeover re-sends only a cut chunk
                engine = served[0] if served else self.engine.name
                usage.record(self.ctx, self.turn, engine, {"tts_chars": self._chars})

    async def _report_switch(self, stream: TtsStream, reported: int) -> int:
        """Tell the session when the fallback chain moved this reply to another engine mid-way."""
        served = stream.served_by if isinstance(stream, FallbackStream) else []
        for before, after in zip(served[reported:], served[reported + 1 :]):
            message = f"tts engine {before} failed on turn {self.turn}; {after} took over"
            await self.ctx.report("provider", message, turn=self.turn, retryable=True)
        return max(reported, len(served) - 1)

    async def _close(self, stream: TtsStream) -> None:
        """Close a stream that failed or was cancelled, without letting a provider delay the stop."""
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await stream.cancel()
        except Exception:  # the stream is dead already; the reply goes on without it
            log.warning("could not close a %s stream", self.engine.name, exc_info=True)

    async def _push(self, stream: TtsStream, items: asyncio.Queue[_Item]) -> None:
        """Feed the stream the chunks in index order, as they arrive; then end it."""
        try:
            index = 0
            while True:
                while index in self.chunks:
                    if speakable(self.chunks[index]):
                        self._chars += len(self.chunks[index])
                        await stream.push_text(self.chunks[index], index)
                    index += 1
                if self.last is not None and index > self.last:
                    await stream.end()
                    return
                self._more.clear()
                await self._more.wait()
        except Exception as e:  # handed to the reading loop, which ends the reply
            items.put_nowait(e)

    async def _read(self, stream: TtsStream, items: asyncio.Queue[_Item]) -> None:
        try:
            async for piece in stream.audio():
                items.put_nowait(piece)
            items.put_nowait(None)
        except Exception as e:  # handed to the reading loop, which ends the reply
            items.put_nowait(e)

    async def _publish_all(self, frames: list[Frame]) -> None:
        """Frames that are ready, in as few ``AgentAudio`` events as they fit."""
        for group in groups(frames):
            await self._publish(group)

    async def _publish(self, frames: list[Frame]) -> None:
        """One ``AgentAudio`` of consecutive frames of one chunk; their words ride on its first frame."""
        if self.cancelled:  # on Python 3.11 a publish can swallow the task's cancellation
            raise asyncio.CancelledError
        first = frames[0]
        event = ev.AgentAudio(
            session=self.ctx.session,
            turn=self.turn,
            generation=self.generation,
            index=first.index,
            chunk=first.chunk,
            pcm=b"".join(f.pcm for f in frames),
            sample_rate=self.ctx.spec.output_rate,
            words=tuple(w for f in frames for w in f.words),
        )
        if first.index > 0:
            await self.ctx.publish(sj.AUDIO_OUT, event)
            return
        at_ns = time.time_ns()
        with trace.use_span(self._span):  # the first audio carries the trace to egress
            await self.ctx.publish(sj.AUDIO_OUT, event)
        if not self.replay:
            ttfb = time.monotonic() - self._received
            self._span.set_attribute("ttfb_ms", round(ttfb * 1000, 1))
            metrics.turn_phase.labels("tts", "tts_ttfb").observe(ttfb)
            await self.ctx.mark(self.turn, "tts_first_audio", at_ns=at_ns)
