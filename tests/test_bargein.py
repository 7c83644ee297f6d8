"""Barge-in on a real nats-server, with dialogue (scripted LLM), tts (bench engine) and egress as
processes and the caller's side scripted by the test (the VAD's speech events and the STT's
transcripts, as ingress and stt publish them): an interruption stops playout and the history keeps only
what was heard; a noise burst resumes playout where it paused; a backchannel does not interrupt; a
late frame of an interrupted reply is never played; the LLM's connection is closed when interrupted."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from proto import events as ev
from proto import subjects as sj
from services.dialogue.bargein import Backchannels
from services.dialogue.engines.bench import REPLY as BENCH_REPLY
from services.runtime.bus import Bus
from services.runtime.sessions import open_session
from services.tools.caller import VirtualCaller, read_wav_16k
from services.tools.stack import Stack
from tests.bench.turn import BENCH_ENV, UTTERANCE
from tests.fakes.anthropic import FakeAnthropic, Reply
from tests.support.checkpoints import saved_state
from tests.support.tap import Tap
from tests.test_dialogue import WEATHER, chunks_of, reply_to, start_dialogue, user_turn
from tests.test_egress import media_out, played, reply, send_reply, start_egress

STAGES = ("dialogue", "tts", "egress")


def started(session: str, segment: int, start_ms: int) -> ev.SpeechStarted:
    """The VAD's start, 96 ms (5 frames) into the caller's speech, as the ingress publishes it."""
    return ev.SpeechStarted(session=session, segment=segment, start_ms=start_ms, at_frame=start_ms // 20 + 4)


def stopped(session: str, segment: int, start_ms: int, end_ms: int) -> ev.SpeechStopped:
    return ev.SpeechStopped(
        session=session,
        segment=segment,
        start_ms=start_ms,
        end_ms=end_ms,
        at_frame=end_ms // 20 + 10,
        speech_end_ts=time.time_ns(),
    )


def heard(session: str, turn: int, segment: int, text: str, *, final: bool) -> ev.Transcript:
    return ev.Transcript(session=session, turn=turn, segment=segment, text=text, is_final=final)


async def start_stack(stack: Stack, tmp_path: Path, bus: Bus, session: str, **settings: str) -> None:
    """Dialogue, tts and egress; tts at 4x real time, so that the egress holds audio queued ahead."""
    await start_dialogue(stack, tmp_path, **settings)
    await stack.wait_ready_async(
        [
            stack.spawn("tts", env={"VB_TTS_ENGINE": "bench", "VB_TTS_BENCH_SPEED": "4"}),
            stack.spawn("egress", env=settings),
        ]
    )
    await open_session(bus, ev.SessionSpec(session=session), stages=STAGES)


async def reply_playing(bus: Bus, tap: Tap, session: str, frames: int = 15) -> None:
    """Turn 1 asks about the weather; returns once ``frames`` frames of the answer have played."""
    await bus.publish(sj.TURN, user_turn(session, 1, "How is the weather?"))
    await played(tap, turn=1, frames=frames)


async def pause(bus: Bus, tap: Tap, session: str, segment: int = 0) -> ev.PlayoutPaused:
    """The caller starts speaking over the reply; returns the egress's report of the pause."""
    await bus.publish(sj.SPEECH, started(session, segment, 10_000))
    (paused,) = await tap.wait(ev.PlayoutPaused)
    return paused


def played_after(tap: Tap, event: ev.Event, turn: int) -> list[int]:
    """Indices of the frames of ``turn`` that came out of the egress after ``event``."""
    at = next(n for n, (_, e, _) in enumerate(tap.events) if e is event)
    speaker = sj.MEDIA_OUT.subject(tap.session)
    return [
        e.index
        for s, e, _ in tap.events[at:]
        if s == speaker and isinstance(e, ev.AgentAudioFrame) and e.turn == turn
    ]


