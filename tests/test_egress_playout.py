"""The playout timeline on its own, with time given by the test: the schedule, its pacing task on a
virtual clock, de-duplication, reply order, generations, cuts, pause/resume and failover state."""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Callable

import pytest

from proto import events as ev
from services.egress.playout import MonotonicClock, Play, Playout, Stop, Timeline, Wait

RATE = 24000
FRAME_S = 0.02


def frame(
    index: int, turn: int = 1, generation: int = 0, words: tuple[ev.WordTiming, ...] = ()
) -> ev.AgentAudioFrame:
    return ev.AgentAudioFrame(
        session="s1",
        turn=turn,
        generation=generation,
        index=index,
        chunk=index // 25,
        pcm=bytes([index % 251]) * ev.frame_bytes(RATE),
        sample_rate=RATE,
        words=words,
    )


def end(frames: int, turn: int = 1, generation: int = 0) -> ev.AgentAudioEnd:
    return ev.AgentAudioEnd(session="s1", turn=turn, generation=generation, frames=frames, text="full text")


WORDS = tuple(ev.WordTiming(text=w, start_ms=100 * i, end_ms=100 * i + 90) for i, w in enumerate("abcde"))


def timeline(speed: float = 1.0, max_late_s: float = 0.06, stall_s: float = 5.0) -> Timeline:
    return Timeline(FRAME_S / speed, max_late_s=max_late_s / speed, stall_s=stall_s)


def whole_reply(frames: int) -> Timeline:
    """A timeline holding a whole reply of ``frames`` frames, all arrived at 0 (a TTS far ahead)."""
    tl = timeline()
    for i in range(frames):
        tl.push(frame(i), 0.0)
    tl.end(end(frames), 0.0)
    return tl


def drive(tl: Timeline, start: float = 0.0, until: float | None = None) -> tuple[list[Play], list[Stop]]:
    """Step the timeline, jumping to each deadline exactly, until it waits for input or ``until``
    (default: 2 s on, short of the stall watchdog)."""
    now, plays, stops = start, [], []
    until = start + 2.0 if until is None else until
    while now < until:
        match tl.step(now):
            case Play() as p:
                plays.append(p)
            case Stop() as s:
                stops.append(s)
            case Wait(until=None):
                break
            case Wait(until=t):
                now = t
    return plays, stops


def test_frames_play_back_to_back_from_their_arrival_and_an_underrun_restarts_at_arrival() -> None:
    tl = timeline()
    for i in range(10):
        tl.push(frame(i), 1.0)
    plays, _ = drive(tl, 1.0)
    assert [p.frame.index for p in plays] == list(range(10))
    assert [p.due for p in plays] == pytest.approx([1.0 + FRAME_S * i for i in range(10)])
    assert [p.first for p in plays] == [True] + [False] * 9
    # the queue ran dry at 1.2 s; a frame arriving at 3.0 s starts when it arrives, not at 1.2 s
    tl.push(frame(10), 3.0)
    plays, _ = drive(tl, 3.0)
    assert [(p.frame.index, p.due) for p in plays] == [(10, 3.0)]


def test_speed_scales_the_frame_duration() -> None:
    tl = timeline(speed=4.0)
    for i in range(20):
        tl.push(frame(i), 0.0)
    plays, _ = drive(tl)
    assert [p.due for p in plays] == pytest.approx([0.005 * i for i in range(20)])


def test_a_stalled_loop_re_anchors_instead_of_bursting() -> None:
    tl = timeline(max_late_s=0.06)
    for i in range(5):
        tl.push(frame(i), 0.0)
    assert isinstance(tl.step(0.0), Play)
    late = tl.step(0.5)  # frame 1 was due at 0.02; the loop was stalled for half a second
    assert isinstance(late, Play) and late.due == 0.5
    assert tl.late == 1
    assert tl.step(0.5) == Wait(0.52)  # the rest follow at real-time pace, not in a burst


