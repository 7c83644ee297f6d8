"""The `concurrency` scenario of shared/bench/SCENARIO.md: N sessions at once against the whole system.

NATS and the five services as processes (replicas of the per-frame stages, which is where the load
is), the fixed-latency `bench` engines, and N virtual callers whose starts are staggered over 0-5 s,
each looping the `turn` scenario for 30 s. The callers run in their own driver processes (not counted
as part of the system). CPU is read from /proc for every process of the system, NATS included,
between the first session's start and the last one's end; RSS is sampled each second and the growth
over the idle system is divided by N. A load "holds" with no missed turn and overhead p95 <= 150 ms.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import os
import random
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from nats.errors import Error as NatsError

from proto import events as ev
from services.runtime.bus import Bus
from services.runtime.config import RuntimeConfig, load
from services.runtime.sessions import SessionOpenError
from services.tools.caller import Turn, VirtualCaller, read_wav_16k
from services.tools.stack import NatsServer, Stack
from tests.bench.turn import BENCH_ENV, FIXED_MS, UTTERANCE, summarize

LOADS = (1, 10, 20, 50, 100)
STAGGER_S = 5.0
CALL_S = 30.0
#: Replicas per stage: one each. On two cores more processes cost more CPU than they add in parallelism
#: (N = 30: 2.8 against 3.3 CPU-s per session-minute with two of the other stages; N = 50: 1.73 against
#: 1.90 and overhead p95 85 against 144 ms with one ingress instead of two, whose VAD thread then
#: serves more windows per wake-up).
REPLICAS = {"ingress": 1, "stt": 1, "dialogue": 1, "tts": 1, "egress": 1}
SESSIONS_PER_DRIVER = 20
OVERHEAD_P95_TARGET_MS = 150.0
IDLE_S = 5.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
Call = tuple[list[Turn], float]
PAGE = os.sysconf("SC_PAGE_SIZE")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    """Resident memory of a process."""
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE


async def _session(bus: Bus, start_in: float, utterance: bytes) -> Call | None:
    """One caller: wait its stagger, then loop turns for ``CALL_S``; its turns and its call length."""
    await asyncio.sleep(start_in)
    spec = ev.SessionSpec(session=f"load-{uuid.uuid4().hex[:10]}")
    turns: list[Turn] = []
    began = time.monotonic()
    try:
        async with VirtualCaller(bus, spec) as caller:
            while time.monotonic() - began < CALL_S:
                turns.append(await caller.converse(utterance, len(turns) + 1))
    except (SessionOpenError, NatsError):
        return None  # the system did not take the call, or lost it (overloaded: publishes not acked)
    return turns[1:], time.monotonic() - began  # the first turn is the warm-up


async def _callers(url: str, starts: list[float]) -> list[Call | None]:
    bus = await Bus.connect(load(RuntimeConfig, environ={}, nats_url=url), "edge", f"load-{os.getpid()}")
    utterance = read_wav_16k(UTTERANCE)
    try:
        return await asyncio.gather(*(_session(bus, s, utterance) for s in starts))
    finally:
        await bus.close()


def drive(url: str, starts: list[float]) -> tuple[list[Call | None], float]:
    """A driver process: the callers whose start offsets are ``starts`` (None: a call not taken or lost),
    and the CPU seconds the driver used (the load generator shares the machine with the system)."""
    calls = asyncio.run(_callers(url, starts))
    return calls, time.process_time()


def run_load(sessions: int) -> dict[str, float]:
    """One run at ``sessions`` concurrent sessions on a fresh system."""
    nats = NatsServer()
    nats.start()
    stack = Stack(nats_url=nats.url, env=BENCH_ENV)
    try:
        stack.wait_ready([stack.spawn(stage) for stage in ev.STAGES for _ in range(REPLICAS[stage])], 180.0)
        assert nats.proc is not None
        owners = {nats.proc.pid: "nats", **{p.proc.pid: p.stage for p in stack.processes}}
        pids = list(owners)
        idle_rss = sum(rss_bytes(pid) for pid in pids)
        starts = [random.uniform(0.0, STAGGER_S) for _ in range(sessions)]
        groups = [
            starts[i :: math.ceil(sessions / SESSIONS_PER_DRIVER)]
            for i in range(math.ceil(sessions / SESSIONS_PER_DRIVER))
        ]
        idle_cpu = {pid: cpu_seconds(pid) for pid in pids}
        time.sleep(IDLE_S)  # the idle system's own cost (heartbeats, watches), measured over a while
        cpu_before = {pid: cpu_seconds(pid) for pid in pids}
        idle_rate = sum(cpu_before[pid] - idle_cpu[pid] for pid in pids) / IDLE_S
        peak_rss = idle_rss
        began = time.monotonic()
        with ProcessPoolExecutor(len(groups), mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(drive, nats.url, g) for g in groups]
            while not all(f.done() for f in futures):
                peak_rss = max(peak_rss, sum(rss_bytes(pid) for pid in pids))
                time.sleep(1.0)  # sampling period of the memory reading, not a synchronisation
            results = [call for f in futures for call in f.result()[0]]
            callers_cpu = sum(f.result()[1] for f in futures)
        window = time.monotonic() - began
        cpu = {pid: cpu_seconds(pid) - cpu_before[pid] for pid in pids}
    finally:
        stack.stop()
        nats.stop()
    calls = [call for call in results if call is not None]
    turns = [t for call_turns, _ in calls for t in call_turns]
    session_minutes = sum(length for _, length in calls) / 60 or float("nan")
    numbers = summarize(turns, FIXED_MS)
    result = {
        "overhead_p50_ms": numbers["overhead_p50_ms"],
        "overhead_p95_ms": numbers["overhead_p95_ms"],
        "missed_turns": numbers["missed_turns"],
        "calls_failed": float(len(results) - len(calls)),
        "turns": float(len(turns)),
        "cpu_s_per_session_min": sum(cpu.values()) / session_minutes,
        "idle_system_cpu_cores": idle_rate,
        "cpu_cores_busy": sum(cpu.values()) / window,
        "callers_cpu_cores": callers_cpu / window,
        "rss_mb_per_session": (peak_rss - idle_rss) / sessions / 2**20,
        **{k: v for k, v in numbers.items() if k.startswith("phase ")},  # where a loaded turn waits
    }
    for name in ("nats", *ev.STAGES):
        used = sum(c for pid, c in cpu.items() if owners[pid] == name)
        result[f"cpu_s_per_session_min {name}"] = used / session_minutes
    return result


def held(result: dict[str, float]) -> bool:
    """Every call taken, no missed turn, and overhead p95 within its target."""
    return (
        result["missed_turns"] == 0
        and result["calls_failed"] == 0
        and result["overhead_p95_ms"] <= OVERHEAD_P95_TARGET_MS
    )


def run_concurrency(runs: int, loads: tuple[int, ...] = LOADS) -> list[dict[str, float]]:
    """``runs`` rounds over ``loads``; each round also names the largest load that held."""
    out = []
    for _ in range(runs):
        row: dict[str, float] = {}
        largest = 0
        for n in loads:
            result = run_load(n)
            print(f"N={n}: {result}", flush=True)
            row.update({f"N={n} {k}": v for k, v in result.items()})
            if held(result):
                largest = n
        row["largest N held"] = float(largest)
        out.append(row)
    return out


UNITS: dict[str, str] = {}
