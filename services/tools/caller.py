"""The virtual caller: a bus-attached edge that speaks into a session and listens to the agent.

It is what the demo, the benchmarks, the replay tool and the end-to-end tests use as "the phone".
It publishes one continuous 16 kHz stream of 20 ms `CallerAudio` frames on an absolute schedule
(frame i at t0 + i * 20 ms / speed), silence whenever it is not speaking, exactly as
shared/bench/SCENARIO.md prescribes. Its speaker is the session's `media.out`: every non-silent agent
frame is logged with its arrival time. It also follows the conversation events, so each turn comes
back with what the caller said (as transcribed), what the agent said, and the turn's timeline marks.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import wave
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from proto import codec
from proto import events as ev
from proto import subjects as sj
from services.runtime.bus import Bus
from services.runtime.sessions import end_session, open_session

E = TypeVar("E", bound=ev.Event)

FRAME_SAMPLES = ev.USER_RATE * ev.FRAME_MS // 1000
SILENCE = b"\0" * (FRAME_SAMPLES * 2)
#: An agent frame is "heard" when its peak is above this (s16le); the benchmark counts non-silent frames.
AUDIBLE_PEAK = 64
#: Utterances start on a multiple of this many frames (5 Silero windows of 512 samples: SCENARIO.md).
ALIGN_FRAMES = 8


def read_wav_16k(path: str | Path) -> bytes:
    """A 16 kHz mono s16le WAV file's samples (the caller's recordings are stored that way)."""
    with wave.open(str(path), "rb") as w:
        if (w.getframerate(), w.getnchannels(), w.getsampwidth()) != (ev.USER_RATE, 1, 2):
            raise ValueError(
                f"{path}: need 16 kHz mono 16-bit, got {w.getframerate()} Hz "
                f"{w.getnchannels()} ch {8 * w.getsampwidth()}-bit"
            )
        return w.readframes(w.getnframes())


def frames_of(pcm: bytes) -> list[bytes]:
    """The samples cut into 20 ms frames, the last one padded with silence."""
    step = FRAME_SAMPLES * 2
    out = [pcm[i : i + step] for i in range(0, len(pcm), step)]
    if out and len(out[-1]) < step:
        out[-1] = out[-1] + b"\0" * (step - len(out[-1]))
    return out


def audible(pcm: bytes) -> bool:
    """Whether an agent frame carries sound."""
    return bool(pcm) and int(np.abs(np.frombuffer(pcm, dtype="<i2")).max()) > AUDIBLE_PEAK


@dataclass
class HeardFrame:
    """An agent frame as the caller's speaker received it."""

    turn: int
    generation: int
    index: int
    at_ns: int
    audible: bool
    #: When the egress handed it out (its stamp): orders it against the egress's playout reports,
    #: which arrive through another subscription.
    sent_ns: int = 0


@dataclass
class Turn:
    """One exchange: the caller's utterance and the agent's reply to it, with its timeline."""

    number: int
    said: str = ""  # what the caller said, as the STT transcribed it
    replied: str = ""  # what the agent said (heard text of its reply)
    last_speech_ns: int = 0  # wall time the caller's last speech frame was fed
    first_audio_ns: int = 0  # first audible agent frame after that, at the caller's speaker
    reply_end_ns: int = 0
    missed: bool = False
    marks: dict[str, int] = field(default_factory=dict)
    usage: dict[str, float] = field(default_factory=dict)

    @property
    def ttfa_ms(self) -> float:
        """Time to first audio: caller's last speech frame fed -> first agent audio heard."""
        if not self.first_audio_ns or not self.last_speech_ns:
            return float("nan")
        return (self.first_audio_ns - self.last_speech_ns) / 1e6

    def phase_ms(self, start: str, end: str) -> float:
        """Milliseconds between two marks of the turn's timeline (NaN if either is missing)."""
        if start not in self.marks or end not in self.marks:
            return float("nan")
        return (self.marks[end] - self.marks[start]) / 1e6