async def test_pacing_task_keeps_an_absolute_schedule_over_500_frames_despite_late_wake_ups() -> None:
    clock, tl = VirtualClock(), whole_reply(500)
    played: list[tuple[int, float, float]] = []
    stopped: list[Stop] = []

    async def play(p: Play) -> None:
        played.append((p.frame.index, p.due, clock.now()))

    async def stop(s: Stop) -> None:
        stopped.append(s)

    rng = random.Random(3)
    await run_paced(Playout(tl, clock, play, stop), clock, late=lambda: rng.uniform(0.0, 0.004))
    assert [i for i, _, _ in played] == list(range(500))
    # each frame is scheduled from the previous one's scheduled end, not from when the task woke up:
    # 500 late wake-ups (about 2 ms each) add up to nothing
    assert [due for _, due, _ in played] == pytest.approx([FRAME_S * i for i in range(500)], abs=1e-9)
    assert max(actual - due for _, due, actual in played) <= 0.004 + 1e-9
    assert len(stopped) == 1 and stopped[0].completed and stopped[0].reply.played == 500


def test_duplicates_are_dropped_whether_queued_or_already_played() -> None:
    tl = timeline()
    assert tl.push(frame(0), 0.0)[0] == "queued"
    assert tl.push(frame(1), 0.0)[0] == "queued"
    assert tl.push(frame(1), 0.0)[0] == "duplicate"
    drive(tl)
    assert tl.push(frame(0), 1.0)[0] == "duplicate"  # redelivered after it played
    tl.end(end(2), 1.0)
    plays, stops = drive(tl, 1.0)
    assert plays == [] and stops[0].completed and stops[0].reply.played == 2
    assert tl.dropped["duplicate"] == 2


def test_frames_play_in_index_order_and_replies_in_turn_order() -> None:
    tl = timeline()
    for turn, index in [(3, 1), (3, 0), (2, 2), (2, 0), (2, 1)]:
        tl.push(frame(index, turn=turn), 0.0)
    tl.end(end(2, turn=3), 0.0)
    plays, stops = drive(tl)
    assert [(p.frame.turn, p.frame.index) for p in plays] == [(2, 0), (2, 1), (2, 2)]
    assert stops == []  # turn 2 has not ended: turn 3 waits behind it
    tl.end(end(3, turn=2), 0.1)
    plays, stops = drive(tl, 0.1)
    assert [(p.frame.turn, p.frame.index) for p in plays] == [(3, 0), (3, 1)]
    assert [(s.reply.turn, s.completed) for s in stops] == [(2, True), (3, True)]
    # the reply of turn 3 played right after turn 2's, with no gap
    assert plays[0].due == pytest.approx(3 * FRAME_S)
    # a reply of an older turn arriving now is stale
    assert tl.push(frame(0, turn=2, generation=1), 1.0)[0] == "stale"


def test_completion_waits_for_the_last_frame_to_play_and_hears_every_word() -> None:
    tl = timeline()
    tl.push(frame(0, words=WORDS), 0.0)
    for i in range(1, 25):
        tl.push(frame(i), 0.0)
    tl.end(end(25), 0.0)
    plays, stops = drive(tl)
    assert len(plays) == 25
    (stop,) = stops
    assert stop.completed and stop.why == "played" and stop.reply.played_ms == 500
    assert stop.reply.heard_text(True) == "a b c d e"


def test_a_newer_generation_supersedes_the_one_playing() -> None:
    tl = timeline()
    for i in range(10):
        tl.push(frame(i), 0.0)
    assert tl.step(0.0) == Play(tl.replies[1, 0], frame(0), 0.0, True)
    verdict, stops = tl.push(frame(0, generation=1), 0.01)
    assert verdict == "queued"
    assert [(s.reply.generation, s.why, s.completed, s.dropped) for s in stops] == [
        (0, "superseded", False, 9)
    ]
    assert tl.push(frame(5, generation=0), 0.01)[0] == "stale"
    plays, _ = drive(tl, 0.01)
    assert [(p.frame.generation, p.frame.index) for p in plays] == [(1, 0)]


