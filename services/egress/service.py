"""The egress stage: plays the agent's audio on a real-time timeline and reports what the caller heard.

Per session: the TTS's audio (``audio.out``, up to 10 frames per message) goes onto the playout
timeline as 20 ms frames; one pacing task hands each frame to the session's sink when it is due;
``PlayoutStarted``/``PlayoutStopped`` tell the dialogue what was heard. The moment the caller starts
speaking over a reply (``SpeechStarted``) the playout pauses and says so (``PlayoutPaused``): the fast
half of a barge-in, which needs no round trip to the dialogue. The dialogue then decides: ``Resume`` (a
cough, a backchannel) plays on from the pause, ``Interrupt`` cuts the reply and drops everything queued
of it. ``Cancel``/``Interrupt`` cut a reply at once and are acknowledged with what had played. With
``recording_path`` set, the caller's audio (``audio.in``) and the played frames are written as a stereo
WAV. A keeper task makes the playout durable every ``VB_EGRESS_CHECKPOINT_S`` and when a reply is over:
the WAV files, then a checkpoint from which a successor plays on.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from nats.js.errors import NotFoundError
from opentelemetry import trace
from prometheus_client import Counter, Histogram

from proto import events as ev
from proto import subjects as sj
from proto.events import FRAME_MS
from proto.state import EgressState
from services.egress.config import EgressConfig
from services.egress.playout import Key, MonotonicClock, Play, Playout, Reply, Stop, Timeline
from services.egress.recording import Recording, SessionTime
from services.egress.reports import Reports
from services.egress.sinks import BusSink, Sink, UnsupportedSink, make_sink
from services.livekit.config import LiveKitConfig
from services.runtime import metrics, service, tracing
from services.runtime.bus import Delivery
from services.runtime.config import load
from services.runtime.service import SessionContext, SessionWorker
from services.webrtc.config import WebRtcConfig
from services.webrtc.peer import use_host_addresses

logger = logging.getLogger("voicebus.egress")

_frames_total = Counter(
    "vb_egress_frames_total",
    "Agent frames by what became of them (played; queued; dropped as duplicate, stale, closed, cut, refused)",
    ["outcome"],
)
#: One child per outcome, looked up once: counting is on the per-frame path.
frames = {
    o: _frames_total.labels(o) for o in ("played", "queued", "duplicate", "stale", "closed", "cut", "refused")
}
pacing_lateness = Histogram(
    "vb_egress_pacing_lateness_seconds",
    "How much later than its place on the timeline a frame was handed to the sink",
    buckets=(0.0005, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1),
)
bargein_latency = Histogram(
    "vb_bargein_latency_seconds",
    "Barge-in: the caller's first speech (VAD onset) -> the agent's audio paused at the egress",
    buckets=(0.05, 0.075, 0.1, 0.12, 0.15, 0.2, 0.3, 0.5, 1.0),
)
#: How long SessionEnded waits for the caller's last frames to reach the recording.
CALLER_CATCH_UP_S = 2.0


class EgressWorker(SessionWorker[EgressState]):
    """Playout of one session."""

    def __init__(self, ctx: SessionContext[EgressState], cfg: EgressConfig) -> None:
        super().__init__(ctx)
        spec = ctx.spec
        self.cfg = cfg
        self.media = (sj.AUDIO_OUT, sj.AUDIO_IN) if spec.recording_path else (sj.AUDIO_OUT,)
        self.time = SessionTime(spec.opened_ts, spec.speed)
        self.clock = MonotonicClock(cfg.pacing_tick_ms / 1000 / spec.speed)
        self.timeline = Timeline(
            FRAME_MS / 1000 / spec.speed,
            max_late_s=cfg.max_late_ms / 1000 / spec.speed,
            stall_s=cfg.stall_s,
        )
        self.playout = Playout(self.timeline, self.clock, self._play, self._report_stop)
        self.recording = (
            Recording(Path(spec.recording_path), spec.output_rate, self.time) if spec.recording_path else None
        )
        self.sink: Sink = BusSink(ctx)
        self.reports = Reports()
        self._spans: dict[Key, trace.Span] = {}
        self._refused: set[Key] = set()
        self._bad_caller_ts = False
        self._dirty = False
        self._persist_now = asyncio.Event()
        self._quiet = asyncio.Event()  # no reply in flight
        self._caller_seen = asyncio.Event()
        self._pacing: list[asyncio.Task[None]] = []
        self._pause_guard: asyncio.Task[None] | None = None
        self._speaking: ev.SpeechStarted | None = None  # the caller is speaking (the VAD's open segment)
        self._ended = False

    # --- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Restore the playout of a predecessor, open the sink and the recording, start pacing."""
        ctx = self.ctx
        if (state := ctx.restored) is not None:
            self.timeline.restore(state, self.clock.now())
            # re-read what the predecessor had taken in but not finished with: frames of replies not
            # yet over (they were queued in its memory), caller audio not yet in the recording
            ctx.cursors[sj.AUDIO_OUT.name] = state.audio_out_seq
            if self.recording is not None:
                ctx.cursors[sj.AUDIO_IN.name] = state.caller_seq
                self.recording.resume_after(state.caller_seq)
        resume = ctx.how != "queue"
        try:
            self.sink = make_sink(ctx, self.cfg)
            await self.sink.open(resume)
        except (UnsupportedSink, OSError) as e:
            self.sink = BusSink(ctx)
            await ctx.report("internal", f"sink {ctx.spec.sink}: {e}; playing to the bus instead")
        if self.recording is not None:
            try:
                await self.recording.track.open(resume)
            except OSError as e:
                self.recording, self.media = None, (sj.AUDIO_OUT,)
                await ctx.report("internal", f"cannot record the call: {e}")
        self._update_quiet()
        ctx.spawn(self.reports.run(), "reports")
        self._pacing = [ctx.spawn(self.playout.run(), "playout"), ctx.spawn(self._keep(), "keeper")]

    async def idle(self) -> None:
        """Return once no reply is playing or waiting to play."""
        await self._quiet.wait()

    async def close(self, handover: bool) -> None:
        """On handover: stop pacing, write what played, checkpoint, publish what is pending.

        Nothing to do when the session ended (done at SessionEnded) or was lost to another replica
        (the new owner carries on; writing now would clobber its files and state).
        """
        if self._ended or not handover:
            return
        await self._stop_pacing()
        await self._persist(final=True)
        await self.reports.drain()

    async def _stop_pacing(self) -> None:
        for task in self._pacing:
            task.cancel()
        await asyncio.gather(*self._pacing, return_exceptions=True)

    # --- input ------------------------------------------------------------------------------------

    async def on_media(self, event: ev.Event, delivery: Delivery) -> None:
        """Agent frames onto the timeline; caller frames into the recording."""
        now = self.clock.now()
        match event:
            case ev.AgentAudio(sample_rate=rate) if rate != self.ctx.spec.output_rate:
                await self._refuse(event)
            case ev.AgentAudio():
                for frame in event.split():  # the timeline, cuts and counts work per 20 ms frame
                    verdict, stops = self.timeline.push(
                        frame, now, seq=delivery.stream_seq, parent=delivery.parent
                    )
                    frames[verdict].inc()
                    self._stopped(stops)
                if self._speaking is not None and self.cfg.pause_on_speech:
                    await self._pause(self._speaking)  # a reply that comes while the caller talks waits
                self.playout.wake()
                self._update_quiet()
            case ev.AgentAudioEnd():
                self._stopped(self.timeline.end(event, now, seq=delivery.stream_seq))
                self.playout.wake()
                self._update_quiet()
            case ev.UserAudio() if self.recording is not None:
                placed = self.recording.caller(event, delivery.stream_seq)
                if not placed and not self._bad_caller_ts:
                    self._bad_caller_ts = True
                    message = f"caller frames from {event.index} are stamped in the future: not recorded"
                    await self.ctx.report("malformed", message)
                self._dirty = True
        if delivery.subject.endswith(sj.AUDIO_IN.name):
            self._caller_seen.set()

    async def _refuse(self, audio: ev.AgentAudio) -> None:
        """Audio at another rate than the session's cannot be played; say so once per reply."""
        frames["refused"].inc(audio.frames)
        key = (audio.turn, audio.generation)
        if key not in self._refused:
            self._refused.add(key)
            await self.ctx.report(
                "malformed",
                f"frames of reply {audio.turn}/{audio.generation} are {audio.sample_rate} Hz; "
                f"this session plays {self.ctx.spec.output_rate} Hz, they are dropped",
                turn=audio.turn,
            )

    async def on_event(self, event: ev.Event, delivery: Delivery) -> None:
        """Control: cut replies (Cancel, Interrupt) and end the call; the sink sees every event."""
        self.sink.on_event(event)
        match event:
            case ev.Cancel(turn=turn, generation=generation):
                await self._cut(self.timeline.cancel(turn, generation), event, "Cancel", generation)
            case ev.Interrupt(turn=turn):
                await self._cut(self.timeline.interrupt(turn), event, "Interrupt", None)
                self._unpause()  # the barge-in is decided: later replies play
                self.reports.send(functools.partial(self.ctx.mark, turn, "barge_in_stopped"))
            case ev.SpeechStarted() if self.cfg.pause_on_speech:
                self._speaking = event
                await self._pause(event)
            case ev.SpeechStopped():
                self._speaking = None
            case ev.Resume():
                await self._resume(event)
            case ev.SessionEnded():
                await self._end(event)

    async def _pause(self, speech: ev.SpeechStarted) -> None:
        """Hold the reply while the caller speaks over it (or it comes while they speak); tell the dialogue.

        A reply that had started playing makes it a barge-in, timed from the caller's speech onset.
        """
        paused_ns = time.time_ns()
        reply = self.timeline.pause(self.clock.now())
        if reply is None:
            return  # the agent is not speaking (or is already held): nothing to stop
        await self.sink.flush()
        paused = ev.PlayoutPaused(
            session=self.ctx.session, turn=reply.turn, generation=reply.generation, played_ms=reply.played_ms
        )
        self.reports.send(functools.partial(self.ctx.publish, sj.PLAYOUT, paused))
        if reply.started:
            onset_ns = speech_onset_ns(speech, self.ctx.spec.speed)
            latency_s = (paused_ns - onset_ns) / 1e9
            bargein_latency.observe(latency_s)
            if (span := self._spans.get(reply.key)) is not None:
                attributes = {"played_ms": reply.played_ms, "bargein_latency_ms": latency_s * 1000}
                span.add_event("paused", attributes)
            self.reports.send(functools.partial(self.ctx.mark, reply.turn, "barge_in_speech", onset_ns))
            self.reports.send(functools.partial(self.ctx.mark, reply.turn, "barge_in_paused", paused_ns))
        self._pause_guard = self.ctx.spawn(self._pause_timeout(), "pause-guard")

    async def _pause_timeout(self) -> None:
        """No decision came for the pause: play on rather than hold the reply forever."""
        await asyncio.sleep(self.cfg.pause_max_s)
        logger.warning("no barge-in decision %gs after a pause; resuming", self.cfg.pause_max_s)
        self._pause_guard = None
        await self._resume(None)

    async def _resume(self, event: ev.Resume | None) -> None:
        """A false alarm (noise, a backchannel): the held reply plays on from where it paused."""
        reply = self._unpause()
        if reply is not None:
            resumed = ev.PlayoutResumed(
                session=self.ctx.session,
                turn=reply.turn,
                generation=reply.generation,
                played_ms=reply.played_ms,
            )
            self.reports.send(functools.partial(self.ctx.publish, sj.PLAYOUT, resumed))
            if (span := self._spans.get(reply.key)) is not None:
                span.add_event("resumed", {"played_ms": reply.played_ms})
        if event is not None:
            ack = ev.ControlAck(
                session=self.ctx.session,
                stage="egress",
                replica=self.ctx.bus.replica,
                acked="Resume",
                turn=event.turn,
                acked_seq=event.seq,
                played_ms=self.timeline.played_ms(event.turn),
            )
            self.reports.send(functools.partial(self.ctx.publish, sj.CONTROL, ack))

    def _unpause(self) -> Reply | None:
        if self._pause_guard is not None:
            self._pause_guard.cancel()
            self._pause_guard = None
        reply = self.timeline.resume(self.clock.now())
        self.playout.wake()
        return reply

    async def _cut(
        self, stops: list[Stop], event: ev.Cancel | ev.Interrupt, acked: str, generation: int | None
    ) -> None:
        if stops:
            await self.sink.flush()
            self.playout.wake()
        self._stopped(stops)
        ack = ev.ControlAck(
            session=self.ctx.session,
            stage="egress",
            replica=self.ctx.bus.replica,
            acked=acked,  # type: ignore[arg-type]
            turn=event.turn,
            acked_seq=event.seq,
            played_ms=self.timeline.played_ms(event.turn, generation),
        )
        self.reports.send(functools.partial(self.ctx.publish, sj.CONTROL, ack))
        self._dirty = True
        self._persist_now.set()

    async def _end(self, event: ev.SessionEnded) -> None:
        """The call is over: stop playing, write the files in full, then acknowledge."""
        self._stopped(self.timeline.stop_all())
        await self._stop_pacing()
        if self.recording is not None:
            await self._caller_caught_up()
            await self.recording.persist(final=True)
        await self.sink.persist(final=True)
        ack = ev.ControlAck(
            session=self.ctx.session,
            stage="egress",
            replica=self.ctx.bus.replica,
            acked="SessionEnded",
            acked_seq=event.seq,
        )
        self.reports.send(functools.partial(self.ctx.publish, sj.CONTROL, ack))
        await self.reports.drain()
        self._ended = True

    async def _caller_caught_up(self) -> None:
        """Wait (bounded) until every caller frame the stream holds has reached the recording."""
        try:
            last = await self.ctx.bus.js.get_last_msg(sj.EVENTS_STREAM, sj.AUDIO_IN.subject(self.ctx.session))
        except NotFoundError:
            return
        try:
            async with asyncio.timeout(CALLER_CATCH_UP_S):
                while self.ctx.cursors.get(sj.AUDIO_IN.name, 0) < (last.seq or 0):
                    self._caller_seen.clear()
                    await self._caller_seen.wait()
        except TimeoutError:
            logger.warning("recording of %s ends without the caller's last frames", self.ctx.session)

    # --- output -----------------------------------------------------------------------------------

    async def _play(self, play: Play) -> None:
        """Hand a due frame to the sink (and the recording); a reply's first frame opens its span."""
        at_s = self.time.of_monotonic(play.due)
        if play.first:
            span = await self._started(play)
            with trace.use_span(span, end_on_exit=False):  # the first frame carries the trace on
                pacing_lateness.observe(self.clock.now() - play.due)
                await self.sink.play(play.frame, at_s)
            mark = functools.partial(self.ctx.mark, play.reply.turn, "first_audio_out", time.time_ns())
            self.reports.send(mark)
        else:
            pacing_lateness.observe(self.clock.now() - play.due)
            await self.sink.play(play.frame, at_s)
        if self.recording is not None:
            self.recording.agent(play.frame.pcm, at_s)
        frames["played"].inc()
        self._dirty = True

    async def _started(self, play: Play) -> trace.Span:
        """PlayoutStarted goes out before the reply's first frame (waiting a bounded time for it)."""
        reply = play.reply
        queued_s = play.due - (reply.first_arrival if reply.first_arrival is not None else play.due)
        metrics.turn_phase.labels("egress", "first_audio_out").observe(queued_s)
        span = tracing.tracer().start_span(
            "egress.playout",
            context=reply.parent,  # type: ignore[arg-type]
            attributes=tracing.clean(
                {"turn": reply.turn, "generation": reply.generation, "egress.queued_ms": queued_s * 1000}
            ),
        )
        self._spans[reply.key] = span
        started = ev.PlayoutStarted(session=self.ctx.session, turn=reply.turn, generation=reply.generation)
        sent = self.reports.send(
            self._in_span(span, functools.partial(self.ctx.publish, sj.PLAYOUT, started))
        )
        try:
            async with asyncio.timeout(self.cfg.report_wait_ms / 1000):
                await asyncio.shield(sent)
        except TimeoutError:
            logger.warning("PlayoutStarted of turn %d not stored in time; playing anyway", reply.turn)
        return span

    @staticmethod
    def _in_span(
        span: trace.Span, publish: Callable[[], Awaitable[object]]
    ) -> Callable[[], Awaitable[object]]:
        async def inside() -> None:
            with trace.use_span(span, end_on_exit=False):
                await publish()

        return inside

    async def _report_stop(self, stop: Stop) -> None:
        self._stopped([stop])

    def _stopped(self, stops: list[Stop]) -> None:
        """Report replies that are over: what was heard of each, and close their spans."""
        for stop in stops:
            reply = stop.reply
            frames["cut"].inc(stop.dropped)
            stopped = ev.PlayoutStopped(
                session=self.ctx.session,
                turn=reply.turn,
                generation=reply.generation,
                played_ms=reply.played_ms,
                heard_text=reply.heard_text(stop.completed)[:16_384],
                completed=stop.completed,
                dropped_frames=stop.dropped,
            )
            self.reports.send(functools.partial(self.ctx.publish, sj.PLAYOUT, stopped))
            if stop.why == "stalled":
                message = (
                    f"reply {reply.turn}/{reply.generation} got no audio for {self.cfg.stall_s:g}s; given up"
                )
                self.reports.send(functools.partial(self.ctx.report, "provider", message, turn=reply.turn))
            if (span := self._spans.pop(reply.key, None)) is not None:
                span.set_attributes(
                    {"played_ms": reply.played_ms, "completed": stop.completed, "stopped_by": stop.why}
                )
                span.end()
        if stops:
            self._dirty = True
            self._persist_now.set()
            self._update_quiet()

    def _update_quiet(self) -> None:
        if self.timeline.busy:
            self._quiet.clear()
        else:
            self._quiet.set()

    # --- durability -------------------------------------------------------------------------------

    async def _keep(self) -> None:
        """Persist every ``checkpoint_s`` while something changed, and at once when a reply is over."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.cfg.checkpoint_s):
                    await self._persist_now.wait()
            self._persist_now.clear()
            if not self._dirty:
                continue
            try:
                await self._persist()
            except Exception as e:
                self._dirty = True
                logger.exception("could not persist the playout of %s", self.ctx.session)
                await self.ctx.report("internal", f"persisting playout failed: {e}", retryable=True)

    async def _persist(self, final: bool = False) -> None:
        """Write the files, then checkpoint (``final``: a handover, write everything).

        The playout state is taken together with the feeds' cursors (no await between them), so a
        successor never skips a control event the state does not reflect. A crash loses from the
        WAV files at most the frames played while they were being written.
        """
        self._dirty = False
        caller_seq = 0
        if self.recording is not None:
            caller_seq = self.recording.caller_seq
            await self.recording.persist(final)
        await self.sink.persist(final)
        state = self.timeline.state(self.ctx.cursors.get(sj.AUDIO_OUT.name, 0))
        state.caller_seq = caller_seq
        await self.ctx.checkpoint(state)


def speech_onset_ns(speech: ev.SpeechStarted, speed: float) -> int:
    """Wall time of the caller's first speech frame: the event's time less the audio it took to decide."""
    decided_ms = (speech.at_frame + 1) * FRAME_MS - speech.start_ms
    return speech.ts - int(max(0, decided_ms) / speed * 1e6)


def main() -> int:
    """Run one egress replica."""
    cfg = load(EgressConfig, webrtc=load(WebRtcConfig), livekit=load(LiveKitConfig))
    if cfg.webrtc.host_addresses:
        use_host_addresses(cfg.webrtc.host_addresses)
    return service.run("egress", lambda ctx: EgressWorker(ctx, cfg), state_type=EgressState)
