"""One generation of the agent's reply to a turn: engine deltas -> chunker -> ReplyChunks on the bus.

A reply runs in its own session task. ``cancel()`` closes the engine stream (the provider connection,
or the local model's slot) at once, and no chunk of the reply goes out after it: a newer turn stops a
reply that way, and so will a barge-in. Besides cancelling the task it sets a flag checked before
every chunk, because on Python 3.11 ``asyncio.wait_for`` (inside the NATS client's publish) drops a
cancellation that arrives in the same loop iteration as the publish's acknowledgement.

Every LLM stream has a watchdog: no first token within ``first_token_timeout_s``, or a silence longer
than ``stall_timeout_s`` later, ends the reply with what it has and reports the provider as failed,
rather than leaving the caller in dead air for as long as the provider cares to take.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from opentelemetry import trace
from opentelemetry.context import Context

from proto import events as ev
from proto import subjects as sj
from proto.state import SentReply
from services.dialogue.chunker import Chunker
from services.dialogue.engines.base import LlmDelta, LlmError, TextDelta, ToolCall, ToolStart, Usage
from services.dialogue.tools import ToolRegistry
from services.runtime import metrics, tracing, usage
from services.runtime.log import turn_var
from services.runtime.resilience import ProviderError
from services.runtime.service import SessionContext

log = logging.getLogger("voicebus.dialogue")

ReplyKind = Literal["reply", "greeting"]


@dataclass(frozen=True, slots=True)
class Watchdog:
    """How long a reply waits for the engine, and what the caller hears instead of dead air.

    ``hold_line`` is spoken when nothing has gone out ``hold_after_s`` after the request (a slow or
    failing-over LLM); ``failed_line`` when the engine gives up before saying anything.
    """

    first_token_timeout_s: float
    stall_timeout_s: float
    hold_after_s: float = 0.0
    hold_line: str = "One moment, please."
    failed_line: str = "Sorry, I am having trouble right now. Could you say that again?"


#: Rounds of tool calls one reply may make before it is cut off (a model calling tools in a loop).
MAX_TOOL_ROUNDS = 3

FollowUp = Callable[[Sequence[tuple[ToolCall, str]]], AsyncIterator[LlmDelta]]


class Reply:
    """Streams one (turn, generation) of the agent's reply as ReplyChunks; ``task`` runs it."""

    def __init__(
        self,
        ctx: SessionContext[Any],
        *,
        turn: int,
        generation: int,
        kind: ReplyKind,
        deltas: AsyncIterator[LlmDelta],
        engine: str,
        chunker: Chunker,
        watchdog: Watchdog,
        saved: asyncio.Task[None],
        parent: Context | None,
        tools: ToolRegistry | None = None,
        follow_up: FollowUp | None = None,
    ) -> None:
        self.ctx, self.turn, self.generation, self.kind = ctx, turn, generation, kind
        self.deltas, self.engine, self.chunker, self.watchdog = deltas, engine, chunker, watchdog
        self.saved, self.parent = saved, parent
        #: runs the tool calls the engine asks for; ``follow_up`` asks it again with their results
        self.tools, self.follow_up = tools, follow_up
        self.task: asyncio.Task[None] | None = None
        #: What went out so far (chunks joined) and whether the last chunk did, as the state keeps it
        #: until the playout report comes.
        self.sent = SentReply(turn=turn, generation=generation, text="", complete=False)
        self.chunks = 0
        self._stopped = False
        self._requested = 0.0
        self._spoke = False  # the engine has produced text
        self._held = False  # a hold line or a tool's filler went out

    @property
    def complete(self) -> bool:
        """The last chunk went out: the reply needs no more generating."""
        return self.sent.complete

    async def cancel(self) -> None:
        """Stop generating: close the engine stream, publish nothing more; returns once stopped."""
        self._stopped = True
        if self.task is not None and not self.task.done():
            self.task.cancel()
            await asyncio.wait({self.task})

    @property
    def uses_llm(self) -> bool:
        """A greeting is spoken as written; only replies are generated (and timed as such)."""
        return self.kind == "reply"

    async def run(self) -> None:
        """Stream the reply to its last chunk (cancelled: stop at once, nothing more goes out)."""
        turn_var.set(self.turn)
        attrs = {"turn": self.turn, "generation": self.generation, "kind": self.kind, "engine": self.engine}
        with tracing.span("dialogue.reply", parent=self.parent, **attrs) as span:
            self._requested = time.monotonic()
            self._mark("llm_request")
            try:
                await self._stream()
            except (LlmError, ProviderError) as e:
                log.warning("reply to turn %d ended early: %s", self.turn, e)
                message = f"{self.engine}: {e}"
                await self.ctx.report("provider", message, turn=self.turn, retryable=e.retryable)
                if not self._spoke and self.uses_llm:
                    span.set_attribute("degraded", "failed")
                    await self._send(self.watchdog.failed_line, last=False)
            except Exception as e:  # an engine bug must not leave TTS waiting for a last chunk
                log.exception("engine %s failed", self.engine)
                await self.ctx.report("internal", f"{self.engine}: {type(e).__name__}: {e}", turn=self.turn)
            await self._send(self.chunker.flush(), last=True)
            span.set_attribute("chunks", self.chunks)

    async def _stream(self) -> None:
        """The engine's deltas into chunks; tool calls are run and the engine asked again."""
        results: list[tuple[ToolCall, str]] = []
        for _ in range(MAX_TOOL_ROUNDS + 1):
            calls: list[ToolCall] = []
            limit = self.watchdog.first_token_timeout_s
            try:
                while (delta := await self._next(limit)) is not None:
                    self._check_stopped()
                    match delta:
                        case TextDelta(text=text) if text:
                            limit = self.watchdog.stall_timeout_s
                            if not self._spoke:
                                self._spoke = True
                                self._mark("llm_first_token")
                                self._observe("llm_ttft")
                            for chunk in self.chunker.push(text):
                                await self._send(chunk, last=False)
                        case ToolStart(name=name):
                            await self._filler(name)
                        case ToolCall(name=name):
                            await self._filler(name)
                            calls.append(delta)
                        case Usage():
                            self._count(delta)
            finally:
                aclose = getattr(self.deltas, "aclose", None)
                if aclose is not None:
                    await aclose()
            if not calls:
                return
            if self.tools is None or self.follow_up is None:
                raise LlmError(f"asked for tool {calls[0].name!r}, but no tool was offered")
            results += await self.tools.run_tool_calls(calls)
            self._check_stopped()
            self.deltas = self.follow_up(results)
        raise LlmError(f"more than {MAX_TOOL_ROUNDS} rounds of tool calls", retryable=False)

    async def _next(self, limit: float) -> LlmDelta | None:
        """The engine's next delta within ``limit``; the hold line goes out if the first is slow.

        The delta is awaited as a task of its own so that the hold line can be sent while the
        engine keeps working on it (a timeout around ``anext`` would close the engine stream).
        """
        step: asyncio.Future[LlmDelta] = asyncio.ensure_future(anext(self.deltas))
        try:
            # the hold line is due when nothing has gone out yet (text may sit in the chunker)
            hold_s = self._requested + self.watchdog.hold_after_s - time.monotonic()
            due = self.uses_llm and self.watchdog.hold_after_s and not (self.chunks or self._held)
            if due and hold_s < limit:
                await asyncio.wait({step}, timeout=max(0.0, hold_s))
                if not step.done():
                    self._held = True
                    trace.get_current_span().set_attribute("degraded", "hold")
                    await self._send(self.watchdog.hold_line, last=False)
                    limit -= max(0.0, hold_s)
            async with asyncio.timeout(limit):
                return await step
        except StopAsyncIteration:
            return None
        except TimeoutError as e:
            raise LlmError(f"no token for {limit:g} s", retryable=True) from e
        finally:
            if not step.done():
                step.cancel()
                await asyncio.gather(step, return_exceptions=True)

    async def _filler(self, name: str) -> None:
        """A tool call starts: say its short line at once, unless the reply has said something."""
        if self._spoke or self._held or self.tools is None:
            return
        self._held = True
        tool = self.tools.get(name)
        await self._send(tool.filler if tool else self.watchdog.hold_line, last=False)

    def _check_stopped(self) -> None:
        if self._stopped:
            raise asyncio.CancelledError  # the task's cancel was lost in a publish (see the module doc)

    async def _send(self, text: str, *, last: bool) -> None:
        self._check_stopped()
        if not text and not last:
            return
        if self.chunks == 0:
            # the checkpoint naming this generation goes first: a successor then never publishes
            # different chunks under the same (turn, generation)
            await asyncio.wait({self.saved})
        chunk = ev.ReplyChunk(
            session=self.ctx.session,
            turn=self.turn,
            generation=self.generation,
            index=self.chunks,
            text=text,
            last=last,
            kind=self.kind,
        )
        # counted as sent before the publish: if it is cut short, the chunk may still have gone out
        self.sent.text = f"{self.sent.text} {text}".strip()
        self.sent.complete = last
        self.chunks += 1
        published = await self.ctx.publish(sj.REPLY, chunk)
        if chunk.index == 0:
            self._mark("first_chunk", published.ts)  # when it left, as stamped on the chunk
            self._observe("first_chunk")

    def _mark(self, mark: str, at_ns: int = 0) -> None:
        """Timing marks go out beside the reply, not in its way (each is an acknowledged publish)."""
        if self.uses_llm:
            self.ctx.spawn(self.ctx.mark(self.turn, mark, at_ns or time.time_ns()), f"mark:{mark}")

    def _observe(self, phase: str) -> None:
        """A phase of the turn, from the LLM request: into the latency histogram and onto the span."""
        if self.uses_llm:
            seconds = time.monotonic() - self._requested
            metrics.turn_phase.labels("dialogue", phase).observe(seconds)
            trace.get_current_span().set_attribute(f"{phase}_ms", round(seconds * 1000, 1))

    def _count(self, used: Usage) -> None:
        amounts = {
            "llm_input_tokens": used.input_tokens,
            "llm_output_tokens": used.output_tokens,
            "llm_cache_read_tokens": used.cache_read_tokens,
            "llm_cache_write_tokens": used.cache_write_tokens,
        }
        usage.record(self.ctx, self.turn, used.engine or self.engine, amounts)
