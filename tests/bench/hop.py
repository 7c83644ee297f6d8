"""The bus hop budget: one message (a UserAudio of one 20 ms frame, 640 bytes of PCM) from publish in
one process to decoded in another, as a stage receives it (JetStream ordered consumer on the recorded
stream), and for comparison over a plain core-NATS subscription; plus how many messages a second one
process sustains (the ingress sends up to 5 frames per message).
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import time
from typing import Any

import numpy as np

from proto import codec
from proto import events as ev
from proto import subjects as sj
from services.runtime.bus import Bus, Delivery
from services.runtime.config import RuntimeConfig, load

FRAMES = 3000
INTERVAL_S = 0.002  # 500 frames/s: a loaded link, but below saturation so latency is not queueing


def _config(url: str) -> RuntimeConfig:
    return load(RuntimeConfig, environ={}, nats_url=url)


async def _receive(url: str, session: str, mode: str, count: int, ready: Any, out: Any) -> None:
    bus = await Bus.connect(_config(url), "stt", f"bench-{mode}")
    latencies: list[float] = []
    done = asyncio.Event()

    def record(event: ev.Event) -> None:
        latencies.append((time.time_ns() - event.ts) / 1000)
        if len(latencies) >= count:
            done.set()

    async def on_event(event: ev.Event, _: Delivery) -> None:
        record(event)

    async def on_core(msg: Any) -> None:
        record(codec.decode(msg.subject, msg.data))

    if mode == "jetstream":
        sub = await bus.follow([sj.AUDIO_IN.subject(session)], 0, on_event)
    else:
        sub = await bus.nc.subscribe(sj.AUDIO_IN.subject(session), cb=on_core)
    ready.set()
    cpu0 = time.process_time()
    await done.wait()
    cpu = time.process_time() - cpu0
    await sub.unsubscribe()
    await bus.close()
    out.put({"latencies": latencies, "cpu_per_msg_us": cpu / count * 1e6})


def _receiver(url: str, session: str, mode: str, count: int, ready: Any, out: Any) -> None:
    asyncio.run(_receive(url, session, mode, count, ready, out))


async def _publish(url: str, session: str, count: int, interval: float) -> float:
    bus = await Bus.connect(_config(url), "ingress", "bench-pub")
    t0 = time.perf_counter()
    for i in range(count):
        frame = ev.UserAudio(session=session, index=i, pcm=b"\x01\x00" * 320, speech_probs=(0.0,))
        await bus.publish(sj.AUDIO_IN, frame)
        if interval:
            await asyncio.sleep(max(0.0, t0 + (i + 1) * interval - time.perf_counter()))
    await bus.nc.flush()
    elapsed = time.perf_counter() - t0
    await bus.close()
    return count / elapsed


def hop(url: str, mode: str, session: str) -> dict[str, float]:
    """Latency of one hop, publisher and subscriber in separate processes."""
    ctx = mp.get_context("spawn")
    ready, out = ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=_receiver, args=(url, session, mode, FRAMES, ready, out))
    proc.start()
    ready.wait(30)
    asyncio.run(_publish(url, session, FRAMES, INTERVAL_S))
    result = out.get(timeout=60)
    proc.join(10)
    lat = np.array(result["latencies"][100:])  # drop warm-up
    return {
        f"{mode}_p50_us": float(np.percentile(lat, 50)),
        f"{mode}_p99_us": float(np.percentile(lat, 99)),
        f"{mode}_receive_cpu_us": result["cpu_per_msg_us"],
    }


def throughput(url: str, session: str) -> dict[str, float]:
    """Frames a second one process publishes, and one stage process receives and decodes."""
    ctx = mp.get_context("spawn")
    count = 20_000
    ready, out = ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=_receiver, args=(url, session, "jetstream", count, ready, out))
    proc.start()
    ready.wait(30)
    t0 = time.perf_counter()
    publish_rate = asyncio.run(_publish(url, session, count, 0.0))
    out.get(timeout=120)
    receive_rate = count / (time.perf_counter() - t0)
    proc.join(10)
    return {"publish_msgs_per_s": publish_rate, "receive_msgs_per_s": receive_rate}


def run_once(url: str, index: int) -> dict[str, float]:
    """One run of every hop measurement."""
    result: dict[str, float] = {}
    for mode in ("jetstream", "core"):
        result |= hop(url, mode, f"benchhop{mode}{index}")
    result |= throughput(url, f"benchtput{index}")
    return result


UNITS = {
    k: "us"
    for k in (
        "jetstream_p50_us",
        "jetstream_p99_us",
        "core_p50_us",
        "core_p99_us",
        "jetstream_receive_cpu_us",
        "core_receive_cpu_us",
    )
} | {"publish_msgs_per_s": "msg/s", "receive_msgs_per_s": "msg/s"}
