"""The shared runtime on a real nats-server, with stage processes: ownership, takeover, drain,
trace propagation across processes, reconnect after a NATS restart, and bad input."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

import pytest
from nats.aio.msg import Msg

from proto import codec
from proto import events as ev
from proto import subjects as sj
from proto.system import OwnerRecord, ReplicaLease
from services.runtime import tracing
from services.runtime.bus import Bus, stream_seq
from services.runtime.sessions import SessionOpenError, open_session
from services.tools.stack import Stack
from tests.conftest import runtime_config
from tests.support.nats import ContainerNats, NatsServer
from tests.support.tap import Tap

PROBE = "tests.support.probe"


def frame(session: str, index: int) -> ev.UserAudio:
    return ev.UserAudio(session=session, index=index, pcm=b"\0" * 640, speech_probs=(0.0,))


async def owner_of(bus: Bus, stage: str, session: str) -> OwnerRecord:
    entry = await bus.kv[sj.OWNERS_BUCKET].get(sj.owner_key(stage, session))
    return codec.decode_record(OwnerRecord, entry.value or b"")


async def start_probes(stack: Stack, count: int, stage: str = "stt", **env: str) -> None:
    procs = [stack.spawn(stage, env=env, module=PROBE) for _ in range(count)]
    await stack.wait_ready_async(procs)


async def test_one_owner_and_takeover_after_sigkill(stack: Stack, bus: Bus, session_id: str) -> None:
    await start_probes(stack, 2)
    owners = await open_session(bus, ev.SessionSpec(session=session_id), stages=("stt",))
    first = owners["stt"].replica
    record = await owner_of(bus, "stt", session_id)
    assert (record.replica, record.epoch) == (first, 1)

    async with Tap(bus, session_id) as tap:
        for i in range(5):
            await bus.publish(sj.AUDIO_IN, frame(session_id, i))
        done = await tap.wait(ev.Transcript, lambda t: t.text == "5")
        assert [t.text for t in tap.of(ev.Transcript)] == ["1", "2", "3", "4", "5"]
        assert done[0].seq >> 32 == 1  # sequence numbers carry the owner's epoch

        (victim,) = [p for p in stack.of("stt") if p.replica == first]
        killed_at = time.monotonic()
        stack.kill(victim, signal.SIGKILL)
        for i in range(5, 8):  # sent while nobody serves the session: kept by the stream
            await bus.publish(sj.AUDIO_IN, frame(session_id, i))
        await tap.wait(ev.Transcript, lambda t: t.text == "8", timeout=10)
        took_s = time.monotonic() - killed_at

    record = await owner_of(bus, "stt", session_id)
    assert record.replica != first and record.replica in {p.replica for p in stack.of("stt")}
    assert record.epoch == 2
    # the successor restored the checkpointed count and read the frames sent during the gap, once each
    assert [t.text for t in tap.of(ev.Transcript)] == [str(n) for n in range(1, 9)]
    assert took_s <= 2.5, f"takeover took {took_s:.2f}s"


async def test_claims_go_to_one_replica_each(stack: Stack, bus: Bus, session_id: str) -> None:
    await start_probes(stack, 2)
    sessions = [f"{session_id}-{i}" for i in range(6)]
    replies = await asyncio.gather(
        *(open_session(bus, ev.SessionSpec(session=s), stages=("stt",)) for s in sessions)
    )
    for s, reply in zip(sessions, replies, strict=True):
        assert (await owner_of(bus, "stt", s)).replica == reply["stt"].replica
    # opening again is idempotent: the same owner answers
    again = await open_session(bus, ev.SessionSpec(session=sessions[0]), stages=("stt",))
    assert again["stt"].replica == replies[0]["stt"].replica


async def test_open_session_fails_clearly_without_replicas(bus: Bus, session_id: str) -> None:
    with pytest.raises(SessionOpenError, match="no tts replica is running"):
        await open_session(bus, ev.SessionSpec(session=session_id), stages=("tts",), timeout_s=1.0)


async def test_sigterm_hands_the_session_over_and_exits_zero(stack: Stack, bus: Bus, session_id: str) -> None:
    await start_probes(stack, 2)
    owners = await open_session(bus, ev.SessionSpec(session=session_id), stages=("stt",))
    first = owners["stt"].replica
    async with Tap(bus, session_id) as tap:
        await bus.publish(sj.AUDIO_IN, frame(session_id, 0))
        await tap.wait(ev.Transcript, lambda t: t.text == "1")
        (victim,) = [p for p in stack.of("stt") if p.replica == first]
        started = time.monotonic()
        assert stack.kill(victim, signal.SIGTERM) == 0
        await bus.publish(sj.AUDIO_IN, frame(session_id, 1))
        await tap.wait(ev.Transcript, lambda t: t.text == "2", timeout=10)
        handed_s = time.monotonic() - started
    record = await owner_of(bus, "stt", session_id)
    assert record.replica not in ("", first)
    # handed over, not waited out: faster than the lease would have lapsed plus the sweep
    assert handed_s < 1.0 + 0.5, f"handover took {handed_s:.2f}s"


async def test_span_in_one_process_parents_a_span_in_another(
    stack: Stack, bus: Bus, session_id: str, tmp_path: Path
) -> None:
    trace_file = tmp_path / "traces.jsonl"
    await start_probes(stack, 1, VB_TRACE_EXPORTER="file", VB_TRACE_FILE=str(trace_file))
    await open_session(bus, ev.SessionSpec(session=session_id), stages=("stt",))
    from opentelemetry.sdk.trace import TracerProvider

    provider = TracerProvider()
    with provider.get_tracer("test").start_as_current_span("caller.frame") as parent:
        headers = tracing.inject()
        await bus.nc.publish(
            sj.AUDIO_IN.subject(session_id), codec.encode(frame(session_id, 0)), headers=headers
        )
        parent_ctx = parent.get_span_context()
    async with Tap(bus, session_id) as tap:
        await tap.wait(ev.Transcript)
    stack.stop()  # the probe flushes its spans on exit
    spans = [json.loads(line) for line in trace_file.read_text().splitlines()]
    (child,) = [s for s in spans if s["name"] == "probe.frame"]
    assert child["context"]["trace_id"] == f"0x{parent_ctx.trace_id:032x}"
    assert child["parent_id"] == f"0x{parent_ctx.span_id:016x}"
    assert child["resource"]["attributes"]["service.name"] == "voicebus-stt"


@pytest.mark.parametrize(
    "reply",
    [
        "$JS.ACK.VB_EVENTS.c1.1.4711.12.1700000000000000000.3",
        "$JS.ACK.hub.ACCHASH.VB_EVENTS.c1.1.4711.12.1700000000000000000.3.tok",  # domain, account
    ],
)
def test_the_stream_sequence_is_read_from_the_ack_subject_as_nats_py_reads_it(reply: str) -> None:
    assert stream_seq(reply) == Msg.Metadata._from_reply(reply).sequence.stream == 4711


async def test_bad_messages_on_every_consumed_subject_are_reported_and_serving_goes_on(
    stack: Stack, bus: Bus, session_id: str
) -> None:
    await start_probes(stack, 1, "stt", PROBE_MEDIA="audio.in")
    await start_probes(stack, 1, "egress", PROBE_MEDIA="audio.out")
    await start_probes(stack, 1, "ingress", PROBE_MEDIA="media.in")
    await open_session(bus, ev.SessionSpec(session=session_id), stages=("stt", "egress", "ingress"))
    bad = {"garbage": b"\xc1\xc1not msgpack", "truncated": codec.encode(frame(session_id, 0))[:40]}
    consumed = [c for c in sj.CHANNELS if c.name not in ("media.out", "error")]
    async with Tap(bus, session_id) as tap:
        for channel in consumed:
            for payload in bad.values():
                await bus.nc.publish(channel.subject(session_id), payload)
            await bus.nc.publish(channel.subject(session_id), b"\0" * (channel.max_bytes + 1))
        # a conversation channel is read by the probes of the stages the contract lists as its
        # consumers (the others' feeds leave it out), each media channel by one probe
        probes = ("stt", "egress", "ingress")
        readers = {c: 1 if c.is_media else sum(p in c.consumers for p in probes) for c in consumed}
        errors = await tap.wait(ev.ErrorEvent, count=3 * sum(readers.values()), timeout=15)
        assert {e.code for e in errors} == {"malformed", "oversized"}
        assert {e.subject for e in errors} == {c.subject(session_id) for c in consumed if readers[c]}
        assert readers[sj.TIMING] == readers[sj.REPLY] == 0  # edge telemetry, the TTS's input
        assert all(e.message for e in errors)
        await bus.publish(sj.AUDIO_IN, frame(session_id, 0))
        await tap.wait(ev.Transcript, lambda t: t.text == "1")
    assert all(p.alive for p in stack.processes)


async def test_services_carry_on_after_nats_restarts(
    stack: Stack, nats_server: NatsServer | ContainerNats, session_id: str
) -> None:
    await start_probes(stack, 1)
    edge = await Bus.connect(runtime_config(nats_server.url), "edge", "restart-test")
    try:
        await open_session(edge, ev.SessionSpec(session=session_id), stages=("stt",))
        async with Tap(edge, session_id) as tap:
            await edge.publish(sj.AUDIO_IN, frame(session_id, 0))
            await tap.wait(ev.Transcript, lambda t: t.text == "1")
            nats_server.kill()
            nats_server.start()
            await asyncio.wait_for(edge.reconnected.wait(), 10)
            await edge.publish(sj.AUDIO_IN, frame(session_id, 1))
            await tap.wait(ev.Transcript, lambda t: t.text == "2", timeout=15)
        assert all(p.alive for p in stack.processes)
        assert (await owner_of(edge, "stt", session_id)).epoch == 1  # same owner, no takeover
    finally:
        await edge.close()


async def test_a_stalled_nats_is_not_taken_for_dead_replicas(
    stack: Stack, nats_server: NatsServer | ContainerNats, bus: Bus, session_id: str
) -> None:
    await start_probes(stack, 2)
    owners = await open_session(bus, ev.SessionSpec(session=session_id), stages=("stt",))
    lease_ttl = float(stack.env["VB_LEASE_TTL"])
    nats_server.freeze()
    try:
        await asyncio.sleep(3 * lease_ttl)  # the stall being simulated: every lease goes stale meanwhile
    finally:
        nats_server.freeze(False)
    resumed = time.time_ns()

    # every replica beats three times after the resume, so each has run its takeover sweep since
    replicas = {p.replica for p in stack.of("stt")}
    beats = dict.fromkeys(replicas, 0)
    watcher = await bus.kv[sj.REPLICAS_BUCKET].watch(sj.replica_key("stt", "*"))
    try:
        while min(beats.values()) < 3:
            entry = await watcher.updates(timeout=10)
            if entry is not None and entry.value:
                lease = codec.decode_record(ReplicaLease, entry.value)
                if lease.replica in beats and lease.beat_ts > resumed:
                    beats[lease.replica] += 1
    finally:
        await watcher.stop()
    record = await owner_of(bus, "stt", session_id)
    assert (record.replica, record.epoch) == (owners["stt"].replica, 1)
