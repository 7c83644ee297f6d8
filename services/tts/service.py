"""The tts stage: reply text chunks in, the agent's voice out on ``audio.out`` (20 ms frames, grouped).

Per session, a ``TtsWorker`` follows the conversation feed. Each reply (turn, generation) gets its
own engine stream (``reply.Reply``); its chunks are de-duplicated by index and pushed in order. A
newer generation of a turn supersedes the older one; ``Cancel`` and ``Interrupt`` stop a reply at
once and are acknowledged once nothing more of it can be published. When a reply's audio is
complete the worker checkpoints the replies still in progress, so a successor speaks them again
(with the same frame indices: egress drops the frames it already has).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Literal

from proto import events as ev
from proto import subjects as sj
from proto.state import TtsState
from services.runtime import log as runtime_log
from services.runtime import service
from services.runtime.bus import Delivery
from services.runtime.config import RuntimeConfig, load
from services.tts.config import TtsConfig
from services.tts.engines import load_chain
from services.tts.engines.base import TtsEngine
from services.tts.engines.elevenlabs import ElevenLabsSettings
from services.tts.engines.fallback import FallbackSettings
from services.tts.reply import BadChunk, Reply

log = logging.getLogger("voicebus.tts")

#: ``closed`` value of an interrupted turn: every generation of it is over.
EVERY_GENERATION = 2**31
Acked = Literal["Interrupt", "Cancel", "SessionEnded"]
#: How many turns ``closed`` remembers (late chunks come seconds after a cancel, not turns).
KEEP_TURNS = 64


class TtsWorker(service.SessionWorker[TtsState]):
    """Speaks one session's replies."""

    def __init__(self, ctx: service.SessionContext[TtsState], engine: TtsEngine, cfg: TtsConfig) -> None:
        super().__init__(ctx)
        self.engine, self.cfg = engine, cfg
        self.replies: dict[tuple[int, int], Reply] = {}
        #: turn -> highest generation that is finished, cancelled or superseded
        self.closed: dict[int, int] = {}

    async def start(self) -> None:
        """After a takeover, speak the replies the predecessor had not finished, from frame 0."""
        if self.ctx.restored is None:
            return
        self.closed = dict(self.ctx.restored.closed)
        for saved in self.ctx.restored.replies:
            reply = Reply(self.ctx, saved.turn, saved.generation, self.engine, self.cfg, replay=True)
            reply.restore(saved)
            self._launch(reply)
        if self.replies:
            log.info("resuming %d replies after %s", len(self.replies), self.ctx.how)

    async def on_event(self, event: ev.Event, delivery: Delivery) -> None:
        """Reply chunks, and the control events that stop replies."""
        match event:
            case ev.ReplyChunk():
                await self._on_chunk(event, delivery)
            case ev.Cancel(turn=turn, generation=generation):
                await self._stop(lambda r: r.turn == turn and r.generation <= generation, turn, generation)
                await self._ack(event, "Cancel", turn)
            case ev.Interrupt(turn=turn):
                await self._stop(lambda r: r.turn <= turn, turn, EVERY_GENERATION)
                await self._ack(event, "Interrupt", turn)
            case ev.SessionEnded():
                await self._stop(lambda r: True)
                await self._ack(event, "SessionEnded", 0)

    async def idle(self) -> None:
        """Return when no reply is being spoken."""
        while tasks := [r.task for r in self.replies.values() if r.task is not None]:
            await asyncio.wait(tasks)

    async def close(self, handover: bool) -> None:
        """On handover, save the replies in progress for the successor; stop them."""
        if handover:
            await self.ctx.checkpoint(self._state())
        await self._stop(lambda r: True)

    # --- replies ----------------------------------------------------------------------------------

    async def _on_chunk(self, chunk: ev.ReplyChunk, delivery: Delivery) -> None:
        received_ns = time.time_ns()
        if chunk.generation <= self.closed.get(chunk.turn, -1):
            return  # a late or repeated chunk of a reply that is over
        reply = self.replies.get((chunk.turn, chunk.generation))
        if reply is not None:
            try:
                reply.add(chunk)
            except BadChunk as e:
                await self.ctx.report("malformed", str(e), turn=chunk.turn)
            return
        reply = Reply(self.ctx, chunk.turn, chunk.generation, self.engine, self.cfg, parent=delivery.parent)
        reply.add(chunk)
        self._launch(reply)
        # a newer generation supersedes the older ones of its turn
        older = chunk.generation - 1
        await self._stop(lambda r: r.turn == chunk.turn and r.generation <= older, chunk.turn, older)
        await self.ctx.mark(chunk.turn, "tts_text", at_ns=received_ns)

    def _launch(self, reply: Reply) -> None:
        self.replies[reply.key] = reply
        reply.task = self.ctx.spawn(self._run(reply), f"reply:{reply.turn}.{reply.generation}")

    async def _run(self, reply: Reply) -> None:
        try:
            await reply.run()
        except Exception as e:  # publishing failed for good; the session goes on with the next reply
            log.exception("reply to turn %d failed", reply.turn)
            await self.ctx.report("internal", f"reply to turn {reply.turn} failed: {e}", turn=reply.turn)
        if self.replies.get(reply.key) is reply:
            del self.replies[reply.key]
            self._close(reply.turn, reply.generation)
            await self.ctx.checkpoint(self._state())

    async def _stop(self, which: Callable[[Reply], bool], turn: int = -1, generation: int = -1) -> None:
        """Cancel the replies ``which`` selects (and close ``turn`` up to ``generation``).

        The bookkeeping is done before the first await, so a checkpoint taken meanwhile by another
        reply already leaves them out.
        """
        if turn >= 0:
            self._close(turn, generation)
        doomed = [r for r in self.replies.values() if which(r)]
        for reply in doomed:
            del self.replies[reply.key]
            self._close(reply.turn, reply.generation)
        await asyncio.gather(*(r.cancel() for r in doomed))

    def _close(self, turn: int, generation: int) -> None:
        self.closed[turn] = max(self.closed.get(turn, -1), generation)
        while len(self.closed) > KEEP_TURNS:
            del self.closed[min(self.closed)]

    def _state(self) -> TtsState:
        return TtsState(replies=[r.state() for r in self.replies.values()], closed=dict(self.closed))

    async def _ack(self, event: ev.Event, acked: Acked, turn: int) -> None:
        ack = ev.ControlAck(
            session=self.ctx.session,
            stage="tts",
            replica=self.ctx.bus.replica,
            acked=acked,
            turn=turn,
            acked_seq=event.seq,
        )
        await self.ctx.publish(sj.CONTROL, ack)


def main() -> int:
    """Load the engines (before the replica is ready), then serve sessions until SIGTERM."""
    runtime = load(RuntimeConfig)
    runtime_log.setup(runtime.log_level, redact_pii=runtime.redact_pii)
    cfg = load(TtsConfig)
    engine = load_chain(cfg, load(ElevenLabsSettings), load(FallbackSettings))
    return service.run("tts", lambda ctx: TtsWorker(ctx, engine, cfg), state_type=TtsState)
