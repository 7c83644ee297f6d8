"""The egress stage as a process on a real nats-server, fed agent frames by the test: pacing on
media.out, playout reports, cuts and their acks, the WAV sink and the recording, takeover, bad input."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import wave
from pathlib import Path

import numpy as np

from proto import codec
from proto import events as ev
from proto import subjects as sj
from services.runtime.bus import Bus
from services.runtime.sessions import end_session, open_session
from services.tools.stack import Stack
from tests.support.agent_audio import pack
from tests.support.tap import Tap

RATE = 24000
FRAME = ev.frame_bytes(RATE)
#: Words of a reply of 50 frames (1 s), in two chunks of 25 frames.
WORDS = {0: ("The", "weather", "today", "is", "sunny"), 25: ("and", "warm", "with", "light", "wind.")}
FULL_TEXT = " ".join(w for chunk in WORDS.values() for w in chunk)


def tone(index: int) -> bytes:
    """20 ms of a 440 Hz square wave, continuing across frames: every sample loud, easy to find."""
    n = np.arange(index * FRAME // 2, (index + 1) * FRAME // 2)
    return np.where(np.sin(2 * np.pi * 440 * n / RATE) >= 0, 8000, -8000).astype("<i2").tobytes()


def reply(session: str, turn: int, frames: int, generation: int = 0) -> list[ev.AgentAudioFrame]:
    out = []
    for i in range(frames):
        words: tuple[ev.WordTiming, ...] = ()
        if i % 50 in WORDS:
            base = (i // 50) * 1000 + (i % 50) * 20
            words = tuple(
                ev.WordTiming(text=w, start_ms=base + 100 * k, end_ms=base + 100 * k + 90)
                for k, w in enumerate(WORDS[i % 50])
            )
        out.append(
            ev.AgentAudioFrame(
                session=session,
                turn=turn,
                generation=generation,
                index=i,
                chunk=i // 25,
                pcm=tone(i),
                sample_rate=RATE,
                words=words,
            )
        )
    return out


async def send_reply(bus: Bus, frames: list[ev.AgentAudioFrame], *, end: bool = True) -> None:
    """All frames at once (a TTS running ahead of real time, 10 frames a message), then the end."""
    for audio in pack(frames):
        await bus.publish(sj.AUDIO_OUT, audio)
    if end:
        first = frames[0]
        await bus.publish(
            sj.AUDIO_OUT,
            ev.AgentAudioEnd(
                session=first.session, turn=first.turn, generation=first.generation, frames=len(frames)
            ),
        )


def media_out(tap: Tap, turn: int) -> list[tuple[int, float]]:
    """(index, arrival time) of the frames of ``turn`` that came out on media.out, in arrival order."""
    subject = sj.MEDIA_OUT.subject(tap.session)
    return [
        (e.index, t)
        for s, e, t in tap.events
        if s == subject and isinstance(e, ev.AgentAudioFrame) and e.turn == turn
    ]


async def speak(bus: Bus, session: str, frames: int, loud: set[int], t0_ns: int) -> None:
    """The ingress's side: caller frames on a real-time schedule, five to a UserAudio sent when its
    last frame i is due and stamped t0 + 20 ms * i (as an ingress pacing a file does), so where each
    frame belongs in the recording is known exactly."""
    rng = np.random.default_rng(5)
    t0 = time.monotonic()
    per = ev.USER_AUDIO_MAX_FRAMES
    for first in range(0, frames, per):
        last = min(first + per, frames) - 1
        await asyncio.sleep(max(0.0, t0 + 0.02 * last - time.monotonic()))
        pcm = b"".join(
            (rng.normal(0, 6000, 320) if i in loud else np.zeros(320)).astype("<i2").tobytes()
            for i in range(first, last + 1)
        )
        probs = (0.0,) * (last + 1 - first)
        audio = ev.UserAudio(
            session=session,
            index=first,
            pcm=pcm,
            speech_probs=probs,
            seq=first // per + 1,
            ts=t0_ns + last * 20_000_000,
        )
        await bus.nc.publish(sj.AUDIO_IN.subject(session), codec.encode(audio))


async def played(tap: Tap, turn: int, frames: int) -> None:
    """Wait until ``frames`` frames of ``turn`` have come out on media.out."""
    await tap.wait(ev.Event, lambda _: len(media_out(tap, turn)) >= frames)


async def start_egress(stack: Stack, count: int = 1, **env: str) -> None:
    await stack.wait_ready_async([stack.spawn("egress", env=env) for _ in range(count)])


async def test_a_reply_plays_out_paced_in_order_and_is_reported(
    stack: Stack, bus: Bus, session_id: str
) -> None:
    max_late_ms = 40.0
    await start_egress(stack, VB_EGRESS_MAX_LATE_MS=str(max_late_ms))
    speed = 2.0
    await open_session(bus, ev.SessionSpec(session=session_id, speed=speed), stages=("egress",))
    async with Tap(bus, session_id) as tap:
        await send_reply(bus, reply(session_id, 1, 50))
        (stopped,) = await tap.wait(ev.PlayoutStopped)
    out = media_out(tap, 1)
    assert [i for i, _ in out] == list(range(50))
    # No frame leaves earlier than the frames before it put it on a real-time timeline (x speed):
    # when each frame was handed out (its ts, stamped by egress as it publishes) is at least the
    # previous frame's time plus a frame, less a tolerance. The timeline is absolute (a late frame is
    # followed by an on-time one), so the tolerance is the lateness at which the schedule restarts.
    # From frame 1: frame 0 waited for PlayoutStarted to be stored.
    sent = [(e.index, e.ts / 1e9) for s, e, _ in tap.events if s == sj.MEDIA_OUT.subject(session_id)]
    frame_s, tolerance = 0.02 / speed, max_late_ms / 1000 / speed + 0.005
    bound, early = -1.0, []
    for i, t in sent[1:]:
        if t < bound - tolerance:
            early.append((i, round(bound - t, 4)))
        bound = max(bound, t) + frame_s
    assert not early, f"frames ahead of the timeline (index, seconds early): {early}"
    assert sent[-1][1] - sent[1][1] >= 48 * frame_s - tolerance  # paced, not passed through
    # PlayoutStarted before the first frame, PlayoutStopped after the last
    kinds = [type(e).__name__ for s, e, _ in tap.events if s != sj.AUDIO_OUT.subject(session_id)]
    assert kinds.index("PlayoutStarted") < kinds.index("AgentAudioFrame")
    assert len(kinds) - 1 - kinds[::-1].index("AgentAudioFrame") < kinds.index("PlayoutStopped")
    assert (stopped.turn, stopped.completed, stopped.played_ms, stopped.dropped_frames) == (1, True, 1000, 0)
    assert stopped.heard_text == FULL_TEXT
    marks = await tap.wait(ev.TurnMark, lambda m: m.mark == "first_audio_out")
    assert marks[0].stage == "egress" and marks[0].turn == 1


async def test_cancel_cuts_the_reply_reports_what_was_heard_and_drops_late_frames(
    stack: Stack, bus: Bus, session_id: str
) -> None:
    await start_egress(stack)
    await open_session(bus, ev.SessionSpec(session=session_id), stages=("egress",))
    frames = reply(session_id, 1, 100)
    async with Tap(bus, session_id) as tap:
        await send_reply(bus, frames[:90], end=False)
        await played(tap, turn=1, frames=21)
        cancel = await bus.publish(sj.CONTROL, ev.Cancel(session=session_id, turn=1, generation=0))
        (ack,) = await tap.wait(ev.ControlAck, lambda a: a.stage == "egress")
        acked_at = next(n for n, (_, e, _) in enumerate(tap.events) if e is ack)
        (stopped,) = await tap.wait(ev.PlayoutStopped)
        # the rest of the cancelled reply arrives late; then a next reply, to know egress went on
        await send_reply(bus, frames[90:], end=False)
        await bus.publish(sj.AUDIO_OUT, ev.AgentAudioEnd(session=session_id, turn=1, frames=100))
        await send_reply(bus, reply(session_id, 2, 10))
        await tap.wait(ev.PlayoutStopped, lambda s: s.turn == 2)
    out = media_out(tap, 1)
    assert [i for i, _ in out] == list(range(len(out)))
    assert (ack.acked, ack.turn, ack.acked_seq) == ("Cancel", 1, cancel.seq)
    assert not stopped.completed and stopped.turn == 1
    assert stopped.played_ms == len(out) * 20 == ack.played_ms
    assert 20 * 21 <= stopped.played_ms < 90 * 20
    assert stopped.dropped_frames == 90 - len(out)
    heard = stopped.heard_text.split()
    assert heard == FULL_TEXT.split()[: len(heard)] and 0 < len(heard) < 10
    after_ack = [
        e
        for s, e, _ in tap.events[acked_at:]
        if s == sj.MEDIA_OUT.subject(session_id) and isinstance(e, ev.AgentAudioFrame) and e.turn == 1
    ]
    assert not after_ack, (
        f"frames of the cancelled reply played after the ack: {[e.index for e in after_ack]}"
    )
    assert [i for i, _ in media_out(tap, 2)] == list(range(10))


def wav_session(session: str, folder: Path) -> ev.SessionSpec:
    """A session played to a WAV file and recorded, opened now."""
    return ev.SessionSpec(
        session=session,
        sink="file",
        sink_uri=str(folder / "agent.wav"),
        recording_path=str(folder / "conversation.wav"),
        output_rate=RATE,
        opened_ts=time.time_ns(),
    )


async def test_file_sink_and_recording_put_each_voice_where_it_was_heard(
    stack: Stack, bus: Bus, session_id: str, tmp_path: Path
) -> None:
    await start_egress(stack)
    spec = wav_session(session_id, tmp_path)
    await open_session(bus, spec, stages=("egress",))
    loud = set(range(25, 50))  # the caller speaks from frame 25 to 49
    async with Tap(bus, session_id) as tap:
        speaking = asyncio.create_task(speak(bus, session_id, 110, loud, t0_ns := time.time_ns()))
        try:
            await tap.wait_frames(lambda f: f.index == 60)
            await send_reply(bus, reply(session_id, 1, 25))  # the agent answers while the caller is silent
            (started,) = await tap.wait(ev.PlayoutStarted)
            await tap.wait(ev.PlayoutStopped)
            await speaking
        finally:
            speaking.cancel()
        await end_session(bus, session_id)
        await tap.wait(ev.ControlAck, lambda a: a.acked == "SessionEnded" and a.stage == "egress")

    def at(ts: int) -> int:
        return round((ts - spec.opened_ts) / 1e9 * RATE)

    rec, rec_rate = read_wav(Path(spec.recording_path), channels=2)
    agent, agent_rate = read_wav(Path(spec.sink_uri), channels=1)
    assert rec_rate == agent_rate == RATE
    # the agent: 25 frames of tone (contiguous unless a stalled machine restarted the schedule),
    # starting when playout started
    a_start, a_end = voiced(rec[:, 1])
    assert np.count_nonzero(rec[:, 1]) == 25 * FRAME // 2
    assert abs(a_start - at(started.ts)) <= 0.02 * RATE
    # the sink's track is the same voice at the same time
    voice = np.flatnonzero(rec[:, 1])
    assert np.array_equal(np.flatnonzero(agent[:, 0]), voice)
    assert np.array_equal(agent[voice, 0], rec[voice, 1])
    # the caller: on the left, from when frame 25 reached the ingress, 0.5 s long
    c_start, c_end = voiced(rec[:, 0])
    assert abs(c_start - at(t0_ns + 25 * 20_000_000)) <= 0.005 * RATE
    assert abs((c_end - c_start) - 0.5 * RATE) <= 0.01 * RATE
    # each voice only on its own side; the recording covers the call up to its last caller frame
    assert np.abs(rec[a_start:a_end, 0]).max() < 50 and not rec[c_start:c_end, 1].any()
    assert len(rec) >= at(t0_ns + 110 * 20_000_000) - 0.005 * RATE


def read_wav(path: Path, channels: int) -> tuple[np.ndarray, int]:
    with wave.open(str(path), "rb") as w:
        assert (w.getnchannels(), w.getsampwidth()) == (channels, 2)
        data = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").reshape(-1, channels)
        return data, w.getframerate()


def voiced(samples: np.ndarray) -> tuple[int, int]:
    """Start of the first and end of the last loud stretch."""
    found = spans(samples)
    assert found, "no audio where some was expected"
    return found[0][0], found[-1][1]


def spans(samples: np.ndarray, threshold: float = 2400.0, window: int = 48) -> list[tuple[int, int]]:
    """Stretches whose mean level over ``window`` samples (2 ms) is above ``threshold`` (about half
    the level of the test's voices, so that the edges fall where the voices start and end)."""
    level = np.convolve(np.abs(samples.astype(np.float64)), np.ones(window) / window, mode="same")
    edges = np.flatnonzero(np.diff(np.concatenate([[0], (level > threshold).astype(np.int8), [0]])))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


async def test_a_successor_plays_the_rest_of_the_reply_after_the_owner_is_killed(
    stack: Stack, bus: Bus, session_id: str
) -> None:
    await start_egress(stack, 2, VB_EGRESS_CHECKPOINT_S="0.1")
    owners = await open_session(bus, ev.SessionSpec(session=session_id), stages=("egress",))
    frames = 150
    async with Tap(bus, session_id) as tap:
        await send_reply(bus, reply(session_id, 1, frames))
        await played(tap, turn=1, frames=41)
        (victim,) = [p for p in stack.of("egress") if p.replica == owners["egress"].replica]
        stack.kill(victim, signal.SIGKILL)
        killed_at = len(media_out(tap, 1))
        (stopped,) = await tap.wait(ev.PlayoutStopped, timeout=20)
    indices = [i for i, _ in media_out(tap, 1)]
    assert set(indices) == set(range(frames))
    replayed = len(indices) - frames
    # frames played after the last checkpoint (0.1 s = 5 frames) play again, nothing more
    assert 0 <= replayed <= 10, f"{replayed} frames played twice"
    assert indices[:killed_at] == list(range(killed_at))
    assert len(tap.of(ev.PlayoutStarted)) == 1  # the successor continued the reply, it did not restart it
    assert stopped.completed and stopped.played_ms == frames * 20
    assert stopped.heard_text == " ".join([FULL_TEXT] * 3)


async def test_bad_input_is_reported_and_the_session_goes_on(stack: Stack, bus: Bus, session_id: str) -> None:
    await start_egress(stack)
    async with Tap(bus, session_id) as tap:
        # a sink this egress does not serve yet: reported, and the call is played to the bus instead
        spec = ev.SessionSpec(session=session_id, output_rate=24000, sink="livekit")
        await open_session(bus, spec, stages=("egress",))
        (unsupported,) = await tap.wait(ev.ErrorEvent)
        assert unsupported.code == "internal" and "livekit" in unsupported.message
        await bus.nc.publish(sj.AUDIO_OUT.subject(session_id), b"\xc1 not msgpack")
        wrong_rate = ev.AgentAudio(
            session=session_id, turn=1, index=0, chunk=0, pcm=b"\0" * ev.frame_bytes(16000), sample_rate=16000
        )
        await bus.publish(sj.AUDIO_OUT, wrong_rate)
        # audio that is not whole frames, or more frames than one event may carry
        for frames in (2.5, 11):
            broken = {"session": session_id, "turn": 1, "index": 0, "chunk": 0, "sample_rate": RATE}
            payload = {"type": "AgentAudio", **broken, "pcm": bytes(int(frames * FRAME))}
            await bus.nc.publish(sj.AUDIO_OUT.subject(session_id), codec.encode(payload))
        errors = await tap.wait(ev.ErrorEvent, lambda e: e.code == "malformed", count=4)
        (refused,) = [e for e in errors if "this session plays" in e.message]
        assert {e.stage for e in errors} == {"egress"} and refused.turn == 1
        assert any("is not whole 20 ms frames" in e.message for e in errors)
        assert any("11 frames exceeds 10 per event" in e.message for e in errors)
        await send_reply(bus, reply(session_id, 2, 10))
        (stopped,) = await tap.wait(ev.PlayoutStopped)
    assert stopped.turn == 2 and stopped.completed and stopped.played_ms == 200
    assert media_out(tap, 1) == []
    assert [i for i, _ in media_out(tap, 2)] == list(range(10))


async def test_interrupt_stops_the_reply_and_later_generations_of_its_turn(
    stack: Stack, bus: Bus, session_id: str
) -> None:
    await start_egress(stack)
    await open_session(bus, ev.SessionSpec(session=session_id), stages=("egress",))
    async with Tap(bus, session_id) as tap:
        await send_reply(bus, reply(session_id, 1, 60))
        await played(tap, turn=1, frames=5)
        interrupt = await bus.publish(sj.CONTROL, ev.Interrupt(session=session_id, turn=1))
        (ack,) = await tap.wait(ev.ControlAck, lambda a: a.stage == "egress")
        (stopped,) = await tap.wait(ev.PlayoutStopped)
        await send_reply(bus, reply(session_id, 1, 10, generation=1))  # too late: the caller barged in
        await send_reply(bus, reply(session_id, 2, 10))
        await tap.wait(ev.PlayoutStopped, lambda s: s.turn == 2)
    assert (ack.acked, ack.turn, ack.acked_seq) == ("Interrupt", 1, interrupt.seq)
    assert ack.played_ms == stopped.played_ms
    assert not stopped.completed and 5 * 20 <= stopped.played_ms < 60 * 20
    assert len(media_out(tap, 1)) == stopped.played_ms // 20  # generation 1 never played
    assert [i for i, _ in media_out(tap, 2)] == list(range(10))


async def test_a_handover_mid_reply_continues_the_reply_and_both_wav_files(
    stack: Stack, bus: Bus, session_id: str, tmp_path: Path
) -> None:
    await start_egress(stack, 2, VB_DRAIN_TIMEOUT="0")
    spec = wav_session(session_id, tmp_path)
    owners = await open_session(bus, spec, stages=("egress",))
    loud = {*range(10, 25), *range(130, 145)}  # the caller speaks before and after the handover
    async with Tap(bus, session_id) as tap:
        speaking = asyncio.create_task(speak(bus, session_id, 160, loud, t0_ns := time.time_ns()))
        try:
            await tap.wait_frames(lambda f: f.index == 30)
            await send_reply(bus, reply(session_id, 1, 100))  # 2 s: the handover falls in the middle
            await tap.wait(ev.PlayoutStarted)
            (victim,) = [p for p in stack.of("egress") if p.replica == owners["egress"].replica]
            assert await asyncio.to_thread(stack.kill, victim, signal.SIGTERM) == 0
            (stopped,) = await tap.wait(ev.PlayoutStopped, timeout=15)
            await speaking
        finally:
            speaking.cancel()
        await end_session(bus, session_id)
        (ack,) = await tap.wait(ev.ControlAck, lambda a: a.acked == "SessionEnded" and a.stage == "egress")
    assert ack.replica != victim.replica  # the successor finished the call
    assert stopped.completed and stopped.played_ms == 2000
    assert len(tap.of(ev.PlayoutStarted)) == 1
    rec, _ = read_wav(Path(spec.recording_path), channels=2)
    agent, _ = read_wav(Path(spec.sink_uri), channels=1)
    # a graceful handover plays nothing twice and loses nothing: 100 frames of the agent in both files,
    # in (at least) two stretches: before and after the handover
    assert np.count_nonzero(rec[:, 1]) == np.count_nonzero(agent[:, 0]) == 100 * FRAME // 2
    assert len(spans(rec[:, 1])) >= 2

    # the caller's speech from before the handover (written by the first replica) and after it, each
    # where it was heard
    def at(i: int) -> int:
        return round((t0_ns + i * 20_000_000 - spec.opened_ts) / 1e9 * RATE)

    found = spans(rec[:, 0])
    assert len(found) == 2, found
    for (start, end), (first, last) in zip(found, [(10, 25), (130, 145)]):
        assert abs(start - at(first)) <= 0.005 * RATE and abs(end - at(last)) <= 0.005 * RATE, found


async def test_the_playout_span_continues_the_trace_of_the_replys_first_frame(
    stack: Stack, bus: Bus, session_id: str, tmp_path: Path
) -> None:
    trace_file = tmp_path / "traces.jsonl"
    await start_egress(stack, VB_TRACE_EXPORTER="file", VB_TRACE_FILE=str(trace_file))
    await open_session(bus, ev.SessionSpec(session=session_id), stages=("egress",))
    from opentelemetry.sdk.trace import TracerProvider

    frames = reply(session_id, 1, 5)
    with TracerProvider().get_tracer("test").start_as_current_span("tts.reply") as parent:
        await bus.publish(sj.AUDIO_OUT, *pack(frames[:1]))  # the current span rides in the headers
        parent_ctx = parent.get_span_context()
    async with Tap(bus, session_id) as tap:
        await send_reply(bus, [*frames[1:], frames[0]])  # frame 0 again (without a trace): a duplicate
        await tap.wait(ev.PlayoutStopped)
    stack.stop()  # the replica flushes its spans on exit
    spans_out = [json.loads(line) for line in trace_file.read_text().splitlines()]
    (playout,) = [s for s in spans_out if s["name"] == "egress.playout"]
    assert playout["context"]["trace_id"] == f"0x{parent_ctx.trace_id:032x}"
    assert playout["parent_id"] == f"0x{parent_ctx.span_id:016x}"
    assert playout["attributes"]["completed"] is True and playout["attributes"]["played_ms"] == 100
