"""The `barge-in` scenario of shared/bench/SCENARIO.md.

The five services and NATS (one process each) with the `bench` engines, as in `turn`. Per trial the
virtual caller says the utterance, waits until the first 300 ms of the reply have played, says it
again over the reply, then stays silent until the reply to the barge-in has played. Everything is
measured from the barge-in's first speech frame fed:

- audible stop: the old reply stops on the virtual speaker (frames scheduled at max(arrival, end of
  the previous frame); a flush signal drops what has not played);
- flush signal: the egress's first report that it stopped the old reply (``PlayoutPaused``, or
  ``PlayoutStopped`` cut), when it reached the caller's side;
- last old frame: the last frame of the old reply that reached the speaker;
- rest dropped: nothing of the old reply played after its audible stop and its playout was cut;
- TTFA of the reply to the barge-in: its first audible frame - the barge-in's last speech frame fed.

Run with the TTS at real time and at 4x (``VB_TTS_BENCH_SPEED``: audio queued ahead at the egress).
"""

from __future__ import annotations

import json
import uuid

import numpy as np

from proto import events as ev
from services.runtime.bus import Bus
from services.runtime.config import RuntimeConfig, load
from services.tools.caller import VirtualCaller, read_wav_16k
from tests.bench import report
from tests.bench.turn import BENCH_ENV, UTTERANCE, on_stack

FRAME_NS = ev.FRAME_MS * 1_000_000
#: Reply audio that plays before the caller barges in (SCENARIO.md: 300 ms).
PLAYED_FIRST = 300 // ev.FRAME_MS
TRIALS = 8  # per run, after one warm-up trial
UNITS = {
    k: "ms"
    for k in (
        "audible_stop_p50_ms",
        "audible_stop_p95_ms",
        "flush_signal_p50_ms",
        "flush_signal_p95_ms",
        "last_old_frame_p50_ms",
        "last_old_frame_p95_ms",
        "reply_ttfa_p50_ms",
        "reply_ttfa_p95_ms",
    )
}


async def trial(caller: VirtualCaller, pcm: bytes, turns: int) -> dict[str, float] | None:
    """One barge-in; ``turns`` caller turns came before. None if the reply or the barge-in went astray."""
    said = await caller.say(pcm)

    def reply_heard() -> list[int]:
        return [h.turn for h in caller.heard if h.at_ns > said and h.audible]

    if not await caller.until(lambda: len(reply_heard()) >= PLAYED_FIRST, timeout_s=8.0):
        return None
    old = reply_heard()[0]
    last_fed = await caller.say(pcm, lead_silence_s=0.0)
    first_fed = last_fed - (len(pcm) // (2 * 320) - 1) * FRAME_NS
    if not await caller.settle(turns + 2, timeout_s=15.0):
        return None
    flush, flush_sent = min(
        (
            (at, e.ts)
            for e, at in zip(caller.events, caller.arrived_ns, strict=True)
            if isinstance(e, ev.PlayoutPaused | ev.PlayoutStopped) and e.turn == old and at > first_fed
        ),
        default=(None, 0),
    )
    cut = [e for e in caller.of(ev.PlayoutStopped) if e.turn == old]
    frames = [h for h in caller.heard if h.turn == old and h.audible]
    # the virtual speaker: each frame starts at max(arrival, end of the one before); the flush signal
    # cuts the frame playing and drops those the egress handed out before it; one handed out after it
    # (the egress's stamps order them: frames and reports reach the caller by separate subscriptions)
    # plays, and means the rest of the old reply was not dropped
    end, audible_end, late = 0, 0, 0
    for h in frames:
        start = max(h.at_ns, end)
        after = flush is not None and h.sent_ns > flush_sent
        if flush is not None and not after and start >= flush:
            continue
        end = start + FRAME_NS if flush is None or after else min(start + FRAME_NS, flush)
        audible_end, late = end, late + after
    stop = max(audible_end, first_fed)
    replies = [h.at_ns for h in caller.heard if h.turn > old and h.audible and h.at_ns > last_fed]
    return {
        "audible_stop_ms": (stop - first_fed) / 1e6,
        "flush_signal_ms": (flush - first_fed) / 1e6 if flush is not None else float("nan"),
        "last_old_frame_ms": (frames[-1].at_ns - first_fed) / 1e6,
        "rest_dropped": float(bool(cut) and not cut[0].completed and not late),
        "reply_ttfa_ms": (replies[0] - last_fed) / 1e6 if replies else float("nan"),
    }


async def session(url: str, pcm: bytes, trials: int) -> list[dict[str, float] | None]:
    """One session: a warm-up trial, then ``trials`` measured ones (two caller turns each)."""
    bus = await Bus.connect(
        load(RuntimeConfig, environ={}, nats_url=url), "edge", f"bench-{uuid.uuid4().hex[:6]}"
    )
    try:
        async with VirtualCaller(bus, ev.SessionSpec(session=f"barge-{uuid.uuid4().hex[:10]}")) as caller:
            return [await trial(caller, pcm, 2 * n) for n in range(trials + 1)][1:]
    finally:
        await bus.close()


def summarize(results: list[dict[str, float] | None]) -> dict[str, float]:
    """One run: percentiles of each measure over its trials; trials that went astray count as missed."""
    done = [r for r in results if r is not None]
    out: dict[str, float] = {"missed_trials": float(len(results) - len(done))}
    for key in ("audible_stop_ms", "flush_signal_ms", "last_old_frame_ms", "reply_ttfa_ms"):
        values = np.array([r[key] for r in done if not np.isnan(r[key])] or [np.nan])
        name = key.removesuffix("_ms")
        out[f"{name}_p50_ms"] = float(np.percentile(values, 50))
        out[f"{name}_p95_ms"] = float(np.percentile(values, 95))
    out["rest_dropped_fraction"] = float(np.mean([r["rest_dropped"] for r in done])) if done else 0.0
    return out


def run_bargein(runs: int, tts_speed: float) -> list[dict[str, float]]:
    """``runs`` fresh stacks, one session of ``TRIALS`` barge-ins each; every trial is kept as well."""
    pcm = read_wav_16k(UTTERANCE)
    env = BENCH_ENV | {"VB_TTS_BENCH_SPEED": str(tts_speed)}
    trials = [on_stack(env, lambda url: session(url, pcm, TRIALS)) for _ in range(runs)]
    report.OUT.mkdir(parents=True, exist_ok=True)
    (report.OUT / f"barge-in-{tts_speed:g}x-trials.json").write_text(json.dumps(trials, indent=1))
    return [summarize(run) for run in trials]
