"""The `turn` scenario of shared/bench/SCENARIO.md, and the same loop on the local engines.

`turn`: the five services and NATS, each its own process, with the fixed-latency `bench` engines
(STT final 100 ms after end of speech, LLM first token 200 ms, TTS first frame 80 ms), a virtual
caller speaking the 1.5 s utterance turn after turn. Everything beyond the 580 ms the fakes and the
VAD's 200 ms silence account for is the framework's own cost ("overhead").
`local`: the demo's offline engines (Silero, Whisper tiny.en, SmolLM2, Piper), same loop: the TTFA a
new user sees on this machine.
"""

from __future__ import annotations

import asyncio
import statistics
import uuid
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from proto import events as ev
from services.runtime.bus import Bus
from services.runtime.config import RuntimeConfig, load
from services.tools.caller import Turn, VirtualCaller, read_wav_16k
from services.tools.stack import NatsServer, Stack

T = TypeVar("T")
UTTERANCE = Path(__file__).resolve().parent.parent / "data" / "speech_1500ms_16k.wav"
FIXED_MS = 200 + 100 + 200 + 80  # VAD silence + STT final + LLM first token + TTS first frame
BENCH_ENV = {
    "VB_STT_ENGINE": "bench",
    "VB_LLM_ENGINE": "bench",
    "VB_TTS_ENGINE": "bench",
    "VB_STT_MIN_DELAY": "0",
    "VB_INGRESS_MIN_SILENCE_MS": "200",
    "VB_LOG_LEVEL": "WARNING",
}


async def converse(url: str, utterances: list[bytes], turns: int, timeout_s: float) -> list[Turn]:
    """One session: a warm-up turn, then ``turns`` measured turns."""
    bus = await Bus.connect(
        load(RuntimeConfig, environ={}, nats_url=url), "edge", f"bench-{uuid.uuid4().hex[:6]}"
    )
    try:
        spec = ev.SessionSpec(session=f"bench-{uuid.uuid4().hex[:10]}")
        async with VirtualCaller(bus, spec) as caller:
            return [
                await caller.converse(utterances[n % len(utterances)], n + 1, timeout_s=timeout_s)
                for n in range(turns + 1)
            ][1:]
    finally:
        await bus.close()


def on_stack(env: dict[str, str], session: Callable[[str], Coroutine[Any, Any, T]]) -> T:
    """A fresh NATS and stack, ``session(nats_url)`` run against it, then everything stopped."""
    nats = NatsServer()
    nats.start()
    stack = Stack(nats_url=nats.url, env=env)
    try:
        stack.start(ev.STAGES, 1, 180.0)
        return asyncio.run(session(nats.url))
    finally:
        stack.stop()
        nats.stop()


def one_run(env: dict[str, str], utterances: list[bytes], turns: int, timeout_s: float) -> list[Turn]:
    """A fresh NATS and stack, one session, then everything stopped."""
    return on_stack(env, lambda url: converse(url, utterances, turns, timeout_s))


def _median(values: list[float]) -> float:
    clean = [v for v in values if not np.isnan(v)]
    return statistics.median(clean) if clean else float("nan")


def summarize(turns: list[Turn], fixed_ms: float | None) -> dict[str, float]:
    """One run's numbers: TTFA (and overhead) p50/p95, the phase split, missed turns."""
    heard = [t for t in turns if not t.missed and not np.isnan(t.ttfa_ms)]
    ttfa = np.array([t.ttfa_ms for t in heard]) if heard else np.array([np.nan])
    out = {
        "ttfa_p50_ms": float(np.percentile(ttfa, 50)),
        "ttfa_p95_ms": float(np.percentile(ttfa, 95)),
        "missed_turns": float(sum(t.missed for t in turns)),
    }
    if fixed_ms is not None:
        out["overhead_p50_ms"] = out["ttfa_p50_ms"] - fixed_ms
        out["overhead_p95_ms"] = out["ttfa_p95_ms"] - fixed_ms
        told = [(t.marks["stt_told"] - t.last_speech_ns) / 1e6 for t in heard if "stt_told" in t.marks]
        out["vad_end_of_speech_extra_ms"] = _median(told) - 200
        post = [
            t.ttfa_ms - (t.marks["stt_told"] - t.last_speech_ns) / 1e6 - (fixed_ms - 200)
            for t in heard
            if "stt_told" in t.marks
        ]
        out["post_vad_cost_ms"] = _median(post)
    from services.tools.turns import PHASES

    for name, a, b in PHASES:
        out[f"phase {name} ms"] = _median([t.phase_ms(a, b) for t in heard])
    return out


def run_turn(runs: int, turns: int = 10) -> list[dict[str, float]]:
    """The SCENARIO `turn` benchmark: ``runs`` sessions of ``turns`` measured turns each."""
    utterance = [read_wav_16k(UTTERANCE)]
    return [summarize(one_run(BENCH_ENV, utterance, turns, 8.0), FIXED_MS) for _ in range(runs)]


def run_local(runs: int, turns: int = 4) -> list[dict[str, float]]:
    """The demo's local engines and caller lines: TTFA a new user sees here."""
    from services.tools.demo import CALLER, caller_turns

    utterances = caller_turns(CALLER)
    env = {"VB_LOG_LEVEL": "WARNING"}
    return [summarize(one_run(env, utterances, turns, 20.0), None) for _ in range(runs)]


UNITS: dict[str, str] = {}
