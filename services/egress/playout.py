"""The real-time playout timeline: which frame plays when, and what the caller has heard of each reply.

Frames come ahead of time (TTS runs faster than real time), late (a slow provider), twice (at-least-once
delivery, a successor re-reading the stream), or for replies that are already over. The timeline keeps
one queue per reply (turn, generation), plays replies in turn order and frames in index order, and
starts each frame at max(its arrival, the end of the previous frame). The schedule is absolute: a
late wake-up delays one frame, never the ones after it. A frame later than ``max_late_s`` (the event
loop stalled) re-anchors the schedule at now instead of bursting to catch up, as a speaker would.

``Timeline`` is plain state driven by ``step(now)``; ``Playout`` is the one task per session that
sleeps until the next thing is due and hands it out.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

from proto.events import FRAME_MS, AgentAudioEnd, AgentAudioFrame, WordTiming
from proto.state import EgressState, ReplyPosition

logger = logging.getLogger("voicebus.egress")

Key = tuple[int, int]  # (turn, generation)
Why = Literal["played", "cancelled", "interrupted", "superseded", "stalled", "ended"]
#: What became of a frame handed to ``push``: queued, or dropped and why.
Verdict = Literal["queued", "duplicate", "stale", "closed"]


@dataclass(eq=False)
class Reply:
    """One reply's audio: frames waiting to play, how far it has played, its words."""

    turn: int
    generation: int
    #: Stream sequence of the first message of the reply this process read (where a successor re-reads).
    first_seq: int
    last_activity: float
    #: Trace context the reply's first frame carried (the playout span's parent).
    parent: object = None
    next_index: int = 0
    played: int = 0
    started: bool = False
    first_arrival: float | None = None
    expected: int | None = None  # frames announced by AgentAudioEnd
    text: str = ""
    frames: dict[int, tuple[float, AgentAudioFrame]] = field(default_factory=dict)
    order: list[int] = field(default_factory=list)  # heap of the queued indices
    #: every word timing the reply's frames carried, by (start, text): engines with alignment spread a
    #: chunk's words over several frames, and a re-spoken chunk repeats some
    words: dict[tuple[int, str], WordTiming] = field(default_factory=dict)

    @property
    def key(self) -> Key:
        return self.turn, self.generation

    @property
    def played_ms(self) -> int:
        return self.played * FRAME_MS

    def heard_text(self, completed: bool) -> str:
        """The words whose start had played (all of them when the reply played out)."""
        reached = self.next_index * FRAME_MS
        words = sorted(self.words.values(), key=lambda w: w.start_ms)
        text = " ".join(t for w in words if (completed or w.start_ms < reached) and (t := w.text.strip()))
        return text or (self.text if completed and self.played else "")


@dataclass(frozen=True, slots=True)
class Play:
    """Hand ``frame`` to the sink now; it starts at ``due`` on the timeline."""

    reply: Reply
    frame: AgentAudioFrame
    due: float
    first: bool


@dataclass(frozen=True, slots=True)
class Stop:
    """A reply is over: played out (``completed``) or cut, with ``dropped`` queued frames thrown away."""

    reply: Reply
    completed: bool
    dropped: int
    why: Why


@dataclass(frozen=True, slots=True)
class Wait:
    """Nothing is due before ``until`` (``None``: until something changes)."""

    until: float | None