async def test_an_interruption_stops_playout_and_the_history_keeps_what_was_heard(
    stack: Stack, bus: Bus, session_id: str, tmp_path: Path
) -> None:
    await start_stack(stack, tmp_path, bus, session_id)
    async with Tap(bus, session_id) as tap:
        await reply_playing(bus, tap, session_id)
        paused = await pause(bus, tap, session_id)
        await bus.publish(sj.TRANSCRIPT, heard(session_id, 2, 0, "Wait, what about", final=False))
        (interrupt,) = await tap.wait(ev.Interrupt)
        acks = await tap.wait(ev.ControlAck, lambda a: a.acked == "Interrupt", count=3)
        (stop,) = await tap.wait(ev.PlayoutStopped, lambda s: s.turn == 1)
        await bus.publish(sj.SPEECH, stopped(session_id, 0, 10_000, 11_500))
        await bus.publish(sj.TRANSCRIPT, heard(session_id, 2, 0, "Wait, what about tomorrow?", final=True))
        await bus.publish(sj.TURN, user_turn(session_id, 2, "Wait, do you remember tomorrow?"))
        answer = await reply_to(tap, 2)
        state = await saved_state(bus, session_id, lambda s: s.answered_turn >= 2)

    assert interrupt.turn == 1 and interrupt.reason == "barge_in"
    assert {a.stage for a in acks} == set(STAGES) and {a.acked_seq for a in acks} == {interrupt.seq}
    # the pause stopped the audio: at most the frame already on its way came out after it
    late = played_after(tap, paused, 1)
    assert len(late) <= 1, f"frames {late} played after the pause"
    assert not stop.completed and stop.dropped_frames > 0
    assert len(media_out(tap, 1)) == stop.played_ms // 20
    words = stop.heard_text.split()
    assert 0 < len(words) < len(WEATHER.split()) and words == WEATHER.split()[: len(words)]
    # the history holds what was heard, marked interrupted, and the next reply was asked with it
    (said,) = [m for m in state.history if m.role == "assistant" and m.turn == 1]
    assert (said.text, said.interrupted) == (stop.heard_text, True)
    assert " ".join(c.text for c in answer if c.text) == "I have 3 messages so far."


