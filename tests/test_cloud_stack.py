"""The whole stack on the three cloud engines (Deepgram, Claude, ElevenLabs) against their fakes.

The golden recordings are replayed through real stage processes whose engines are the cloud adapters,
pointed at the local fakes by URL: the fake Deepgram hears the recorded caller's words, the fake Claude
answers by the golden script, the fake ElevenLabs speaks. The replay must come out as the recording
did with the offline engines (same turns, transcripts and replies). The module's tests share one
stack; the last one searches everything the stages logged and traced for the keys and caller PII.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import pytest

from proto import events as ev
from proto import subjects as sj
from services.dialogue.config import DialogueConfig
from services.runtime.bus import Bus
from services.tools import demo, replay
from services.tools import turns as table
from services.tools.caller import VirtualCaller
from services.tools.stack import Stack
from tests.fakes.anthropic import Reply
from tests.fakes.deepgram import HandshakeFault, Utterance
from tests.fakes.elevenlabs import Faults
from tests.support import golden
from tests.support.cloud import KEYS, CloudFakes
from tests.support.nats import ContainerNats, NatsServer

pytestmark = pytest.mark.slow
RECORDINGS = sorted(golden.DIR.glob("*.vbrec"))
SPEED = 2.0


def recorded(path: Path) -> list[replay.TurnOutcome]:
    return replay.outcomes(replay.events_of(replay.load(path)))


@pytest.fixture(scope="module")
def fakes() -> Iterator[CloudFakes]:
    with CloudFakes([]) as f:
        for rule in json.loads(golden.SCRIPT.read_text())["rules"]:
            f.anthropic.answer(rule["match"], Reply(text=rule["reply"]))
        yield f


@pytest.fixture(scope="module")
def cloud_stack(
    nats_server: NatsServer | ContainerNats, fakes: CloudFakes, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    out = tmp_path_factory.mktemp("cloud")
    env = {
        **fakes.env(),
        # the fault matrix: each fault meets a healthy chain (no breaker opened by the rows before it)
        "VB_LLM_FALLBACK": "scripted",
        "VB_LLM_SCRIPT": str(golden.SCRIPT),
        "VB_TTS_FALLBACK": "flite",
        "VB_LLM_BREAKER_THRESHOLD": "100",
        "VB_TTS_BREAKER_THRESHOLD": "100",
        "VB_ELEVENLABS_WS_RETRY": "0.1",
        "VB_LOG_LEVEL": "DEBUG",  # as much as the stages would ever log, searched for leaks at the end
        "VB_TRACE_EXPORTER": "file",
        "VB_TRACE_FILE": str(out / "traces.jsonl"),
    }
    stack = Stack(nats_url=nats_server.url, env=env, log_dir=out / "logs")
    stack.start()
    yield stack
    stack.stop()


@pytest.mark.parametrize("path", RECORDINGS, ids=lambda p: p.stem)
async def test_a_golden_session_comes_out_the_same_on_the_cloud_engines(
    cloud_stack: Stack, fakes: CloudFakes, bus: Bus, path: Path
) -> None:
    turns = recorded(path)
    fakes.deepgram.script = [Utterance(t.said, word_s=0.08) for t in turns]
    before = len(fakes.anthropic.exchanges)
    result = await replay.replay(bus, replay.load(path), speed=SPEED, settle_s=60)
    assert result.same, replay.report(result)
    # the replies came from Claude (through the SDK, cache breakpoints on), the voice from ElevenLabs
    asked = fakes.anthropic.exchanges[before:]
    assert [e.status for e in asked] == [200] * len(turns)
    assert all(e.body["system"][0]["cache_control"] == {"type": "ephemeral"} for e in asked)
    assert fakes.elevenlabs.seen.finals, "no ElevenLabs context was spoken to the end"


#: what the caller of the interrupt test "says": caller PII that must not reach a log line or a span
CARD, EMAIL, PHONE = "4111 1111 1111 1111", "jane.doe@example.com", "+44 20 7946 0958"
PII_SAID = f"My card is {CARD}, my email {EMAIL} and my phone {PHONE}, tell me a long story."
STORY = " ".join(["Once upon a time, on the terrace of the Blue Door, a dog waited for dinner."] * 6)


async def test_an_interrupt_closes_the_llm_stream_and_the_tts_context_at_the_providers(
    cloud_stack: Stack, fakes: CloudFakes, bus: Bus
) -> None:
    fakes.deepgram.script = [Utterance(PII_SAID, word_s=0.05)]
    # the first attempts fail; the adapters retry within their budgets and the call goes on
    fakes.deepgram.handshake_faults = [HandshakeFault(429, "Too many requests", retry_after=0.1)]
    fakes.anthropic.answer("long story", Reply(text=STORY, token_gap_s=0.15))
    asked, opened = len(fakes.anthropic.exchanges), len(fakes.elevenlabs.seen.opened)
    spec = ev.SessionSpec(session=f"cloud-{uuid.uuid4().hex[:8]}", agent=demo.AGENT)
    async with VirtualCaller(bus, spec) as caller:
        await caller.say(demo.caller_turns(demo.CALLER)[0])
        # the reply is being written (slowly) and spoken: an LLM stream and a TTS context are open
        await fakes.call(fakes.elevenlabs.wait(lambda seen: len(seen.opened) > opened, timeout=30))
        (turn,) = {e.turn for e in caller.of(ev.UserTurnEnded)}
        exchange = fakes.anthropic.exchanges[-1]
        assert len(fakes.anthropic.exchanges) == asked + 1 and not exchange.done.is_set()
        context = fakes.elevenlabs.seen.opened[-1]

        await bus.publish(sj.CONTROL, ev.Interrupt(session=spec.session, turn=turn))

        await fakes.call(asyncio.wait_for(exchange.done.wait(), 10))
        assert exchange.client_closed, "the LLM stream was not closed by the client"
        await fakes.call(fakes.elevenlabs.wait(lambda seen: context in seen.closed))
        assert STORY not in " ".join(text for ctx, text, _ in fakes.elevenlabs.seen.texts if ctx == context)
        await caller.hang_up("completed", wait_for=("dialogue", "tts"))
    assert fakes.deepgram.connections[-2].status == 429  # refused once, then served
    assert CARD.replace(" ", "") in "".join(exchange.body["messages"][-1]["content"][0]["text"].split())


async def test_a_long_call_reads_more_of_its_prompt_from_the_cache_each_turn(
    cloud_stack: Stack, fakes: CloudFakes, bus: Bus
) -> None:
    said = [t.said for path in RECORDINGS for t in recorded(path)]
    fakes.deepgram.script = [Utterance(text, word_s=0.08) for text in said]
    session = f"cloud-{uuid.uuid4().hex[:8]}"
    # instructions of its own: nothing of this call is in the fake's prompt cache yet
    agent = msgspec.structs.replace(demo.AGENT, instructions=f"{demo.AGENT.instructions} Call {session}.")
    spec = ev.SessionSpec(session=session, agent=agent)
    async with VirtualCaller(bus, spec) as caller:
        turns = [
            await caller.converse(pcm, n, timeout_s=20.0)
            for n, pcm in enumerate(demo.caller_turns(demo.CALLER), start=1)
        ]
        await caller.hang_up("completed", wait_for=("dialogue", "tts"))
    assert len(turns) == len(said) and not any(t.missed for t in turns)
    for t in turns:  # every stage's provider billed the turn, and the price table priced it
        assert t.usage["stt_audio_s"] > 0 and t.usage["tts_chars"] > 0 and t.replied, t.usage
        assert t.usage["llm_output_tokens"] > 0 and t.usage["cost_usd"] > 0, t.usage
    shares = [table.cache_read_share(t) for t in turns]
    assert shares == sorted(shares) and shares[-1] > shares[0], shares
    rendered = table.render_usage(turns)
    assert all(f"{share:.0%}" in rendered for share in shares), rendered


async def test_a_tool_call_is_covered_by_its_filler_and_answered_from_the_tools_result(
    cloud_stack: Stack, fakes: CloudFakes, bus: Bus
) -> None:
    # one sentence: the fake hears words faster than they are spoken, and a finished-looking sentence
    # at a pause in the caller's speech would end the turn there
    fakes.deepgram.script = [Utterance("When is my appointment, my name is Sam Patel?", word_s=0.08)]
    answer = "You have a hygienist cleaning on Monday at two."
    fakes.anthropic.queue(
        Reply(text="", tool=("find_appointment", {"name": "Sam Patel"})), Reply(text=answer)
    )
    asked = len(fakes.anthropic.exchanges)
    spec = ev.SessionSpec(session=f"cloud-{uuid.uuid4().hex[:8]}", agent=demo.AGENT)
    async with VirtualCaller(bus, spec) as caller:
        turn = await caller.converse(demo.caller_turns(demo.CALLER)[0], 1, timeout_s=20.0)
        await caller.hang_up("completed", wait_for=("dialogue", "tts"))
    chunks = sorted((c for c in caller.of(ev.ReplyChunk) if c.turn == 1), key=lambda c: c.index)
    assert chunks[0].text == "Let me look that up."  # said the moment the tool call began
    assert " ".join(c.text for c in chunks[1:] if c.text) == answer and answer in turn.replied
    first, follow_up = fakes.anthropic.exchanges[asked:]
    assert [t["name"] for t in first.body["tools"]] == ["current_time", "find_appointment"]
    assert first.body["tools"][-1]["cache_control"] == {"type": "ephemeral"}
    (result,) = [b for b in follow_up.body["messages"][-1]["content"] if b["type"] == "tool_result"]
    assert "hygienist cleaning with Lee Moreno on Monday 9 March 2026" in result["content"]


#: what Claude says in the fault matrix; the fallback (the scripted engine) says the golden reply
CLAUDE = "Certainly, a table for two tonight at the Blue Door."
SAID = "Hello I would like to book a table for two people tonight."
SCRIPTED = "Of course. For how many people, and at what time?"


@dataclass(frozen=True)
class Fault:
    """One row of the fault table in docs/providers.md: what goes wrong, and what the caller gets."""

    claude: tuple[Reply, ...] = ()
    voice: Faults = field(default_factory=Faults)
    #: who answers: claude (retried within the budget, or never failed), fallback (the next engine),
    #: continued (the next engine goes on from what Claude had said)
    answer: str = "claude"
    hold: bool = False  # the hold line covers the wait
    spoken_by: str = "elevenlabs"  # websocket, or http: the same provider by its other path; flite


MATRIX = {
    "llm 429 retry-after": Fault((Reply(status=429, retry_after=0.1), Reply(text=CLAUDE))),
    "llm 529 overloaded": Fault((Reply(status=529), Reply(text=CLAUDE))),
    "llm 500 persists": Fault((Reply(status=500), Reply(status=500)), answer="fallback"),
    "llm 401": Fault((Reply(status=401),), answer="fallback"),
    "llm slow first byte": Fault((Reply(text=CLAUDE, first_byte_delay_s=4),), answer="fallback", hold=True),
    "llm error event mid-stream": Fault((Reply(text=CLAUDE, fault="error"),), answer="continued"),
    "llm tcp drop mid-stream": Fault((Reply(text=CLAUDE, fault="drop"),), answer="continued"),
    "llm silent stall": Fault((Reply(text=CLAUDE, fault="stall"),), answer="continued", hold=True),
    "tts 429 at the handshake": Fault((Reply(text=CLAUDE),), Faults(ws_status=429), spoken_by="http"),
    "tts 401": Fault((Reply(text=CLAUDE),), Faults(ws_status=401, http_status=401), spoken_by="flite"),
    "tts slow first byte": Fault((Reply(text=CLAUDE),), Faults(first_audio_delay_s=4), spoken_by="flite"),
    "tts tcp drop mid-stream": Fault((Reply(text=CLAUDE),), Faults(drop_after_frames=2), spoken_by="flite"),
    "tts silent stall": Fault((Reply(text=CLAUDE),), Faults(stall_after_frames=2), spoken_by="flite"),
}


@pytest.mark.parametrize("name", MATRIX)
async def test_each_provider_fault_ends_in_its_documented_behaviour_without_dead_air(
    cloud_stack: Stack, fakes: CloudFakes, bus: Bus, name: str, record_property: Callable[[str, object], None]
) -> None:
    fault = MATRIX[name]
    fakes.deepgram.script = [Utterance(SAID, word_s=0.08)]
    fakes.anthropic.queue(*fault.claude)
    fakes.elevenlabs.faults = fault.voice
    http_before = len(fakes.elevenlabs.seen.http)
    spec = ev.SessionSpec(session=f"fault-{uuid.uuid4().hex[:8]}", agent=demo.AGENT)
    try:
        async with VirtualCaller(bus, spec) as caller:
            turn = await caller.converse(demo.caller_turns(demo.CALLER)[0], 1, timeout_s=20.0)
            await caller.hang_up("completed", wait_for=("dialogue", "tts"))
    finally:
        fakes.elevenlabs.faults = Faults()
    assert not turn.missed and turn.said == SAID
    chunks = " ".join(c.text for c in sorted(caller.of(ev.ReplyChunk), key=lambda c: c.index) if c.text)
    hold = DialogueConfig().hold_line
    assert chunks.startswith(hold) == fault.hold, chunks
    reply = chunks.removeprefix(hold).strip()
    match fault.answer:
        case "claude":
            assert reply == CLAUDE
        case "fallback":
            assert reply == SCRIPTED
        case "continued":  # Claude's first words went out; the scripted engine answered after them
            assert reply.startswith(" ".join(CLAUDE.split()[:2])) and reply.endswith(SCRIPTED), reply
    assert (len(fakes.elevenlabs.seen.http) > http_before) == (fault.spoken_by == "http")
    voiced = sum(n for ctx, n in fakes.elevenlabs.seen.frames.items() if ctx.startswith(spec.session))
    heard = [h for h in caller.heard if h.audible]
    if fault.spoken_by == "flite":  # ElevenLabs gave no (or not all) audio, yet the reply was heard
        assert heard and voiced * fakes.elevenlabs.chars_per_frame < len(reply), voiced
    else:
        assert heard and (voiced > 0) == (fault.spoken_by == "elevenlabs"), voiced
    # never more than 2 s of silence after the caller's turn: the budgets and the hold line see to it
    silence_ms = turn.phase_ms("end_of_turn", "first_audio_out")
    record_property("silence_ms", round(silence_ms))  # --junitxml collects them (docs/providers.md)
    assert silence_ms <= 2000, f"{silence_ms:.0f} ms of silence after the turn"


def test_no_key_and_no_caller_pii_in_any_log_line_or_span(cloud_stack: Stack) -> None:
    cloud_stack.stop()  # the file exporter has written every span once the stages are gone
    logs = {p.name: p.read_text(errors="replace") for p in cloud_stack.log_dir.glob("*.log")}
    traces = Path(cloud_stack.env["VB_TRACE_FILE"]).read_text()
    assert len(logs) == len(ev.STAGES) and traces.strip()
    assert "[card]" in "".join(logs.values()) + traces, "the PII never reached a log or span: a vacuous test"
    for name, text in {**logs, "traces": traces}.items():
        for secret in (*KEYS, CARD, CARD.replace(" ", ""), EMAIL, PHONE):
            assert secret not in text, f"{secret[:6]}... in {name}"