def test_cancel_cuts_a_reply_mid_stream_and_drops_what_arrives_for_it_later() -> None:
    tl = timeline()
    tl.push(frame(0, words=WORDS), 0.0)
    for i in range(1, 20):
        tl.push(frame(i), 0.0)
    plays, _ = drive(tl, 0.0, until=0.25)  # 13 frames handed out (0.00 .. 0.24)
    assert len(plays) == 13
    (stop,) = tl.cancel(1, 0)
    assert (stop.completed, stop.why, stop.dropped, stop.reply.played_ms) == (False, "cancelled", 7, 260)
    assert stop.reply.heard_text(False) == "a b c"  # words starting before 260 ms
    assert tl.step(0.3) == Wait(None)
    assert tl.push(frame(20), 0.3)[0] == "closed"
    assert tl.end(end(21), 0.3) == []
    assert tl.played_ms(1, 0) == 260
    # cancelling a reply that never arrived: its frames are dropped when they come
    assert tl.cancel(4, 0) == []
    assert tl.push(frame(0, turn=4), 0.4)[0] == "closed"


def test_interrupt_stops_every_reply_up_to_its_turn() -> None:
    tl = timeline()
    tl.push(frame(0, turn=1), 0.0)
    tl.push(frame(0, turn=2), 0.0)
    tl.push(frame(0, turn=3), 0.0)
    stops = tl.interrupt(2)
    assert [(s.reply.turn, s.why) for s in stops] == [(1, "interrupted"), (2, "interrupted")]
    assert tl.push(frame(1, turn=2, generation=1), 0.0)[0] == "stale"
    plays, _ = drive(tl)
    assert [(p.frame.turn, p.frame.index) for p in plays] == [(3, 0)]


def test_pause_holds_output_and_resume_continues_from_the_resume_time() -> None:
    tl = timeline()
    for i in range(6):
        tl.push(frame(i), 0.0)
    plays, _ = drive(tl, 0.0, until=0.05)  # frames 0, 1, 2
    tl.pause(0.05)
    assert tl.step(0.06) == Wait(None)
    assert tl.step(5.0) == Wait(None)  # nothing plays and nothing stalls while paused
    tl.resume(2.0)
    rest, _ = drive(tl, 2.0)
    assert [p.frame.index for p in plays + rest] == list(range(6))
    assert [p.due for p in rest] == pytest.approx([2.0, 2.02, 2.04])


def test_a_reply_that_gets_no_audio_is_given_up_after_the_stall_time() -> None:
    tl = timeline(stall_s=5.0)
    tl.push(frame(0), 0.0)
    plays, stops = drive(tl, 0.0, until=30.0)
    assert len(plays) == 1
    assert [(s.why, s.completed) for s in stops] == [("stalled", False)]
    assert stops and tl.closed[1, 0] == 20


def test_a_successor_restored_from_state_plays_only_the_rest() -> None:
    first = timeline()
    frames = [frame(0, words=WORDS), *(frame(i) for i in range(1, 40))]
    for seq, f in enumerate(frames, start=101):
        first.push(f, 0.0, seq=seq)
    plays, _ = drive(first, 0.0, until=0.31)
    assert len(plays) == 16
    state = first.state(delivered_seq=140)
    assert state.current is not None and (state.current.next_index, state.current.played) == (16, 16)
    assert state.audio_out_seq == 100  # re-read the reply from its first frame

    second = timeline()
    second.restore(state, 10.0)
    verdicts = [second.push(f, 10.0, seq=seq)[0] for seq, f in enumerate(frames, start=101)]
    assert verdicts == ["duplicate"] * 16 + ["queued"] * 24
    second.end(end(40), 10.0)
    rest, stops = drive(second, 10.0)
    assert [p.frame.index for p in rest] == list(range(16, 40))
    assert not any(p.first for p in rest)  # PlayoutStarted went out already
    (stop,) = stops
    assert stop.completed and stop.reply.played_ms == 40 * 20
    assert stop.reply.heard_text(True) == "a b c d e"  # words of frames played before the takeover count


