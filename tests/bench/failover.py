"""Failover: a call goes on while a replica of a stage is SIGKILLed, or NATS restarts, mid-call.

Shared by the chaos tests (which assert that no turn is lost and the history is intact) and by
``python -m tests.bench failover`` (which reports the gap the caller hears). The system runs with two
replicas of every stage as processes, the bench STT and TTS and the scripted LLM streaming its reply a
word every ``TOKEN_MS``, so that a reply is still being generated when the dialogue replica dies.

The fault hits turn 2 of three at the moment that matters for the stage: ingress and stt in the middle
of the caller's utterance (the audio not yet transcribed must come back from the recording on the
bus), dialogue in the middle of generating the reply (it must be regenerated), tts, egress and NATS
in the middle of the reply's playout. The gap is the silence the caller hears beyond a normal turn.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import signal
import statistics
import tempfile
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from proto import codec
from proto import events as ev
from proto import subjects as sj
from proto.state import DialogueMessage
from proto.system import OwnerRecord
from services.runtime.bus import Bus
from services.runtime.config import RuntimeConfig, load
from services.tools.caller import ALIGN_FRAMES, Turn, VirtualCaller, read_wav_16k
from services.tools.stack import NatsServer, Stack
from tests.support.checkpoints import saved_state

UTTERANCE = Path(__file__).resolve().parent.parent / "data" / "speech_1500ms_16k.wav"
SPOKEN = "what is the weather like today"
TOKEN_MS = 40
#: The reply names how many messages the LLM was given: a successor that lost the history says less.
REPLY = "This is reply {messages}. The weather today is sunny and warm with light wind."
FAULTS = ("ingress", "stt", "dialogue", "tts", "egress", "nats")
TURNS = 3
FAULT_TURN = 2


def stack_env(work: Path) -> dict[str, str]:
    """Settings of the failover system: fixed-latency engines, a reply that takes a while to generate."""
    script = work / "failover-script.json"
    script.write_text(json.dumps([{"match": "", "reply": REPLY}]))
    return {
        "VB_STT_ENGINE": "bench",
        "VB_STT_MIN_DELAY": "0",
        "VB_TTS_ENGINE": "bench",
        "VB_LLM_ENGINE": "scripted",
        "VB_LLM_SCRIPT": str(script),
        "VB_LLM_SCRIPT_TOKEN_MS": str(TOKEN_MS),
        "VB_INGRESS_MIN_SILENCE_MS": "200",
        "VB_LEASE_TTL": "1.0",
        "VB_HEARTBEAT": "0.25",
        "VB_DRAIN_TIMEOUT": "10",
    }


def words(text: str) -> str:
    """Lower-case words only: how transcripts and replies are compared."""
    return " ".join(re.findall(r"[a-z0-9']+", text.lower()))


async def owner_of(bus: Bus, stage: str, session: str) -> OwnerRecord:
    """The stage's owner record of the session."""
    entry = await bus.kv[sj.OWNERS_BUCKET].get(sj.owner_key(stage, session))
    return codec.decode_record(OwnerRecord, entry.value or b"")


async def dialogue_history(bus: Bus, session: str, messages: int) -> list[DialogueMessage]:
    """The conversation as the dialogue stage checkpointed it, once it holds ``messages`` messages."""
    return (await saved_state(bus, session, lambda s: len(s.history) >= messages, timeout_s=10.0)).history


@dataclass
class FaultRun:
    """One call with a fault in turn ``FAULT_TURN``: its turns, the gap heard, the history kept."""

    fault: str
    turns: list[Turn]
    history: list[DialogueMessage]
    gap_ms: float
    new_owner: OwnerRecord | None = None


def _longest_silence_ms(caller: VirtualCaller, turn: int) -> float:
    """Longest pause between two audible frames of the turn's reply, beyond one frame's length."""
    at = sorted(h.at_ns for h in caller.heard if h.turn == turn and h.audible)
    return max(((b - a) / 1e6 - ev.FRAME_MS for a, b in itertools.pairwise(at)), default=0.0)


def gap_ms(caller: VirtualCaller, turns: list[Turn], faulty: int) -> float:
    """Silence the caller heard in turn ``faulty`` beyond the other turns: later first audio, or a pause."""
    normal = [t for t in turns if t.number != faulty]
    hit = next(t for t in turns if t.number == faulty)
    late = hit.ttfa_ms - statistics.median(t.ttfa_ms for t in normal)
    pause = _longest_silence_ms(caller, faulty) - max(_longest_silence_ms(caller, t.number) for t in normal)
    return max(0.0, late, pause)