class Timeline:
    """The replies of one session on one real-time timeline."""

    def __init__(self, frame_s: float, *, max_late_s: float, stall_s: float) -> None:
        self.frame_s, self.max_late_s, self.stall_s = frame_s, max_late_s, stall_s
        self.replies: dict[Key, Reply] = {}
        self.closed: dict[Key, int] = {}  # played_ms of replies that are over
        self.newest: dict[int, int] = {}  # newest generation seen per turn
        self.floor = 0
        self.cut = -1
        self.end_at = -math.inf  # end of the frame handed out last
        self.paused_at: float | None = None
        self.dropped: Counter[str] = Counter()
        self.late = 0  # frames that re-anchored the schedule

    # --- input ------------------------------------------------------------------------------------

    def push(
        self, frame: AgentAudioFrame, now: float, *, seq: int = 0, parent: object = None
    ) -> tuple[Verdict, list[Stop]]:
        """Queue a frame; returns what became of it and the older generations it superseded."""
        verdict, reply, stops = self._reply(frame.turn, frame.generation, now, seq)
        if reply is None:
            self.dropped[verdict] += 1
            return verdict, stops
        for word in frame.words:
            reply.words.setdefault((word.start_ms, word.text), word)
        if frame.index < reply.next_index or frame.index in reply.frames:
            self.dropped["duplicate"] += 1
            return "duplicate", stops
        if reply.parent is None:
            reply.parent = parent
        if reply.first_arrival is None:
            reply.first_arrival = now
        reply.frames[frame.index] = (now, frame)
        heapq.heappush(reply.order, frame.index)
        reply.last_activity = now
        return "queued", stops

    def end(self, end: AgentAudioEnd, now: float, *, seq: int = 0) -> list[Stop]:
        """The reply's audio is complete: it is over once its queue has played."""
        _, reply, stops = self._reply(end.turn, end.generation, now, seq)
        if reply is not None:
            reply.expected, reply.text, reply.last_activity = end.frames, end.text, now
        return stops

    def _reply(
        self, turn: int, generation: int, now: float, seq: int
    ) -> tuple[Verdict, Reply | None, list[Stop]]:
        if turn < self.floor or turn <= self.cut or generation < self.newest.get(turn, 0):
            return "stale", None, []
        if (turn, generation) in self.closed:
            return "closed", None, []
        stops: list[Stop] = []
        if generation > self.newest.get(turn, 0):
            self.newest[turn] = generation
            older = [r for r in self.replies.values() if r.turn == turn and r.generation < generation]
            stops = [self._close(r, completed=False, why="superseded") for r in older]
        reply = self.replies.get((turn, generation))
        if reply is None:
            reply = self.replies[turn, generation] = Reply(turn, generation, first_seq=seq, last_activity=now)
        return "queued", reply, stops

    # --- control ----------------------------------------------------------------------------------

    def cancel(self, turn: int, generation: int) -> list[Stop]:
        """Drop one reply now, and whatever of it arrives later."""
        reply = self.replies.get((turn, generation))
        if reply is None:
            self.closed.setdefault((turn, generation), 0)
            return []
        return [self._close(reply, completed=False, why="cancelled")]

    def interrupt(self, turn: int) -> list[Stop]:
        """The caller barged in: every reply up to ``turn`` stops now; later frames of them are dropped."""
        self.cut = max(self.cut, turn)
        cut = sorted(k for k in self.replies if k[0] <= turn)
        return [self._close(self.replies[k], completed=False, why="interrupted") for k in cut]

    def stop_all(self) -> list[Stop]:
        """The call is over: every reply stops where it is."""
        return [
            self._close(r, completed=r.expected is not None and not r.order, why="ended")
            for r in sorted(self.replies.values(), key=lambda r: r.key)
        ]

    def pause(self, now: float) -> Reply | None:
        """Hold output (the caller started speaking); returns the reply held, None if none or already."""
        reply = self.current()
        if reply is None or self.paused_at is not None:
            return None
        self.paused_at = now
        return reply

    def resume(self, now: float) -> Reply | None:
        """Carry on from where output stopped: the rest of the schedule moves by the pause.

        Returns the reply that goes on (None when output was not paused or nothing is left).
        """
        if self.paused_at is None:
            return None
        self.paused_at = None
        self.end_at = max(self.end_at, now)
        for reply in self.replies.values():
            reply.last_activity = max(reply.last_activity, now)
        return self.current()

    def played_ms(self, turn: int, generation: int | None = None) -> int:
        """How much of a reply has played (its newest generation when none is given)."""
        key = (turn, self.newest.get(turn, 0) if generation is None else generation)
        reply = self.replies.get(key)
        return reply.played_ms if reply is not None else self.closed.get(key, 0)

    # --- the clock ---------------------------------------------------------------------------------

    def current(self) -> Reply | None:
        """The reply that plays now or next: the oldest one not over."""
        return self.replies[min(self.replies)] if self.replies else None

    @property
    def busy(self) -> bool:
        """Whether any reply is still to play or playing."""
        return bool(self.replies)

    def step(self, now: float) -> Play | Stop | Wait:
        """What to do at ``now``: hand out a frame, close a reply, or wait."""
        reply = self.current()
        if reply is None or self.paused_at is not None:
            return Wait(None)
        if reply.order:
            arrived, frame = reply.frames[reply.order[0]]
            due = max(arrived, self.end_at)
            if now < due:
                return Wait(due)
            if now - due > self.max_late_s:
                due, self.late = now, self.late + 1
            heapq.heappop(reply.order)
            del reply.frames[frame.index]
            first = not reply.started
            if first:
                reply.started = True
                self._advance_floor(reply.turn)
            reply.next_index, reply.played = frame.index + 1, reply.played + 1
            self.end_at = due + self.frame_s
            return Play(reply, frame, due, first)
        if reply.expected is not None:
            return (
                Wait(self.end_at) if now < self.end_at else self._close(reply, completed=True, why="played")
            )
        deadline = max(reply.last_activity, self.end_at) + self.stall_s  # silent since it ran dry
        return Wait(deadline) if now < deadline else self._close(reply, completed=False, why="stalled")

    def _close(self, reply: Reply, *, completed: bool, why: Why) -> Stop:
        del self.replies[reply.key]
        self.closed[reply.key] = reply.played_ms
        dropped = len(reply.frames)
        self.dropped["cut"] += dropped
        reply.frames.clear()
        reply.order.clear()
        return Stop(reply, completed, dropped, why)

    def _advance_floor(self, turn: int) -> None:
        """Replies of older turns are stale from now on; forget what was kept about them."""
        if turn <= self.floor:
            return
        self.floor = turn
        self.closed = {k: v for k, v in self.closed.items() if k[0] >= turn}
        self.newest = {t: g for t, g in self.newest.items() if t >= turn}

    # --- failover ---------------------------------------------------------------------------------

    def state(self, delivered_seq: int) -> EgressState:
        """What a successor needs; it re-reads audio.out after the first reply not yet over."""
        current = self.current()
        position = None
        if current is not None and current.started:
            position = ReplyPosition(
                turn=current.turn,
                generation=current.generation,
                next_index=current.next_index,
                played=current.played,
            )
        return EgressState(
            floor=self.floor,
            cut=self.cut,
            closed=[(t, g, ms) for (t, g), ms in self.closed.items()],
            generations=list(self.newest.items()),
            current=position,
            audio_out_seq=max(
                0, min((r.first_seq - 1 for r in self.replies.values()), default=delivered_seq)
            ),
        )

    def restore(self, state: EgressState, now: float) -> None:
        """Continue from a predecessor's state: what it played is not played again."""
        self.floor, self.cut = state.floor, state.cut
        self.closed = {(t, g): ms for t, g, ms in state.closed}
        self.newest = dict(state.generations)
        if (p := state.current) is not None:
            self.replies[p.turn, p.generation] = Reply(
                p.turn,
                p.generation,
                first_seq=state.audio_out_seq + 1,
                last_activity=now,
                next_index=p.next_index,
                played=p.played,
                started=True,
            )


