"""The dialogue stage as its own process on a real nats-server, with the scripted engine: replies
stream in chunks, the history follows what the caller heard, a newer turn cancels a reply, a peer
regenerates a reply cut off by a crash, and bad input is reported while the session goes on."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

import pytest
from nats.aio.msg import Msg
from opentelemetry.sdk.trace import TracerProvider

from proto import events as ev
from proto import subjects as sj
from services.dialogue.config import DialogueConfig
from services.runtime.bus import Bus
from services.runtime.sessions import open_session
from services.tools.stack import Stack
from tests.support.checkpoints import saved_state
from tests.support.tap import Tap

WEATHER = (
    "The weather today is sunny and warm, with a light wind from the west. Tonight will be clear and cool."
)
STORY = (
    "Once upon a time there was a little robot who loved to sing, and it sang every single day. "
    "It had heard {messages} messages."
)
SCRIPT = [
    {"match": "weather", "reply": WEATHER},
    {"match": "remember", "reply": "I have {messages} messages so far."},
    {"match": "story", "reply": STORY},
]


async def start_dialogue(
    stack: Stack, tmp_path: Path, replicas: int = 1, token_ms: int = 0, **settings: str
) -> None:
    script = tmp_path / "script.json"
    script.write_text(json.dumps(SCRIPT))
    env = {"VB_LLM_ENGINE": "scripted", "VB_LLM_SCRIPT": str(script), "VB_LLM_SCRIPT_TOKEN_MS": str(token_ms)}
    await stack.wait_ready_async([stack.spawn("dialogue", env=env | settings) for _ in range(replicas)])


def user_turn(session: str, turn: int, text: str) -> ev.UserTurnEnded:
    return ev.UserTurnEnded(
        session=session,
        turn=turn,
        text=text,
        start_ms=turn * 5000,
        end_ms=turn * 5000 + 1500,
        speech_end_ts=time.time_ns(),
        endpointing_ms=200,
    )


def played(
    session: str, turn: int, heard: str, *, completed: bool = True, generation: int = 0
) -> ev.PlayoutStopped:
    return ev.PlayoutStopped(
        session=session,
        turn=turn,
        generation=generation,
        played_ms=len(heard.split()) * 300,
        heard_text=heard,
        completed=completed,
    )


def chunks_of(tap: Tap, turn: int, generation: int = 0) -> list[ev.ReplyChunk]:
    return tap.of(ev.ReplyChunk, lambda c: c.turn == turn and c.generation == generation)


async def reply_to(tap: Tap, turn: int, generation: int = 0, timeout: float = 15) -> list[ev.ReplyChunk]:
    await tap.wait(
        ev.ReplyChunk, lambda c: (c.turn, c.generation, c.last) == (turn, generation, True), timeout=timeout
    )
    return chunks_of(tap, turn, generation)


def spoken(chunks: list[ev.ReplyChunk]) -> str:
    return " ".join(c.text for c in chunks if c.text)


async def story_started(bus: Bus, tap: Tap, session: str) -> None:
    """Turn 1 asks for the long story; returns once its first chunk is out (the rest still streams)."""
    await bus.publish(sj.TURN, user_turn(session, 1, "Tell me a story"))
    await tap.wait(ev.ReplyChunk, lambda c: c.turn == 1)


async def test_reply_streams_in_chunks_as_soon_as_they_are_speakable(
    stack: Stack, bus: Bus, session_id: str, tmp_path: Path
) -> None:
    token_s = 0.04
    await start_dialogue(stack, tmp_path, token_ms=int(token_s * 1000))
    await open_session(bus, ev.SessionSpec(session=session_id), stages=("dialogue",))
    async with Tap(bus, session_id) as tap:
        await bus.publish(sj.TURN, user_turn(session_id, 1, "How is the weather today?"))
        chunks = await reply_to(tap, 1)
        marks = await tap.wait(ev.TurnMark, lambda m: m.turn == 1 and m.stage == "dialogue", count=3)

    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert [c.last for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert {c.kind for c in chunks} == {"reply"}
    assert spoken(chunks) == WEATHER
    first_words = len(chunks[0].text.split())
    assert 3 <= first_words <= 6, chunks[0].text
    assert all(c.text.endswith((".", "!", "?")) for c in chunks[1:] if c.text)
    # the first chunk went out while the engine still had the rest of the reply to stream
    words_after_first = len(WEATHER.split()) - first_words
    assert (chunks[-1].ts - chunks[0].ts) / 1e9 >= (words_after_first - 1) * token_s
    at = {m.mark: m.at_ns for m in marks}
    assert at["llm_request"] <= at["llm_first_token"] <= at["first_chunk"] <= chunks[0].ts


async def test_the_reply_span_continues_the_turn_trace(
    stack: Stack, bus: Bus, session_id: str, tmp_path: Path
) -> None:
    trace_file = tmp_path / "traces.jsonl"
    script = tmp_path / "script.json"
    script.write_text(json.dumps(SCRIPT))
    env = {"VB_LLM_ENGINE": "scripted", "VB_TRACE_EXPORTER": "file", "VB_TRACE_FILE": str(trace_file)}
    await stack.wait_ready_async([stack.spawn("dialogue", env=env)])
    await open_session(bus, ev.SessionSpec(session=session_id), stages=("dialogue",))
    chunk_headers: list[dict[str, str]] = []

    async def on_chunk(msg: Msg) -> None:
        chunk_headers.append(msg.headers or {})

    sub = await bus.nc.subscribe(sj.REPLY.subject(session_id), cb=on_chunk)
    with TracerProvider().get_tracer("test").start_as_current_span("turn") as turn_span:
        parent = turn_span.get_span_context()
        async with Tap(bus, session_id) as tap:
            await bus.publish(sj.TURN, user_turn(session_id, 1, "Hello"))
            chunks = await reply_to(tap, 1)
    await sub.unsubscribe()
    stack.stop()  # the stage flushes its spans on exit

    spans = [json.loads(line) for line in trace_file.read_text().splitlines()]
    (reply,) = [s for s in spans if s["name"] == "dialogue.reply"]
    trace_id = f"0x{parent.trace_id:032x}"
    assert reply["context"]["trace_id"] == trace_id
    assert reply["parent_id"] == f"0x{parent.span_id:016x}"
    assert reply["attributes"]["turn"] == 1 and reply["attributes"]["chunks"] == len(chunks)
    assert {"llm_ttft_ms", "first_chunk_ms"} <= set(reply["attributes"])
    # every chunk carries the reply span's context, so TTS continues the same trace
    span_id = reply["context"]["span_id"].removeprefix("0x")
    assert {h.get("traceparent", "").split("-")[2] for h in chunk_headers} == {span_id}
    assert len(chunk_headers) == len(chunks)


async def test_history_follows_what_the_caller_heard(
    stack: Stack, bus: Bus, session_id: str, tmp_path: Path
) -> None:
    await start_dialogue(stack, tmp_path)
    greeting = "Hello, thanks for calling the weather line. How can I help?"
    spec = ev.SessionSpec(session=session_id, agent=ev.AgentSpec(greeting=greeting))
    async with Tap(bus, session_id) as tap:  # listening first: the greeting starts with the session
        await open_session(bus, spec, stages=("dialogue",))
        welcome = await reply_to(tap, 0)
        assert {c.kind for c in welcome} == {"greeting"}
        assert spoken(welcome) == greeting
        await bus.publish(sj.PLAYOUT, played(session_id, 0, greeting))

        await bus.publish(sj.TURN, user_turn(session_id, 1, "What is the weather?"))
        await reply_to(tap, 1)
        await bus.publish(sj.PLAYOUT, played(session_id, 1, "The weather today is sunny", completed=False))

        await bus.publish(sj.TURN, user_turn(session_id, 2, "Do you remember what I asked?"))
        second = await reply_to(tap, 2)
        # greeting, turn 1, the part of its reply the caller heard, turn 2
        assert spoken(second) == "I have 4 messages so far."
        await bus.publish(sj.PLAYOUT, played(session_id, 2, "I have 4 messages so far."))
        state = await saved_state(bus, session_id, lambda s: len(s.history) == 5 and s.answered_turn == 2)

    assert [(m.role, m.turn, m.interrupted) for m in state.history] == [
        ("assistant", 0, False),
        ("user", 1, False),
        ("assistant", 1, True),
        ("user", 2, False),
        ("assistant", 2, False),
    ]
    assert state.history[2].text == "The weather today is sunny"
    assert (state.last_turn, state.answered_turn, state.unplayed) == (2, 2, [])


async def test_a_new_turn_cancels_the_reply_still_being_generated(
    stack: Stack, bus: Bus, session_id: str, tmp_path: Path
) -> None:
    await start_dialogue(stack, tmp_path, token_ms=100)
    await open_session(bus, ev.SessionSpec(session=session_id), stages=("dialogue",))
    async with Tap(bus, session_id) as tap:
        await story_started(bus, tap, session_id)
        await bus.publish(sj.TURN, user_turn(session_id, 2, "Actually, how is the weather?"))
        (cancel,) = await tap.wait(ev.Cancel)
        second = await reply_to(tap, 2)
        await bus.publish(sj.PLAYOUT, played(session_id, 1, "", completed=False))
        await bus.publish(sj.PLAYOUT, played(session_id, 2, WEATHER))
        await bus.publish(sj.TURN, user_turn(session_id, 3, "Do you remember?"))
        third = await reply_to(tap, 3)

    assert (cancel.turn, cancel.generation) == (1, 0)
    order = [e for _, e, _ in tap.events if isinstance(e, ev.ReplyChunk | ev.Cancel)]
    at_cancel = order.index(cancel)
    assert not [e for e in order[at_cancel:] if isinstance(e, ev.ReplyChunk) and e.turn == 1]
    assert order.index(second[0]) > at_cancel
    assert not any(c.last for c in chunks_of(tap, 1))
    assert spoken(second) == WEATHER
    # nothing of the story was heard: the first two caller turns are one message
    assert spoken(third) == "I have 3 messages so far."
    assert not tap.of(ev.ControlAck)  # its own Cancel needs no acknowledgement


async def test_a_peer_regenerates_a_reply_cut_off_by_a_crash(
    stack: Stack, bus: Bus, session_id: str, tmp_path: Path
) -> None:
    await start_dialogue(stack, tmp_path, replicas=2, token_ms=150)
    owners = await open_session(bus, ev.SessionSpec(session=session_id), stages=("dialogue",))
    async with Tap(bus, session_id) as tap:
        await bus.publish(sj.TURN, user_turn(session_id, 1, "Hello"))
        first = await reply_to(tap, 1)
        await bus.publish(sj.PLAYOUT, played(session_id, 1, spoken(first)))
        await bus.publish(sj.TURN, user_turn(session_id, 2, "Tell me a story"))
        await tap.wait(ev.ReplyChunk, lambda c: c.turn == 2)
        (owner,) = [p for p in stack.of("dialogue") if p.replica == owners["dialogue"].replica]
        stack.kill(owner, signal.SIGKILL)
        regenerated = await reply_to(tap, 2, generation=1, timeout=20)
        (cancel,) = await tap.wait(ev.Cancel, lambda c: c.turn == 2)

    assert (cancel.turn, cancel.generation) == (2, 0)
    assert [c.index for c in regenerated] == list(range(len(regenerated)))
    # the successor had the whole history: hello, its answer, the story request
    assert spoken(regenerated) == STORY.format(messages=3)
    assert not any(c.last for c in chunks_of(tap, 2, generation=0))
    assert all(c.seq >> 32 == 2 for c in regenerated)  # published under the successor's claim
    assert len(chunks_of(tap, 1)) == len(first)  # the finished reply was not generated again


async def test_sigterm_lets_the_reply_finish_and_hands_the_conversation_over(
    stack: Stack, bus: Bus, session_id: str, tmp_path: Path
) -> None:
    await start_dialogue(stack, tmp_path, replicas=2, token_ms=60)
    owners = await open_session(bus, ev.SessionSpec(session=session_id), stages=("dialogue",))
    async with Tap(bus, session_id) as tap:
        await story_started(bus, tap, session_id)
        (owner,) = [p for p in stack.of("dialogue") if p.replica == owners["dialogue"].replica]
        assert await asyncio.to_thread(stack.kill, owner, signal.SIGTERM) == 0  # once it has drained
        story = await reply_to(tap, 1)
        await bus.publish(sj.PLAYOUT, played(session_id, 1, spoken(story)))
        await bus.publish(sj.TURN, user_turn(session_id, 2, "Do you remember?"))
        answer = await reply_to(tap, 2)

    assert story[-1].last and spoken(story) == STORY.format(messages=1)
    assert not tap.of(ev.Cancel) and not tap.of(ev.ReplyChunk, lambda c: c.generation > 0)
    assert spoken(answer) == "I have 3 messages so far."
    assert answer[0].seq >> 32 == 2  # answered by the peer


async def test_a_silent_engine_is_given_up_on_with_a_spoken_apology(
    stack: Stack, bus: Bus, session_id: str, tmp_path: Path
) -> None:
    await start_dialogue(stack, tmp_path, token_ms=2000, VB_LLM_FIRST_TOKEN_TIMEOUT="0.2")
    await open_session(bus, ev.SessionSpec(session=session_id), stages=("dialogue",))
    async with Tap(bus, session_id) as tap:
        await bus.publish(sj.TURN, user_turn(session_id, 1, "Hello"))
        apology, closing = await reply_to(tap, 1)
        (error,) = await tap.wait(ev.ErrorEvent)

    assert apology.text == DialogueConfig().failed_line  # not dead air
    assert (closing.index, closing.text, closing.last) == (1, "", True)  # TTS is not left waiting
    assert (error.code, error.turn, error.retryable) == ("provider", 1, True)
    assert "no token for 0.2 s" in error.message


async def test_a_slow_engine_is_covered_by_the_hold_line_and_its_reply_follows(
    stack: Stack, bus: Bus, session_id: str, tmp_path: Path
) -> None:
    await start_dialogue(stack, tmp_path, token_ms=600, VB_DIALOGUE_HOLD_AFTER="0.2")
    await open_session(bus, ev.SessionSpec(session=session_id), stages=("dialogue",))
    async with Tap(bus, session_id) as tap:
        await bus.publish(sj.TURN, user_turn(session_id, 1, "Do you remember?"))
        hold, *reply = await reply_to(tap, 1)

    assert (hold.index, hold.text) == (0, DialogueConfig().hold_line)
    assert spoken(reply) == "I have 1 messages so far."  # the engine was not interrupted by the line


async def test_bad_input_is_reported_and_the_session_goes_on(
    stack: Stack, bus: Bus, session_id: str, tmp_path: Path
) -> None:
    await start_dialogue(stack, tmp_path)
    await open_session(bus, ev.SessionSpec(session=session_id), stages=("dialogue",))
    async with Tap(bus, session_id) as tap:
        await bus.nc.publish(sj.TURN.subject(session_id), b"\xc1 not msgpack")
        await bus.publish(sj.TURN, user_turn(session_id, 1, "   "))
        errors = await tap.wait(ev.ErrorEvent, lambda e: e.stage == "dialogue", count=2)
        await bus.publish(sj.TURN, user_turn(session_id, 2, "Hello there"))
        reply = await reply_to(tap, 2)

    assert sorted((e.code, e.turn) for e in errors) == [("malformed", -1), ("malformed", 1)]
    assert all(e.message for e in errors)
    assert not chunks_of(tap, 1)
    assert spoken(reply) == "You said: Hello there."
    assert all(p.alive for p in stack.of("dialogue"))


@pytest.mark.parametrize("control", ["interrupt", "session_end"])
async def test_control_events_stop_the_reply_and_are_acknowledged(
    stack: Stack, bus: Bus, session_id: str, tmp_path: Path, control: str
) -> None:
    await start_dialogue(stack, tmp_path, token_ms=100)
    await open_session(bus, ev.SessionSpec(session=session_id), stages=("dialogue",))
    async with Tap(bus, session_id) as tap:
        await story_started(bus, tap, session_id)
        stop: ev.Event = (
            ev.Interrupt(session=session_id, turn=1)
            if control == "interrupt"
            else ev.SessionEnded(session=session_id)
        )
        stamped = await bus.publish(sj.CONTROL, stop)
        (ack,) = await tap.wait(ev.ControlAck)
        sent = len(chunks_of(tap, 1))
        if control == "interrupt":  # the session goes on: the next turn is answered
            await bus.publish(sj.TURN, user_turn(session_id, 2, "Hello"))
            await reply_to(tap, 2)

    assert (ack.stage, ack.acked, ack.turn, ack.acked_seq) == (
        "dialogue",
        type(stop).__name__,
        1 if control == "interrupt" else 0,
        stamped.seq,
    )
    assert len(chunks_of(tap, 1)) == sent
    assert not any(c.last for c in chunks_of(tap, 1))