async def run_paced(playout: Playout, clock: VirtualClock, late: Callable[[], float] = lambda: 0.0) -> None:
    """Run the pacing task until it waits for input; each wake-up comes ``late()`` after its deadline."""
    task = asyncio.create_task(playout.run())
    try:
        await clock.parked.wait()
        while clock.until is not None:
            await clock.advance(clock.until + late())
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


class VirtualClock:
    """Time moves only when the test advances it; the pacing task parks in ``wait`` in between."""

    def __init__(self) -> None:
        self.t = 0.0
        self.until: float | None = None
        self.parked = asyncio.Event()
        self._moved = asyncio.Event()

    def now(self) -> float:
        return self.t

    async def wait(self, wake: asyncio.Event, until: float | None) -> None:
        self.until = until
        while not wake.is_set() and (until is None or self.t < until):
            self._moved.clear()
            self.parked.set()
            waits = [asyncio.ensure_future(wake.wait()), asyncio.ensure_future(self._moved.wait())]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
                await asyncio.gather(*waits, return_exceptions=True)

    async def advance(self, t: float) -> None:
        """Move time to ``t`` and return once the pacing task has done what was due and parked again."""
        self.parked.clear()
        self.t = t
        self._moved.set()
        await self.parked.wait()


async def test_a_frame_that_cannot_be_handed_out_does_not_stop_the_pacing() -> None:
    clock, tl = VirtualClock(), whole_reply(5)
    played: list[int] = []
    stopped: list[Stop] = []

    async def play(p: Play) -> None:
        if p.frame.index == 2:
            raise ConnectionError("bus gone for a moment")
        played.append(p.frame.index)

    async def stop(s: Stop) -> None:
        stopped.append(s)

    playout = Playout(tl, clock, play, stop)
    await run_paced(playout, clock)
    assert played == [0, 1, 3, 4] and playout.failures == 1
    assert len(stopped) == 1 and stopped[0].completed


def test_words_spread_over_several_frames_of_a_chunk_all_count_once() -> None:
    # an aligned engine (ElevenLabs) sends a chunk's words with the frames that carry them, and a
    # chunk re-spoken after a fallback repeats some of them
    tl = timeline()
    tl.push(frame(0, words=WORDS[:2]), 0.0)
    tl.push(frame(1, words=WORDS[2:4]), 0.0)
    tl.push(frame(2, words=WORDS[3:]), 0.0)
    for i in range(3, 25):
        tl.push(frame(i), 0.0)
    tl.end(end(25), 0.0)
    _, stops = drive(tl)
    (stop,) = stops
    assert stop.reply.heard_text(True) == "a b c d e"


async def test_waits_for_due_frames_end_on_the_pacing_grid_never_before_they_are_due() -> None:
    tick = 0.05
    clock = MonotonicClock(tick)
    grid = math.ceil(clock.now() / tick) * tick + tick  # a grid point ahead
    loop = asyncio.get_running_loop()

    async def woken(until: float) -> tuple[float, bool]:
        wake = asyncio.Event()
        await clock.wait(wake, until)
        return loop.time(), wake.is_set()

    # two sessions' frames due 11 and 37 ms after a grid point both go out at the next one
    (first, set_first), (second, set_second) = await asyncio.gather(woken(grid + 0.011), woken(grid + 0.037))
    assert first >= grid + tick and second >= grid + tick
    assert set_first and set_second  # the timer sets the wake event: the pacing task steps again

    # something that changes (a frame arrives, a cut) still wakes a wait that is due an hour later
    wake = asyncio.Event()
    loop.call_soon(wake.set)
    await asyncio.wait_for(clock.wait(wake, clock.now() + 3600.0), timeout=30.0)