class Clock(Protocol):
    """Time for the pacing task (injected so tests can run it on virtual time)."""

    def now(self) -> float:
        """Seconds on a monotonic clock."""

    async def wait(self, wake: asyncio.Event, until: float | None) -> None:
        """Return at ``until`` or when ``wake`` is set, whichever is first."""


class MonotonicClock:
    """The real clock: the event loop's own (monotonic) time, with waits that end on a shared grid.

    A wait for a due frame ends at the next multiple of ``tick_s`` of the loop's clock, so every session
    of the replica whose frame falls in the same tick is woken by one timer run and their frames leave
    in one socket write (instead of one wake-up and one write per session and frame). Each frame is
    then handed out up to a tick late, always by the same amount within a reply (the schedule stays
    absolute), and a frame that is due when it arrives (a reply's first) does not wait for the grid.
    A wait that reaches its end sets ``wake`` from a timer: a timeout would end most waits by throwing
    a cancellation into the pacing task.
    """

    def __init__(self, tick_s: float = 0.0) -> None:
        self.tick_s = tick_s

    def now(self) -> float:
        return time.monotonic()

    async def wait(self, wake: asyncio.Event, until: float | None) -> None:
        if until is None:
            await wake.wait()
            return
        loop = asyncio.get_running_loop()
        at = loop.time() + until - time.monotonic()
        if self.tick_s > 0:
            at = math.ceil(at / self.tick_s) * self.tick_s
        timer = loop.call_at(at, wake.set)
        try:
            await wake.wait()
        finally:
            timer.cancel()


class Playout:
    """The pacing task of one session: sleeps until the timeline has something due, then hands it out."""

    def __init__(
        self,
        timeline: Timeline,
        clock: Clock,
        play: Callable[[Play], Awaitable[None]],
        stop: Callable[[Stop], Awaitable[None]],
    ) -> None:
        self.timeline, self.clock, self._play, self._stop = timeline, clock, play, stop
        self._wake = asyncio.Event()
        self.failures = 0

    def wake(self) -> None:
        """Something changed (a frame arrived, a reply was cut): look at the timeline again."""
        self._wake.set()

    async def run(self) -> None:
        """Pace the session until cancelled; a frame that cannot be handed out is skipped, not fatal."""
        while True:
            self._wake.clear()  # before step(): a change made after it wakes the wait below
            try:
                match self.timeline.step(self.clock.now()):
                    case Play() as play:
                        await self._play(play)
                    case Stop() as stop:
                        await self._stop(stop)
                    case Wait(until=until):
                        await self.clock.wait(self._wake, until)
            except Exception:
                self.failures += 1
                if self.failures in (1, 10) or self.failures % 1000 == 0:  # not once per frame
                    logger.exception("playout failed (%d times so far); going on", self.failures)