class VirtualCaller:
    """Speaks into a session over the bus and listens to the agent; ``async with`` opens the session."""

    def __init__(self, bus: Bus, spec: ev.SessionSpec) -> None:
        self.bus, self.spec = bus, spec
        self.session = spec.session
        self.frame_s = ev.FRAME_MS / 1000 / spec.speed
        self.heard: list[HeardFrame] = []
        self.events: list[ev.Event] = []
        #: When each of ``events`` arrived (wall ns), for measuring signals as the caller's side saw them.
        self.arrived_ns: list[int] = []
        self._script: deque[tuple[bytes, bool]] = deque()  # (frame, ends an utterance)
        self._utterance_ends: list[int] = []  # wall ns at which each utterance's last frame was fed
        self._frames_fed = 0
        self._changed = asyncio.Condition()
        self._subs: list[Subscription] = []
        self._feeder: asyncio.Task[None] | None = None
        self._t0 = 0.0

    async def __aenter__(self) -> VirtualCaller:
        self._subs = [
            await self.bus.nc.subscribe(sj.MEDIA_OUT.subject(self.session), cb=self._on_speaker),
            await self.bus.nc.subscribe(sj.conversation(self.session), cb=self._on_event),
        ]
        await self.bus.nc.flush()
        await open_session(self.bus, self.spec)
        self._t0 = time.perf_counter()
        self._feeder = asyncio.create_task(self._feed(), name=f"caller-feed:{self.session}")
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.hang_up()

    async def hang_up(
        self, reason: str = "hangup", *, wait_for: tuple[str, ...] = (), timeout_s: float = 30.0
    ) -> None:
        """Stop feeding, end the session for every stage, stop listening.

        ``wait_for`` names stages whose acknowledgement of the end to wait for (egress acks once the
        recording of the conversation is written).
        """
        if self._feeder is not None:
            self._feeder.cancel()
            await asyncio.gather(self._feeder, return_exceptions=True)
            self._feeder = None
            await end_session(self.bus, self.session, reason)

            def acked() -> bool:
                done = {e.stage for e in self.of(ev.ControlAck) if e.acked == "SessionEnded"}
                return set(wait_for) <= done

            async with self._changed:
                await asyncio.wait_for(self._changed.wait_for(acked), timeout_s)
        for sub in self._subs:
            await sub.unsubscribe()
        self._subs = []

    # --- the microphone: one continuous stream on an absolute schedule -----------------------------

    async def _feed(self) -> None:
        while True:
            due = self._t0 + self._frames_fed * self.frame_s
            if (delay := due - time.perf_counter()) > 0:
                await asyncio.sleep(delay)
            pcm, ends_utterance = self._script.popleft() if self._script else (SILENCE, False)
            await self.bus.publish(
                sj.MEDIA_IN, ev.CallerAudio(session=self.session, pcm=pcm, sample_rate=ev.USER_RATE)
            )
            self._frames_fed += 1
            if ends_utterance:
                self._utterance_ends.append(time.time_ns())
                async with self._changed:
                    self._changed.notify_all()

    async def say(self, pcm: bytes, *, lead_silence_s: float = 0.5) -> int:
        """Speak ``pcm`` (16 kHz mono) after ``lead_silence_s`` of silence, starting on the 8-frame grid.

        Returns the wall time (ns) at which its last frame was fed.
        """
        queued = self._frames_fed + len(self._script)
        lead = round(lead_silence_s / (ev.FRAME_MS / 1000))
        pad = (-(queued + lead)) % ALIGN_FRAMES
        frames = frames_of(pcm)
        before = len(self._utterance_ends)
        self._script.extend((SILENCE, False) for _ in range(pad + lead))
        self._script.extend((f, i == len(frames) - 1) for i, f in enumerate(frames))
        async with self._changed:
            await self._changed.wait_for(lambda: len(self._utterance_ends) > before)
        return self._utterance_ends[before]

    async def play(self, frames: list[bytes]) -> int:
        """Feed recorded 20 ms frames as they are (no padding); returns when the last one was fed."""
        if not frames:
            return time.time_ns()
        before = len(self._utterance_ends)
        self._script.extend((f, i == len(frames) - 1) for i, f in enumerate(frames))
        async with self._changed:
            await self._changed.wait_for(lambda: len(self._utterance_ends) > before)
        return self._utterance_ends[before]

    async def until(self, condition: Callable[[], bool], *, timeout_s: float = 20.0) -> bool:
        """Wait until ``condition`` (of what was heard and seen) holds; False when ``timeout_s`` passed."""
        try:
            async with self._changed:
                await asyncio.wait_for(self._changed.wait_for(condition), timeout_s)
        except TimeoutError:
            return False
        return True

    async def settle(self, turns: int, *, timeout_s: float = 20.0, idle_s: float = 0.4) -> bool:
        """Wait until ``turns`` caller turns ended and each reply played out, then ``idle_s`` of quiet.

        Returns False when ``timeout_s`` passed first.
        """
        idle_ns = int(idle_s / self.spec.speed * 1e9)

        def settled() -> bool:
            ended = {e.turn for e in self.of(ev.UserTurnEnded)}
            stopped = {e.turn for e in self.of(ev.PlayoutStopped)}
            return (
                len(ended) >= turns and ended <= stopped and time.time_ns() - self._last_heard_ns() >= idle_ns
            )

        deadline = time.monotonic() + timeout_s
        while not settled():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            async with self._changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait_for(settled), min(remaining, idle_s))
        return True

    # --- the speaker and the conversation ---------------------------------------------------------

    async def _on_speaker(self, msg: Msg) -> None:
        at = time.time_ns()
        try:
            frame = codec.decode(msg.subject, msg.data)
        except codec.ContractError:
            return
        if isinstance(frame, ev.AgentAudioFrame):
            heard = HeardFrame(frame.turn, frame.generation, frame.index, at, audible(frame.pcm), frame.ts)
            self.heard.append(heard)
            async with self._changed:
                self._changed.notify_all()

    async def _on_event(self, msg: Msg) -> None:
        at = time.time_ns()
        try:
            self.events.append(codec.decode(msg.subject, msg.data))
        except codec.ContractError:
            return
        self.arrived_ns.append(at)
        async with self._changed:
            self._changed.notify_all()

    @property
    def frames_fed(self) -> int:
        """How many 20 ms frames the microphone has sent so far."""
        return self._frames_fed

    async def until_frame(self, index: int) -> None:
        """Return when the microphone's schedule reaches frame ``index`` (a point inside an utterance)."""
        await asyncio.sleep(max(0.0, self._t0 + index * self.frame_s - time.perf_counter()))

    async def wait_for(self, predicate: Callable[[], bool], timeout_s: float = 30.0) -> None:
        """Wait until ``predicate`` holds, re-checked whenever an event or an agent frame arrives."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(predicate), timeout_s)

    def of(self, kind: type[E]) -> list[E]:
        """Conversation events of one type seen so far."""
        return [e for e in self.events if isinstance(e, kind)]

    def _last_heard_ns(self) -> int:
        return self.heard[-1].at_ns if self.heard else 0

    async def converse(self, pcm: bytes, number: int, *, idle_s: float = 0.4, timeout_s: float = 8.0) -> Turn:
        """One turn of SCENARIO.md: speak, then wait until the reply has played and output was idle.

        A reply that has not played to its end within ``timeout_s`` of the caller's last speech frame
        makes the turn missed.
        """
        turn = Turn(number)
        turn.last_speech_ns = await self.say(pcm)
        deadline = time.monotonic() + timeout_s * max(1.0, 1 / self.spec.speed)
        idle_ns = int(idle_s / self.spec.speed * 1e9)

        def reply_done() -> bool:
            # a reply cut short is not the answer: after a failover its regenerated successor follows
            played = any(
                isinstance(e, ev.PlayoutStopped) and e.turn == number and e.completed for e in self.events
            )
            return played and time.time_ns() - self._last_heard_ns() >= idle_ns

        while not reply_done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                turn.missed = True
                break
            async with self._changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait_for(reply_done), min(remaining, idle_s))
        self._fill(turn)
        return turn

    def _fill(self, turn: Turn) -> None:
        after = [h for h in self.heard if h.at_ns > turn.last_speech_ns and h.audible]
        if after:
            turn.first_audio_ns = after[0].at_ns
            turn.reply_end_ns = after[-1].at_ns
        for e in self.events:
            match e:
                case ev.UserTurnEnded(turn=t, text=text) if t == turn.number:
                    turn.said = text
                case ev.PlayoutStopped(turn=t, heard_text=text) if t == turn.number:
                    turn.replied = text
                case ev.TurnMark(turn=t, mark=mark, at_ns=at) if t == turn.number:
                    turn.marks[mark] = at  # a turn of several speech segments: its last segment counts
                case ev.TurnUsage(turn=t, amounts=amounts, cost_usd=cost) if t == turn.number:
                    for kind, n in {**amounts, "cost_usd": cost}.items():
                        turn.usage[kind] = turn.usage.get(kind, 0.0) + n