async def _moment(caller: VirtualCaller, fault: str, fed_before: int) -> None:
    """Wait for the point of turn ``FAULT_TURN`` at which ``fault`` hurts most."""
    if fault in ("ingress", "stt"):  # 40 of the 75 speech frames fed after the lead silence
        await caller.until_frame(fed_before + 25 + ALIGN_FRAMES + 40)
    elif fault == "dialogue":  # the first chunk of the reply is out, the rest is being generated
        await caller.wait_for(lambda: any(e.turn == FAULT_TURN for e in caller.of(ev.ReplyChunk)))
    else:  # the reply is playing
        await caller.wait_for(lambda: any(h.turn == FAULT_TURN and h.audible for h in caller.heard))


async def call_with_fault(
    bus: Bus, fault: str, inject: Callable[[str], Awaitable[None]], *, owner_stage: str | None = None
) -> FaultRun:
    """A call of ``TURNS`` turns with ``inject(session)`` run at the fault's moment of turn 2."""
    utterance = read_wav_16k(UTTERANCE)
    spec = ev.SessionSpec(session=f"chaos-{fault}-{uuid.uuid4().hex[:8]}")
    async with VirtualCaller(bus, spec) as caller:
        turns = [await caller.converse(utterance, 1)]
        fed = caller.frames_fed
        conversing = asyncio.create_task(caller.converse(utterance, FAULT_TURN))
        await _moment(caller, fault, fed)
        await inject(spec.session)
        turns.append(await conversing)
        turns += [await caller.converse(utterance, n) for n in range(FAULT_TURN + 1, TURNS + 1)]
        history = await dialogue_history(bus, spec.session, 2 * TURNS)
        new_owner = await owner_of(bus, owner_stage, spec.session) if owner_stage else None
        gap = gap_ms(caller, turns, FAULT_TURN)
    return FaultRun(fault, turns, history, gap, new_owner)


def kill_fault(stack: Stack, bus: Bus, stage: str) -> Callable[[str], Awaitable[None]]:
    """SIGKILL the replica of ``stage`` that serves the session (``respawn`` puts a fresh one back)."""

    async def inject(session: str) -> None:
        owner = await owner_of(bus, stage, session)
        (victim,) = [p for p in stack.of(stage) if p.replica == owner.replica]
        await asyncio.to_thread(stack.kill, victim, signal.SIGKILL)

    return inject


async def respawn(stack: Stack, stage: str, replicas: int = 2) -> None:
    """Bring ``stage`` back to ``replicas`` running replicas."""
    fresh = [stack.spawn(stage) for _ in range(replicas - len(stack.of(stage)))]
    await stack.wait_ready_async(fresh)


async def _runs(nats: NatsServer, stack: Stack, runs: int) -> list[dict[str, float]]:
    bus = await Bus.connect(load(RuntimeConfig, environ={}, nats_url=nats.url), "edge", "bench-failover")
    results: list[dict[str, float]] = []
    try:
        for _ in range(runs):
            result: dict[str, float] = {}
            for fault in FAULTS:
                if fault == "nats":
                    run = await call_with_fault(bus, fault, _restarter(nats))
                else:
                    run = await call_with_fault(bus, fault, kill_fault(stack, bus, fault))
                    await respawn(stack, fault)
                result[f"gap {fault} ms"] = run.gap_ms
                result["missed turns"] = result.get("missed turns", 0.0) + sum(t.missed for t in run.turns)
            results.append(result)
    finally:
        await bus.close()
    return results


def _restarter(nats: NatsServer) -> Callable[[str], Awaitable[None]]:
    async def restart(session: str) -> None:
        await asyncio.to_thread(nats.kill)
        await asyncio.to_thread(nats.start)

    return restart


def run_failover(runs: int) -> list[dict[str, float]]:
    """``runs`` rounds of every fault against one system of two replicas per stage; the gap of each."""
    nats = NatsServer()
    nats.start()
    with tempfile.TemporaryDirectory(prefix="vb-failover-") as work:
        stack = Stack(nats_url=nats.url, env={**stack_env(Path(work)), "VB_LOG_LEVEL": "WARNING"})
        try:
            stack.start(ev.STAGES, replicas=2, timeout_s=180.0)
            return asyncio.run(_runs(nats, stack, runs))
        finally:
            stack.stop()
            nats.stop()


UNITS: dict[str, str] = {}
NOTE = "Gap per fault over the runs; the dialogue row includes hearing the first sentence again."