async def test_a_noise_burst_resumes_playout_where_it_paused(
    stack: Stack, bus: Bus, session_id: str, tmp_path: Path
) -> None:
    await start_stack(stack, tmp_path, bus, session_id, VB_BARGEIN_FALSE_TIMEOUT_MS="300")
    async with Tap(bus, session_id) as tap:
        await reply_playing(bus, tap, session_id)
        paused = await pause(bus, tap, session_id)
        await bus.publish(sj.SPEECH, stopped(session_id, 0, 10_000, 10_200))  # a cough: no words come
        (resume,) = await tap.wait(ev.Resume)
        (resumed,) = await tap.wait(ev.PlayoutResumed)
        (ack,) = await tap.wait(ev.ControlAck, lambda a: a.acked == "Resume")
        (stop,) = await tap.wait(ev.PlayoutStopped, lambda s: s.turn == 1, timeout=20)

    assert (resume.turn, resume.reason) == (1, "no_words") and ack.stage == "egress"
    assert resumed.played_ms == paused.played_ms
    assert not tap.of(ev.Interrupt)
    assert stop.completed and stop.dropped_frames == 0
    out = media_out(tap, 1)
    assert [i for i, _ in out] == list(range(len(out))) and len(out) == stop.played_ms // 20
    # the reply went silent for the pause and picked up at the frame after the last one played
    first_after = next(n for n, (i, _) in enumerate(out) if i >= paused.played_ms // 20)
    gap = out[first_after][1] - out[first_after - 1][1]
    assert gap >= 0.3, f"no pause in playout (largest gap around it {gap:.3f}s)"
    assert stop.heard_text == WEATHER


async def test_a_backchannel_does_not_interrupt(
    stack: Stack, bus: Bus, session_id: str, tmp_path: Path
) -> None:
    await start_stack(stack, tmp_path, bus, session_id)
    async with Tap(bus, session_id) as tap:
        await reply_playing(bus, tap, session_id)
        await pause(bus, tap, session_id)
        await bus.publish(sj.TRANSCRIPT, heard(session_id, 2, 0, "Uh", final=False))
        await bus.publish(sj.SPEECH, stopped(session_id, 0, 10_000, 10_300))
        await bus.publish(sj.TRANSCRIPT, heard(session_id, 2, 0, "Uh huh.", final=True))
        (resume,) = await tap.wait(ev.Resume)
        await bus.publish(sj.TURN, user_turn(session_id, 2, "Uh huh."))
        (stop,) = await tap.wait(ev.PlayoutStopped, lambda s: s.turn == 1, timeout=20)
        await bus.publish(sj.TURN, user_turn(session_id, 3, "Tell me a story"))
        await reply_to(tap, 3)

    assert (resume.turn, resume.reason) == (1, "backchannel")
    assert not tap.of(ev.Interrupt)
    assert stop.completed and stop.heard_text == WEATHER
    assert chunks_of(tap, 2) == []  # the backchannel's turn got no reply; the next turn did


async def test_a_late_frame_of_an_interrupted_reply_is_never_played(
    stack: Stack, bus: Bus, session_id: str
) -> None:
    await start_egress(stack)
    await open_session(bus, ev.SessionSpec(session=session_id), stages=("egress",))
    frames = reply(session_id, 1, 80)
    async with Tap(bus, session_id) as tap:
        await send_reply(bus, frames[:60], end=False)  # the TTS runs ahead: 60 frames queued
        await played(tap, turn=1, frames=10)
        paused = await pause(bus, tap, session_id)
        await bus.publish(sj.CONTROL, ev.Interrupt(session=session_id, turn=1))
        (stop,) = await tap.wait(ev.PlayoutStopped)
        await send_reply(bus, frames[60:])  # the rest of the reply comes after the interruption
        await send_reply(bus, reply(session_id, 2, 10))
        await tap.wait(ev.PlayoutStopped, lambda s: s.turn == 2)

    out = media_out(tap, 1)
    assert [i for i, _ in out] == list(range(len(out)))
    assert len(out) == stop.played_ms // 20 and len(out) <= paused.played_ms // 20 + 1
    assert stop.dropped_frames == 60 - len(out)
    assert [i for i, _ in media_out(tap, 2)] == list(range(10))
    marks = {m.mark for m in tap.of(ev.TurnMark, lambda m: m.turn == 1)}
    assert {"barge_in_speech", "barge_in_paused", "barge_in_stopped"} <= marks


async def test_a_reply_that_comes_while_the_caller_speaks_waits_for_the_decision(
    stack: Stack, bus: Bus, session_id: str
) -> None:
    await start_egress(stack)
    await open_session(bus, ev.SessionSpec(session=session_id), stages=("egress",))
    async with Tap(bus, session_id) as tap:
        await bus.publish(sj.SPEECH, started(session_id, 0, 10_000))
        await send_reply(bus, reply(session_id, 1, 20))
        (paused,) = await tap.wait(ev.PlayoutPaused)
        held = len(media_out(tap, 1))
        await bus.publish(sj.SPEECH, stopped(session_id, 0, 10_000, 10_300))
        await bus.publish(sj.CONTROL, ev.Resume(session=session_id, turn=1))
        (stop,) = await tap.wait(ev.PlayoutStopped)

    assert (paused.turn, paused.played_ms, held) == (1, 0, 0)
    assert stop.completed and [i for i, _ in media_out(tap, 1)] == list(range(20))
    assert not tap.of(ev.TurnMark, lambda m: m.mark.startswith("barge_in"))  # nothing had played yet


async def test_an_interruption_closes_the_llm_stream_at_the_provider(
    stack: Stack, bus: Bus, session_id: str
) -> None:
    async with FakeAnthropic(token_gap_s=0.05) as fake:
        fake.queue(Reply(text=" ".join(f"word{i}." for i in range(300))))
        env = {
            "VB_LLM_ENGINE": "anthropic",
            "ANTHROPIC_API_KEY": "sk-ant-fake-key",
            "VB_ANTHROPIC_BASE_URL": fake.base_url,
            "VB_BARGEIN_ACK_TIMEOUT_MS": "300",
        }
        await stack.wait_ready_async([stack.spawn("dialogue", env=env)])
        await open_session(bus, ev.SessionSpec(session=session_id), stages=("dialogue",))
        async with Tap(bus, session_id) as tap:
            await bus.publish(sj.TURN, user_turn(session_id, 1, "Read me something long"))
            await tap.wait(ev.ReplyChunk, lambda c: c.turn == 1)
            # the egress's side: the reply plays, the caller speaks over it, playout pauses
            await bus.publish(sj.PLAYOUT, ev.PlayoutStarted(session=session_id, turn=1))
            await bus.publish(sj.SPEECH, started(session_id, 0, 10_000))
            await bus.publish(sj.PLAYOUT, ev.PlayoutPaused(session=session_id, turn=1, played_ms=400))
            await bus.publish(sj.TRANSCRIPT, heard(session_id, 2, 0, "Stop please", final=False))
            (interrupt,) = await tap.wait(ev.Interrupt)
            (exchange,) = fake.exchanges
            await exchange.done.wait()
            # tts and egress are not running here: their acks are missed, and reported as such
            missed = await tap.wait(ev.ErrorEvent, lambda e: e.code == "ack_timeout", count=2)
        assert exchange.client_closed
        assert exchange.sent.count("content_block_delta") < 300  # generation stopped early
        assert [a.stage for a in tap.of(ev.ControlAck)] == ["dialogue"]
        assert sorted(e.message.split()[0] for e in missed) == ["egress", "tts"]
        assert all(e.turn == interrupt.turn == 1 for e in missed)


async def test_speech_that_goes_on_interrupts_before_any_words_and_a_missed_ack_is_reported(
    stack: Stack, bus: Bus, session_id: str, tmp_path: Path
) -> None:
    await start_dialogue(stack, tmp_path, VB_BARGEIN_MIN_SPEECH_MS="200", VB_BARGEIN_ACK_TIMEOUT_MS="300")
    await open_session(bus, ev.SessionSpec(session=session_id), stages=("dialogue",))
    async with Tap(bus, session_id) as tap:
        await bus.publish(sj.TURN, user_turn(session_id, 1, "How is the weather?"))
        await reply_to(tap, 1)
        # the egress's side: the reply plays, the caller speaks over it (no words yet), playout pauses
        await bus.publish(sj.PLAYOUT, ev.PlayoutStarted(session=session_id, turn=1))
        speech = await bus.publish(sj.SPEECH, started(session_id, 0, 10_000))
        await bus.publish(sj.PLAYOUT, ev.PlayoutPaused(session=session_id, turn=1, played_ms=400))
        (interrupt,) = await tap.wait(ev.Interrupt)
        missed = await tap.wait(ev.ErrorEvent, lambda e: e.code == "ack_timeout", count=2)

    assert interrupt.turn == 1
    assert (interrupt.ts - speech.ts) / 1e6 >= 200  # the speech had to last VB_BARGEIN_MIN_SPEECH_MS
    assert not tap.of(ev.Transcript)
    assert sorted(e.message.split()[0] for e in missed) == ["egress", "tts"]


async def test_the_caller_cuts_the_agent_off_through_all_five_stages(
    stack: Stack, bus: Bus, session_id: str
) -> None:
    """The recorded utterance, said again over the reply: the real VAD pauses the egress, the speech's
    length interrupts (the bench STT has no words before the end of speech), the barge-in is answered."""
    env = BENCH_ENV | {"VB_TTS_BENCH_SPEED": "4"}
    await stack.wait_ready_async([stack.spawn(stage, env=env) for stage in ev.STAGES])
    pcm = read_wav_16k(UTTERANCE)
    async with VirtualCaller(bus, ev.SessionSpec(session=session_id)) as caller:
        said = await caller.say(pcm)
        assert await caller.until(lambda: sum(h.audible and h.at_ns > said for h in caller.heard) >= 15)
        await caller.say(pcm, lead_silence_s=0.0)
        assert await caller.settle(2)
        events, arrived = list(caller.events), list(caller.arrived_ns)

    (interrupt,) = [e for e in events if isinstance(e, ev.Interrupt)]
    assert interrupt.turn == 1
    paused_at = next(t for e, t in zip(events, arrived, strict=True) if isinstance(e, ev.PlayoutPaused))
    assert not [h for h in caller.heard if h.turn == 1 and h.at_ns > paused_at]
    stops = {e.turn: e for e in events if isinstance(e, ev.PlayoutStopped)}
    assert not stops[1].completed and stops[1].dropped_frames > 0
    words = stops[1].heard_text.split()
    assert 0 < len(words) < len(BENCH_REPLY.split()) and words == BENCH_REPLY.split()[: len(words)]
    assert {a.stage for a in events if isinstance(a, ev.ControlAck) and a.acked == "Interrupt"} == set(STAGES)
    assert stops[2].completed and stops[2].heard_text == BENCH_REPLY


@pytest.mark.parametrize(
    ("text", "kind", "words"),
    [
        ("", "none", 0),
        ("  ...  ", "none", 0),
        ("Uh-huh.", "backchannel", 0),
        ("uh huh", "backchannel", 0),
        ("Yeah, yeah. Okay, right", "backchannel", 0),
        ("Mm-hmm", "backchannel", 0),
        ("Yeah, but what about Tuesday?", "words", 4),
        ("Stop", "words", 1),
        ("rightly so", "words", 2),
        ("Uh", "words", 1),
    ],
)
def test_backchannels_are_told_from_words(text: str, kind: str, words: int) -> None:
    backchannels = Backchannels.of(("yeah", "uh-huh", "okay", "right", "mm-hmm"))
    assert backchannels.classify(text) == (kind, words)


@pytest.mark.parametrize(
    ("text", "kind"), [("Uh", "backchannel"), ("yeah o", "backchannel"), ("Uh wait", "words")]
)
def test_a_partial_transcript_on_its_way_to_a_backchannel_is_not_words_yet(text: str, kind: str) -> None:
    backchannels = Backchannels.of(("yeah", "uh-huh", "okay"))
    assert backchannels.classify(text, final=False)[0] == kind
