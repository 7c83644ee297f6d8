"""Barge-in: whether the caller's speech over the agent's reply interrupts it.

The fast half happens at the egress: on the VAD's ``SpeechStarted`` it pauses the reply playing and
says so (``PlayoutPaused``). This module is the slow half, the decision, made once per pause:

- **Interrupt** when the STT hears at least ``min_words`` words that are not backchannels, or when the
  speech goes on for ``min_speech_s`` after the VAD's start (unless all it has said so far is a
  backchannel). Every stage then acts and acknowledges: dialogue cancels the LLM stream, tts drops the
  text queued, egress flushes the reply and reports what was heard.
- **Resume** when the speech stops and its final transcript has no words (a cough) or only
  backchannels ("yeah", "uh-huh"), or when no words come within ``false_timeout_s`` of its end. The
  turn such a backchannel opened at the STT is not answered.

Each decision is broadcast on ``control``; the stages that must act on it are expected to acknowledge
within ``ack_timeout_s``. A miss is logged, counted and reported on the session's ``error`` channel.
The decision's span joins the trace of the interrupted turn, with its steps as span events.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from typing import Any, Literal

from opentelemetry import trace
from opentelemetry.context import Context
from prometheus_client import Counter

from proto import events as ev
from proto import subjects as sj
from services.dialogue.config import DialogueConfig
from services.runtime import tracing
from services.runtime.bus import Delivery
from services.runtime.service import SessionContext

log = logging.getLogger("voicebus.dialogue")

bargeins = Counter(
    "vb_bargein_total",
    "Caller speech over the agent's reply, by outcome: interrupted, false (no words: resumed), "
    "backchannel (ignored: resumed)",
    ["outcome"],
)
acks_missed = Counter(
    "vb_control_ack_missed_total",
    "Control events a stage did not acknowledge within VB_BARGEIN_ACK_TIMEOUT_MS (un-acked flushes)",
    ["stage", "acked"],
)

Verdict = Literal["interrupted", "false", "backchannel"]
#: Who acts on each decision, and so must acknowledge it.
ACKERS: dict[str, tuple[ev.Stage, ...]] = {"Interrupt": ("dialogue", "tts", "egress"), "Resume": ("egress",)}
#: Backchannel turns remembered (so their UserTurnEnded, which comes later, is not answered).
KEEP_TURNS = 16
#: Acknowledgements remembered: one may arrive before the publish of what it acknowledges returns.
KEEP_ACKS = 64


def _token(word: str) -> str:
    return re.sub(r"[^a-z]", "", word.lower())


@dataclass(frozen=True, slots=True)
class Backchannels:
    """Short acknowledgements that keep the agent talking ("uh-huh", "uh huh", "Okay, right.")."""

    words: frozenset[str]

    @classmethod
    def of(cls, phrases: tuple[str, ...]) -> Backchannels:
        return cls(frozenset(t for p in phrases if (t := "".join(_token(w) for w in p.split()))))

    def _covers(self, joined: str, *, partial: bool) -> bool:
        """Whether ``joined`` is a run of backchannels (word break: "uh huh" and "uh-huh" alike).

        ``partial``: the STT may still be writing the last one ("uh" on the way to "uh-huh").
        """
        ends = [True] + [False] * len(joined)
        for i in range(1, len(joined) + 1):
            ends[i] = any(ends[i - len(w)] and joined.endswith(w, 0, i) for w in self.words if len(w) <= i)
        if ends[-1]:
            return True
        return partial and any(
            ends[i] and any(w.startswith(joined[i:]) for w in self.words) for i in range(len(joined))
        )

    def classify(
        self, text: str, *, final: bool = True
    ) -> tuple[Literal["none", "backchannel", "words"], int]:
        """What a transcript holds, and how many of its words are not backchannels."""
        tokens = [t for w in text.split() if (t := _token(w))]
        if not tokens:
            return "none", 0
        if self._covers("".join(tokens), partial=not final):
            return "backchannel", 0
        return "words", sum(1 for t in tokens if t not in self.words)


@dataclass(frozen=True, slots=True)
class Policy:
    """How the decision is made (from the dialogue's settings)."""

    min_words: int
    min_speech_s: float
    false_timeout_s: float
    ack_timeout_s: float
    backchannels: Backchannels

    @classmethod
    def of(cls, cfg: DialogueConfig) -> Policy:
        return cls(
            min_words=cfg.bargein_min_words,
            min_speech_s=cfg.bargein_min_speech_ms / 1000,
            false_timeout_s=cfg.bargein_false_timeout_ms / 1000,
            ack_timeout_s=cfg.bargein_ack_timeout_ms / 1000,
            backchannels=Backchannels.of(cfg.bargein_backchannels),
        )


@dataclass
class Speech:
    """One VAD segment of the caller, and what the STT has made of it so far."""

    segment: int
    started: float  # loop time its SpeechStarted was handled
    stopped: float | None = None
    text: str = ""
    final: bool = False
    turn: int = -1


@dataclass
class Pause:
    """A reply the egress holds while the caller speaks over it, waiting for the decision."""

    turn: int
    speech: Speech
    span: trace.Span
    timer: asyncio.TimerHandle | None = None


class BargeIn:
    """The barge-in decisions of one session, fed the conversation events in stream order."""

    def __init__(self, ctx: SessionContext[Any], policy: Policy) -> None:
        self.ctx, self.policy = ctx, policy
        self.speech: Speech | None = None
        self.pause: Pause | None = None
        self.backchannel_turns: list[int] = []
        self._traces: dict[int, Context | None] = {}  # turn -> trace of its reply (PlayoutStarted)
        self._playing: set[int] = set()  # turns whose reply has started and not stopped playing
        self._acks: dict[tuple[str, int], set[str]] = {}
        self._acked = asyncio.Event()
        self._loop = asyncio.get_running_loop()

    def on_event(self, event: ev.Event, delivery: Delivery) -> None:
        """Follow the caller's speech, its transcripts, the playout and the acks; decide when due."""
        now = self._loop.time()
        match event:
            case ev.SpeechStarted(segment=segment):
                self.speech = Speech(segment, now)
                if self.pause is not None:  # the caller goes on after a gap: judge this segment
                    self.pause.speech = self.speech
                    self._event("caller_speech", segment=segment)
                    self._arm()
            case ev.SpeechStopped(segment=segment) if self._current(segment):
                assert self.speech is not None
                self.speech.stopped = now
                self._arm()
            case ev.Transcript(segment=segment) if self._current(segment):
                assert self.speech is not None
                self.speech.text, self.speech.final, self.speech.turn = event.text, event.is_final, event.turn
                self._judge()
            case ev.PlayoutStarted(turn=turn):
                self._playing.add(turn)
                self._traces[turn] = delivery.parent
                while len(self._traces) > KEEP_TURNS:
                    del self._traces[min(self._traces)]
            case ev.PlayoutPaused(turn=turn, played_ms=played_ms):
                self._paused(turn, played_ms, now)
            case ev.PlayoutResumed(turn=turn) | ev.PlayoutStopped(turn=turn):
                if isinstance(event, ev.PlayoutStopped):
                    self._playing.discard(turn)
                if self.pause is not None and self.pause.turn == turn:  # over without a decision
                    self._close_pause()
            case ev.ControlAck(acked=acked, acked_seq=seq, stage=stage):
                seen = self._acks.setdefault((acked, seq), set())
                seen.add(stage)
                while len(self._acks) > KEEP_ACKS:
                    del self._acks[next(iter(self._acks))]
                self._acked.set()

    def ignores(self, turn: ev.UserTurnEnded) -> bool:
        """A turn that was only a backchannel over the agent's reply gets no reply of its own.

        Over it: judged a backchannel during a pause, or it ends while the agent is still talking.
        """
        if turn.turn not in self.backchannel_turns and not self._playing:
            return False
        return self.policy.backchannels.classify(turn.text)[0] == "backchannel"

    def close(self) -> None:
        """The session is closing here: forget a pending decision (its timer, its span)."""
        if self.pause is not None:
            self._close_pause()

    # --- the decision -----------------------------------------------------------------------------

    def _current(self, segment: int) -> bool:
        return self.speech is not None and self.speech.segment == segment

    def _paused(self, turn: int, played_ms: int, now: float) -> None:
        if self.pause is not None:
            self._close_pause()
        span = tracing.tracer().start_span(
            "dialogue.barge_in",
            context=self._traces.get(turn),
            attributes={"turn": turn, "played_ms": played_ms},
        )
        # a pause without a speech event seen here (a takeover in between) is judged as new speech
        speech = self.speech if self.speech is not None else Speech(-1, now)
        self.pause = Pause(turn, speech, span)
        self._judge()
        if self.pause is not None:
            self._arm()

    def _judge(self) -> None:
        """Decide from what the STT has heard, if that is enough."""
        if (pause := self.pause) is None:
            return
        speech = pause.speech
        kind, words = self.policy.backchannels.classify(speech.text, final=speech.final)
        if self.policy.min_words and words >= self.policy.min_words:
            self._decide("interrupted", f"{words} words")
        elif speech.final and speech.stopped is not None and kind != "words":
            self._decide("backchannel" if kind == "backchannel" else "false", "final transcript")

    def _arm(self) -> None:
        """(Re)set the timer of the decision that time alone makes."""
        if (pause := self.pause) is None:
            return
        if pause.timer is not None:
            pause.timer.cancel()
            pause.timer = None
        speech, policy = pause.speech, self.policy
        if speech.stopped is None:
            if policy.min_speech_s > 0:
                pause.timer = self._loop.call_at(speech.started + policy.min_speech_s, self._long_speech)
        elif not policy.min_words:
            self._decide("false", "speech too short")  # words do not count: the speech alone decides
        else:
            pause.timer = self._loop.call_at(speech.stopped + policy.false_timeout_s, self._no_words)

    def _long_speech(self) -> None:
        if self.pause is None:
            return
        self.pause.timer = None
        speech = self.pause.speech
        if self.policy.backchannels.classify(speech.text, final=speech.final)[0] == "backchannel":
            return  # a long "mm-hmm": wait for its end and final transcript
        self._decide("interrupted", "long speech")

    def _no_words(self) -> None:
        if self.pause is not None:
            self.pause.timer = None
            self._decide("false", "no words in time")

    def _decide(self, verdict: Verdict, why: str) -> None:
        pause = self.pause
        assert pause is not None
        self.pause = None
        if pause.timer is not None:
            pause.timer.cancel()
        bargeins.labels(verdict).inc()
        pause.span.set_attributes({"outcome": verdict, "why": why})
        control: ev.Interrupt | ev.Resume
        if verdict == "interrupted":
            control = ev.Interrupt(session=self.ctx.session, turn=pause.turn)
        else:
            reason: Literal["no_words", "backchannel"] = (
                "backchannel" if verdict == "backchannel" else "no_words"
            )
            control = ev.Resume(session=self.ctx.session, turn=pause.turn, reason=reason)
            if verdict == "backchannel" and pause.speech.turn >= 0:
                self.backchannel_turns = [*self.backchannel_turns, pause.speech.turn][-KEEP_TURNS:]
        log.info("barge-in on turn %d: %s (%s)", pause.turn, verdict, why)
        self.ctx.spawn(self._broadcast(control, pause.span), f"barge-in:{pause.turn}")

    async def _broadcast(self, control: ev.Interrupt | ev.Resume, span: trace.Span) -> None:
        """Publish the decision, then check that every stage acting on it acknowledged in time."""
        kind = type(control).__name__
        try:
            with trace.use_span(span, end_on_exit=False):
                span.add_event(kind.lower())
                sent = await self.ctx.publish(sj.CONTROL, control)
            expected = set(ACKERS[kind])
            missing = expected
            try:
                async with asyncio.timeout(self.policy.ack_timeout_s):
                    while missing := expected - self._acks.get((kind, sent.seq), set()):
                        self._acked.clear()
                        await self._acked.wait()
            except TimeoutError:
                pass
            for stage in sorted(expected - missing):
                span.add_event("acked", {"stage": stage})
            for stage in sorted(missing):
                acks_missed.labels(stage, kind).inc()
                span.add_event("ack_missed", {"stage": stage})
                limit = self.policy.ack_timeout_s
                message = f"{stage} did not acknowledge {kind} of turn {control.turn} within {limit:g}s"
                log.warning(message)
                await self.ctx.report("ack_timeout", message, turn=control.turn, retryable=True)
        finally:
            span.end()

    def _event(self, name: str, **attributes: Any) -> None:
        if self.pause is not None:
            self.pause.span.add_event(name, attributes)

    def _close_pause(self) -> None:
        pause = self.pause
        assert pause is not None
        self.pause = None
        if pause.timer is not None:
            pause.timer.cancel()
        pause.span.end()
