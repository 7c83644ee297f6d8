"""The dialogue stage: owns the conversation of each session and streams the agent's replies.

It follows the session's conversation feed: ``UserTurnEnded`` starts a reply (in a session task,
never in the feed), ``PlayoutStopped`` tells what the caller heard of one (that enters the history),
``SessionStarted`` with a greeting starts turn 0, and control events stop replies. The caller's
speech over a reply goes to the barge-in decision (bargein.py), which interrupts or resumes it; a
turn that was only a backchannel over the agent is not answered. With ``VB_DIALOGUE_PREEMPTIVE`` a
final transcript starts the LLM before the turn has ended (preemptive.py).

The history and where the replies stand live in a ``DialogueState`` checkpointed on every change. A
replica that takes the session over restores it; if the last turn's reply was still being generated,
it generates it again as the next generation and cancels the one its predecessor left unfinished.

State is changed only before a handler's first ``await``: a checkpoint taken from a reply task in the
meantime then never claims an event whose effect it does not hold.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import Literal

from opentelemetry.context import Context

from proto import events as ev
from proto import subjects as sj
from proto.state import DialogueState
from services.dialogue import engines
from services.dialogue.bargein import BargeIn, Policy
from services.dialogue.chunker import Chunker
from services.dialogue.config import DialogueConfig
from services.dialogue.engines.anthropic import AnthropicSettings
from services.dialogue.engines.base import LlmDelta, LlmEngine, LlmRequest, TextDelta, ToolCall
from services.dialogue.engines.fallback import FallbackSettings
from services.dialogue.history import History
from services.dialogue.preemptive import Prefetch, same_text
from services.dialogue.reply import FollowUp, Reply, ReplyKind, Watchdog
from services.dialogue.tools import ToolRegistry, ToolSettings, registry
from services.runtime import log as logs
from services.runtime import service
from services.runtime.bus import Delivery
from services.runtime.config import RuntimeConfig, load
from services.runtime.service import SessionContext

log = logging.getLogger("voicebus.dialogue")

#: Replies sent to TTS whose playout reports are still awaited; older ones are forgotten.
UNPLAYED_KEPT = 8


async def _spoken(text: str) -> AsyncIterator[LlmDelta]:
    """A fixed text (the greeting) as a one-delta stream, so it takes the same path as a reply."""
    yield TextDelta(text)


class DialogueWorker(service.SessionWorker[DialogueState]):
    """One session's conversation: its history, and the replies being generated for it."""

    def __init__(
        self,
        ctx: SessionContext[DialogueState],
        engine: LlmEngine,
        cfg: DialogueConfig,
        tools: ToolRegistry | None = None,
    ) -> None:
        super().__init__(ctx)
        self.engine, self.cfg, self.tools = engine, cfg, tools
        self.state = ctx.restored or DialogueState()
        self.history = History(self.state.history, cfg.history_messages)
        self.watchdog = Watchdog(
            cfg.first_token_timeout_s,
            cfg.stall_timeout_s,
            hold_after_s=cfg.hold_after_s,
            hold_line=cfg.hold_line,
            failed_line=cfg.failed_line,
        )
        #: Replies being generated, oldest first: the last is the current one, which a newer turn (and
        #: later a barge-in) stops with ``Reply.cancel()``.
        self.active: list[Reply] = []
        #: Cancels this worker published: they come back on the feed and need no acknowledgement.
        self._own_cancels: set[tuple[int, int]] = set()
        self._saving = asyncio.Lock()
        self.bargein = BargeIn(ctx, Policy.of(cfg))
        #: A reply started on a turn's final transcript before the turn ended, and that turn's finals.
        self.prefetch: Prefetch | None = None
        self._finals: tuple[int, list[str]] = (-1, [])

    async def start(self) -> None:
        """On takeover, generate again a reply the predecessor left unfinished."""
        turn, generation = self.state.last_turn, self.state.generation
        if turn > self.state.answered_turn:
            log.info("regenerating the reply to turn %d after takeover", turn)
            self._begin(turn, generation + 1, None, stale=(turn, generation))

    async def on_event(self, event: ev.Event, delivery: Delivery) -> None:
        """Dispatch one conversation event of the session."""
        match event:
            case ev.SessionStarted(spec=spec) if spec.agent.greeting and self.state.last_turn < 0:
                self._begin(0, 0, delivery.parent)
            case ev.UserTurnEnded():
                await self._user_turn(event, delivery)
            case ev.SpeechStarted():
                self.bargein.on_event(event, delivery)
                await self._drop_prefetch()  # the caller goes on: the turn's text will change
            case ev.Transcript():
                self.bargein.on_event(event, delivery)
                if event.is_final and self.cfg.preemptive:
                    await self._preempt(event)
            case (
                ev.SpeechStopped()
                | ev.PlayoutStarted()
                | ev.PlayoutPaused()
                | ev.PlayoutResumed()
                | ev.ControlAck()
            ):
                self.bargein.on_event(event, delivery)
            case ev.PlayoutStopped():
                self.bargein.on_event(event, delivery)
                self._heard(event)
                await self._save()
            case ev.Cancel(turn=turn, generation=generation):
                if (turn, generation) in self._own_cancels:
                    self._own_cancels.discard((turn, generation))
                    return
                await self._stop(turn, generation)
                await self._ack("Cancel", event)
            case ev.Interrupt(turn=turn):
                await self._stop(turn)
                await self._ack("Interrupt", event)
            case ev.SessionEnded():
                for reply in list(self.active):
                    await self._halt(reply, announce=False)
                await self._ack("SessionEnded", event)

    async def _user_turn(self, event: ev.UserTurnEnded, delivery: Delivery) -> None:
        if event.turn <= self.state.last_turn:
            return  # delivered again (outputs are at-least-once): already answered or being answered
        text = event.text.strip()
        prefetch, self.prefetch = self.prefetch, None
        if not text:
            await self.ctx.report("malformed", f"UserTurnEnded {event.turn} has no text", turn=event.turn)
        elif self.bargein.ignores(event):
            log.info("turn %d was a backchannel over the agent's reply: not answered", event.turn)
        else:
            self.history.add_user(event.turn, text)
            if prefetch is not None and prefetch.turn == event.turn and same_text(prefetch.text, text):
                self._begin(event.turn, 0, delivery.parent, deltas=prefetch.deltas())
                return
            self._begin(event.turn, 0, delivery.parent)
        if prefetch is not None:
            await prefetch.cancel()

    async def _preempt(self, final: ev.Transcript) -> None:
        """Start the LLM on the turn's finals so far; the turn's end decides whether it is used."""
        if final.turn <= self.state.last_turn or not final.text.strip():
            return
        if self._finals[0] != final.turn:
            self._finals = (final.turn, [])
        turn, finals = self._finals
        finals.append(final.text.strip())
        text = " ".join(finals)
        preview = History(list(self.state.history), self.cfg.history_messages)
        preview.add_user(turn, text)
        stream = self.engine.stream(self._request(preview, turn))
        previous, self.prefetch = self.prefetch, Prefetch(self.ctx, turn, text, stream)
        if previous is not None:
            await previous.cancel()

    async def _drop_prefetch(self) -> None:
        prefetch, self.prefetch = self.prefetch, None
        if prefetch is not None:
            await prefetch.cancel()

    def _request(self, history: History, turn: int) -> LlmRequest:
        return LlmRequest(
            instructions=self.ctx.spec.agent.instructions,
            messages=history.prompt(turn),
            tools=self.tools.specs() if self.tools else (),
            max_tokens=self.cfg.llm_max_tokens,
        )

    def _begin(
        self,
        turn: int,
        generation: int,
        parent: Context | None,
        *,
        stale: tuple[int, int] | None = None,
        deltas: AsyncIterator[LlmDelta] | None = None,
    ) -> None:
        """Start the reply to ``turn``; it first stops the replies still generating (and ``stale``).

        ``deltas``: the LLM stream, when it was started ahead of the turn's end.
        """
        self.state.last_turn, self.state.generation = turn, generation
        kind: ReplyKind = "greeting" if turn == 0 and self.ctx.spec.agent.greeting else "reply"
        follow_up: FollowUp | None = None
        if kind == "greeting":
            deltas = _spoken(self.ctx.spec.agent.greeting)
        else:
            request = self._request(self.history, turn)
            if deltas is None:
                deltas = self.engine.stream(request)

            def follow_up(results: Sequence[tuple[ToolCall, str]]) -> AsyncIterator[LlmDelta]:
                return self.engine.stream(replace(request, tool_results=results))

        reply = Reply(
            self.ctx,
            turn=turn,
            generation=generation,
            kind=kind,
            deltas=deltas,
            engine=self.engine.name,
            chunker=Chunker(
                first_min_words=self.cfg.first_chunk_min_words,
                first_max_words=self.cfg.first_chunk_max_words,
                max_words=self.cfg.chunk_max_words,
            ),
            watchdog=self.watchdog,
            saved=self.ctx.spawn(self._save(), "checkpoint"),
            parent=parent,
            tools=self.tools,
            follow_up=follow_up,
        )
        superseded = list(self.active)
        self.active.append(reply)
        self.state.unplayed.append(reply.sent)
        del self.state.unplayed[:-UNPLAYED_KEPT]
        reply.task = self.ctx.spawn(self._respond(reply, superseded, stale), f"reply:{turn}.{generation}")

    async def _respond(self, reply: Reply, superseded: list[Reply], stale: tuple[int, int] | None) -> None:
        try:
            for old in superseded:
                await self._halt(old, announce=True)
            if stale is not None:
                await self._announce_cancel(*stale)
            await reply.run()
            self.state.answered_turn = max(self.state.answered_turn, reply.turn)
        finally:
            if reply in self.active:
                self.active.remove(reply)
        await self._save()

    async def _halt(self, reply: Reply, *, announce: bool) -> None:
        """Stop a reply being generated; ``announce`` it with a Cancel to TTS and egress."""
        if reply.complete:
            return  # generated to the end already: only a barge-in stops it now, at TTS and egress
        await reply.cancel()
        if reply in self.active:
            self.active.remove(reply)
        if reply.complete:
            return
        if not reply.chunks and reply.sent in self.state.unplayed:
            self.state.unplayed.remove(reply.sent)  # nothing went out: no playout report will come
        if announce:
            await self._announce_cancel(reply.turn, reply.generation)

    async def _stop(self, turn: int, generation: int | None = None) -> None:
        """Someone else cancelled (or the caller interrupted) a reply: stop generating it for good."""
        stopping = [r for r in self.active if r.turn == turn and generation in (None, r.generation)]
        if not stopping:
            return
        self.state.answered_turn = max(self.state.answered_turn, turn)  # nothing left to regenerate
        for reply in stopping:
            await self._halt(reply, announce=False)
        await self._save()

    async def _announce_cancel(self, turn: int, generation: int) -> None:
        self._own_cancels.add((turn, generation))
        cancel = ev.Cancel(session=self.ctx.session, turn=turn, generation=generation)
        await self.ctx.publish(sj.CONTROL, cancel)

    def _heard(self, event: ev.PlayoutStopped) -> None:
        """A reply's playout stopped: the whole reply, or the part the caller heard, enters the history."""
        unplayed = self.state.unplayed
        sent = next((s for s in unplayed if (s.turn, s.generation) == (event.turn, event.generation)), None)
        if sent is not None:
            unplayed.remove(sent)
        full = event.completed and sent is not None and sent.complete
        text = (sent.text if full and sent is not None else event.heard_text).strip()
        if text:
            self.history.add_agent(event.turn, event.generation, text, interrupted=not event.completed)

    async def _ack(self, acked: Literal["Interrupt", "Cancel", "SessionEnded"], event: ev.Event) -> None:
        ack = ev.ControlAck(
            session=self.ctx.session,
            stage="dialogue",
            replica=self.ctx.bus.replica,
            acked=acked,
            turn=getattr(event, "turn", 0),
            acked_seq=event.seq,
        )
        await self.ctx.publish(sj.CONTROL, ack)

    async def _save(self) -> None:
        """Checkpoint the state as it is now; one at a time, so the last one written is the newest."""
        async with self._saving:
            await self.ctx.checkpoint(self.state)

    async def idle(self) -> None:
        """Return once no reply is being generated (drain waits for this)."""
        while pending := [r.task for r in self.active if r.task is not None]:
            await asyncio.wait(pending)

    async def close(self, handover: bool) -> None:
        """Stop generating; on handover, save the state so the successor regenerates what was cut."""
        self.bargein.close()
        await self._drop_prefetch()
        for reply in list(self.active):
            await self._halt(reply, announce=False)
        if handover:
            await self._save()


def main() -> int:
    """Run one dialogue replica; the LLM is loaded before the replica says it is ready."""
    cfg = load(DialogueConfig)
    runtime = load(RuntimeConfig)
    logs.setup(runtime.log_level, redact_pii=runtime.redact_pii)  # the model load logs too
    engine = engines.create(cfg, load(AnthropicSettings), load(FallbackSettings))
    tools = registry(load(ToolSettings))
    try:
        return service.run(
            "dialogue", lambda ctx: DialogueWorker(ctx, engine, cfg, tools), state_type=DialogueState
        )
    finally:
        asyncio.run(engine.aclose())
