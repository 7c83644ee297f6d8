"""The stt stage: caller audio in, transcripts and ends of turns out.

The audio feed (frames with the VAD's events in-band) only moves audio into the session's engine
stream and updates the turn bookkeeping (endpointing.py); it never waits for a decode. Results come
back through a reader task, endpointing's waits are timers on the event loop, and what the stage says
about a turn goes out through an outbox task in the order it happened (transcripts, the end of the
turn, the checkpoint), with timing marks on a queue of their own so they never delay a turn event.

Each turn has a root span "turn", open from its first speech to its end; the turn's transcripts and
its UserTurnEnded are published inside it, so the dialogue's spans join the turn's trace.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from functools import partial

import msgspec
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span
from prometheus_client import Counter

from proto import events as ev
from proto import subjects as sj
from proto.state import SttState
from services.runtime import metrics, service, tracing, usage
from services.runtime.bus import Delivery
from services.runtime.config import load
from services.runtime.service import SessionContext, SessionWorker
from services.stt import engines
from services.stt.config import SttConfig
from services.stt.endpointing import Endpointer, TurnEnd
from services.stt.engines.base import SttEngine, SttResult, SttStream
from services.stt.engines.deepgram import DeepgramSettings
from services.stt.engines.fallback import FallbackSettings, FallbackSttStream

logger = logging.getLogger("voicebus.stt")

noise_turns = Counter("vb_stt_noise_turns_total", "Turns that ended without words (noise, a cough)")
duplicates = Counter(
    "vb_stt_duplicates_total", "Frames and VAD events skipped as already handled (re-published)", ["kind"]
)

Step = Callable[[], Awaitable[None]]


class SttWorker(SessionWorker[SttState]):
    """One session: its engine stream, its turns, and what it publishes about them."""

    media = (sj.AUDIO_IN,)

    def __init__(self, ctx: SessionContext[SttState], engine: SttEngine, cfg: SttConfig) -> None:
        super().__init__(ctx)
        state = ctx.restored or SttState()
        self.engine = engine
        self._final_timeout_s = cfg.final_timeout_s
        self._loop = asyncio.get_running_loop()
        self.endpointer = Endpointer(
            min_delay_s=cfg.min_delay_s,
            max_delay_s=cfg.max_delay_s,
            speed=ctx.spec.speed,  # endpointing waits are silence in the caller's audio: they scale with it
            last_turn=state.last_turn,
            clock=self._loop.time,
        )
        self._last_frame = state.last_frame
        self._last_started = self._last_stopped = state.last_segment
        self._first_frame_ms: int | None = None  # stream time of the first frame pushed to the engine
        self._stream: SttStream | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._spans: dict[int, Span] = {}
        # per segment awaiting its final: when the engine was told, and the watchdog on its answer
        self._awaiting: deque[tuple[int, asyncio.TimerHandle | None]] = deque()
        self._overdue = 0  # finals given up on: the next flushed results are theirs, come too late
        self._billed_s = 0.0  # audio the provider billed since the last turn ended: this turn's
        # unbounded, but fed at the pace of speech events: a few items per segment
        self._outbox: asyncio.Queue[Step] = asyncio.Queue()
        self._marks: asyncio.Queue[Step] = asyncio.Queue()
        self._idle = asyncio.Event()
        self._idle.set()
        self._finals_in = asyncio.Event()  # set while no ended segment of the open turn awaits its final
        self._finals_in.set()

    async def start(self) -> None:
        """Open the engine stream and the tasks that read its results and publish."""
        self._stream = await self.engine.open(self.ctx.session, self.ctx.spec.language)
        self.ctx.spawn(self._read_results(self._stream), "results")
        self.ctx.spawn(self._send(self._outbox), "outbox")
        self.ctx.spawn(self._send(self._marks), "marks")
        if self.ctx.how != "queue":
            logger.info("serving the session after turn %d (%s)", self.endpointer.last_turn, self.ctx.how)

    # --- the audio feed ---------------------------------------------------------------------------

    async def on_media(self, event: ev.Event, delivery: Delivery) -> None:
        """Frames go to the engine; the VAD's events open, continue and close segments of turns."""
        assert self._stream is not None
        match event:
            case ev.UserAudio():
                for index, pcm in event.each_frame():
                    await self._push_frame(index, pcm, self._stream)
            case ev.SpeechStarted():
                await self._speech_started(event, self._stream)
            case ev.SpeechStopped():
                await self._speech_stopped(event, self._stream)

    async def _push_frame(self, index: int, pcm: bytes, stream: SttStream) -> None:
        """One 20 ms frame to the engine, unless it was handled before (re-published by a successor)."""
        if index <= self._last_frame:
            duplicates.labels("frame").inc()
            return
        self._last_frame = index
        if self._first_frame_ms is None:
            self._first_frame_ms = index * ev.FRAME_MS
        await stream.push(pcm)

    async def _speech_started(self, event: ev.SpeechStarted, stream: SttStream) -> None:
        if event.segment <= self._last_started:
            duplicates.labels("vad").inc()
            return
        self._last_started = event.segment
        await self._end_turn_if_over(heard_ms=(event.at_frame + 1) * ev.FRAME_MS)
        opened = self.endpointer.turn is None
        turn = self.endpointer.speech_started(event.segment, event.start_ms)
        self._rearm()
        if opened:
            self._idle.clear()
            self._spans[turn] = tracing.tracer().start_span(
                "turn",
                context=Context(),
                attributes=tracing.clean({"session": self.ctx.session, "turn": turn}),
            )
        await stream.speech_started()

    async def _end_turn_if_over(self, heard_ms: int) -> None:
        """Speech resumed: end the open turn first if its wait had already run out in the audio.

        When that depends on a final still being decoded, the feed waits for it (bounded by the final
        watchdog): the turn boundary must not depend on how fast the engine is.
        """
        verdict = self.endpointer.continues(heard_ms)
        if verdict is None:
            await self._finals_in.wait()
            verdict = self.endpointer.continues(heard_ms)
        if verdict is False:
            self._cancel_timer()
            self._outbox.put_nowait(partial(self._end_turn, self.endpointer.end_turn()))

    async def _speech_stopped(self, event: ev.SpeechStopped, stream: SttStream) -> None:
        if event.segment <= self._last_stopped:
            duplicates.labels("vad").inc()
            return
        stop_ms = (event.at_frame + 1) * ev.FRAME_MS
        turn = self.endpointer.speech_stopped(event.segment, event.end_ms, event.speech_end_ts, stop_ms)
        if turn is None:
            await self.ctx.report(
                "malformed", f"SpeechStopped for segment {event.segment}, which never started"
            )
            return
        self._last_stopped = event.segment
        self._finals_in.clear()
        # registered before telling the engine: a fast one may answer while it is being told
        told = time.time_ns()
        watchdog = None
        if self._final_timeout_s:
            watchdog = self._loop.call_later(self._final_timeout_s, self._final_overdue, turn)
        self._awaiting.append((told, watchdog))
        await stream.speech_ended()
        self._mark(turn, "speech_end", event.speech_end_ts)
        self._mark(turn, "vad_stop", event.ts)
        self._mark(turn, "stt_told", told)

    # --- results and endpointing ------------------------------------------------------------------

    async def _read_results(self, stream: SttStream) -> None:
        async for result in stream.results():
            try:
                self._on_result(result)
            except Exception as e:  # one bad result must not end the session's transcription
                logger.exception("could not handle an engine result")
                await self.ctx.report("internal", f"stt result not handled: {e}")

    def _on_result(self, result: SttResult) -> None:
        now = time.time_ns()
        self._billed_s += result.billed_s
        told: int | None = None
        if result.flushed:
            if self._overdue:
                self._overdue -= 1
                logger.warning("a final came after it was given up on; dropped")
                return
            if self._awaiting:
                told, watchdog = self._awaiting.popleft()
                if watchdog is not None:
                    watchdog.cancel()
        place = self.endpointer.transcript(
            result.text, is_final=result.is_final, flushed=result.flushed, endpoint=result.endpoint
        )
        if place is None:
            logger.debug("engine result outside any turn dropped")
            return
        turn, segment = place
        transcript = ev.Transcript(
            session=self.ctx.session,
            turn=turn,
            segment=segment,
            text=result.text,
            is_final=result.is_final,
            words=self._in_stream_time(result.words),
            confidence=result.confidence,
        )
        self._outbox.put_nowait(partial(self._publish_in_turn, turn, sj.TRANSCRIPT, transcript))
        if told is not None:
            metrics.turn_phase.labels("stt", "stt_final").observe((now - told) / 1e9)
            self._mark(turn, "stt_final", now)
        if result.is_final:
            self._rearm()
        if not self.endpointer.waiting_for_finals:
            self._finals_in.set()

    def _final_overdue(self, turn: int) -> None:
        """The engine has not answered an end of speech: report it, and let the turn go on without it."""
        self._awaiting.popleft()
        self._overdue += 1
        message = f"{self.engine.name} gave no final {self._final_timeout_s:g}s after the end of speech"
        logger.warning(message)
        self._outbox.put_nowait(partial(self.ctx.report, "provider", message, turn=turn, retryable=True))
        self.endpointer.transcript("", is_final=True, flushed=True)
        self._rearm()
        if not self.endpointer.waiting_for_finals:
            self._finals_in.set()

    def _in_stream_time(self, words: tuple[ev.Word, ...]) -> tuple[ev.Word, ...]:
        base = self._first_frame_ms or 0
        return tuple(
            msgspec.structs.replace(w, start_ms=w.start_ms + base, end_ms=w.end_ms + base) for w in words
        )

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _rearm(self) -> None:
        """Follow endpointing's deadline: (re)start the timer, or stop it when speech resumed."""
        self._cancel_timer()
        if (deadline := self.endpointer.deadline) is not None:
            self._timer = self._loop.call_at(deadline, self._wait_over)

    def _wait_over(self) -> None:
        # runs on the loop between two events: speech resuming either came before (and cancelled
        # this timer) or comes after, and then opens the next turn
        self._timer = None
        self._outbox.put_nowait(partial(self._end_turn, self.endpointer.end_turn()))

    async def _end_turn(self, end: TurnEnd) -> None:
        span = self._spans.pop(end.turn, trace.INVALID_SPAN)
        span.set_attributes({"endpointing_ms": end.endpointing_ms, "reason": end.reason})
        with trace.use_span(span, end_on_exit=False):
            billed, self._billed_s = self._billed_s, 0.0
            usage.record(self.ctx, end.turn, self._engine_name(), {"stt_audio_s": billed})
        try:
            if end.text:
                await self._publish_end(end, span)
            else:
                noise_turns.inc()
                span.set_attribute("noise", True)
                logger.info("turn %d had no words: no end of turn sent", end.turn)
        finally:
            span.end()
        if self.endpointer.turn is None:  # else the next turn has begun: its end checkpoints
            await self.ctx.checkpoint(self._state())
            self._idle.set()

    async def _publish_end(self, end: TurnEnd, span: Span) -> None:
        at = time.time_ns()
        with trace.use_span(span, end_on_exit=False):
            await self.ctx.publish(
                sj.TURN,
                ev.UserTurnEnded(
                    session=self.ctx.session,
                    turn=end.turn,
                    text=end.text,
                    start_ms=end.start_ms,
                    end_ms=end.end_ms,
                    speech_end_ts=end.speech_end_ts,
                    endpointing_ms=end.endpointing_ms,
                    reason=end.reason,
                ),
            )
        self._mark(end.turn, "end_of_turn", at)
        metrics.turn_phase.labels("stt", "endpointing").observe(end.endpointing_ms / 1000)

    def _engine_name(self) -> str:
        """The engine serving now (a chain's member, not the chain)."""
        if isinstance(self._stream, FallbackSttStream):
            return self._stream.engine
        return self.engine.name

    def _state(self) -> SttState:
        return SttState(
            last_turn=self.endpointer.last_turn, last_frame=self._last_frame, last_segment=self._last_stopped
        )

    # --- publishing -------------------------------------------------------------------------------

    async def _publish_in_turn(self, turn: int, channel: sj.Channel, event: ev.Event) -> None:
        with trace.use_span(self._spans.get(turn, trace.INVALID_SPAN), end_on_exit=False):
            await self.ctx.publish(channel, event)

    def _mark(self, turn: int, mark: str, at_ns: int) -> None:
        self._marks.put_nowait(partial(self.ctx.mark, turn, mark, at_ns))

    async def _send(self, queue: asyncio.Queue[Step]) -> None:
        """Run the queue's publishing steps in order; a failed one is reported and the next goes on."""
        while True:
            step = await queue.get()
            try:
                await step()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                logger.exception("publishing failed")
                await self.ctx.report(
                    "internal", f"stt could not publish: {e}", turn=self.endpointer.last_turn
                )
            finally:
                queue.task_done()

    # --- lifecycle --------------------------------------------------------------------------------

    async def idle(self) -> None:
        """No turn open and everything said: the session can be handed over."""
        await self._idle.wait()
        await self._outbox.join()
        await self._marks.join()

    async def close(self, handover: bool) -> None:
        """Stop the engine stream, checkpointing a handover made between turns.

        A handover in the middle of a turn keeps the last checkpoint: the successor re-transcribes
        the open turn from the audio after it.
        """
        if self._timer is not None:
            self._timer.cancel()
        for _, watchdog in self._awaiting:
            if watchdog is not None:
                watchdog.cancel()
        if handover and self.endpointer.turn is None:
            await self.ctx.checkpoint(self._state())
        for span in self._spans.values():
            span.set_attribute("abandoned", True)
            span.end()
        self._spans.clear()
        if self._stream is not None:
            await self._stream.aclose()


def main() -> int:
    """Run one stt replica: load the engine (the model) first, then serve until SIGTERM."""
    cfg = load(SttConfig)
    engine = engines.load_chain(cfg, load(DeepgramSettings), load(FallbackSettings))
    return service.run("stt", lambda ctx: SttWorker(ctx, engine, cfg), state_type=SttState)
