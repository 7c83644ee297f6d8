"""Chaos: two replicas of every stage as processes; a replica is SIGKILLed mid-call, NATS restarts
mid-call, every replica is restarted one by one during a call. The call must go on each time: every
turn answered in full, the dialogue's history intact, and the caller hears only a short gap (reported).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator

import pytest

from proto import events as ev
from services.runtime.bus import Bus
from services.tools.caller import VirtualCaller, read_wav_16k
from services.tools.stack import Stack
from tests.bench import failover
from tests.bench.failover import FAULT_TURN, SPOKEN, TURNS, FaultRun, words
from tests.conftest import ROOT
from tests.support.nats import ContainerNats, NatsServer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def system(
    nats_server: NatsServer | ContainerNats, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """Two replicas of every stage, shared by the module's calls (a killed replica is replaced)."""
    work = tmp_path_factory.mktemp("chaos")
    stack = Stack(
        nats_url=nats_server.url,
        log_dir=work / "logs",
        env={**failover.stack_env(work), "PYTHONPATH": str(ROOT)},
    )
    stack.start(ev.STAGES, replicas=2, timeout_s=120)
    yield stack
    stack.stop(timeout_s=15)


def assert_call_went_on(run: FaultRun) -> None:
    """Every turn heard in full, transcribed right, and kept in the history in order."""
    assert [t.missed for t in run.turns] == [False] * TURNS
    assert [words(t.said) for t in run.turns] == [SPOKEN] * TURNS
    replies = [words(t.replied) for t in run.turns]
    # the reply names how many messages the LLM got: two more each turn, so no history was lost
    counts = [int(r.split()[3]) for r in replies]
    assert counts == [counts[0] + 2 * i for i in range(TURNS)], replies
    assert all(r.endswith("the weather today is sunny and warm with light wind") for r in replies), replies
    assert [(m.role, m.turn) for m in run.history] == [
        (role, n) for n in range(1, TURNS + 1) for role in ("user", "assistant")
    ]
    assert [words(m.text) for m in run.history if m.role == "assistant"] == replies
    assert not any(m.interrupted for m in run.history)
    print(f"\nfailover gap ({run.fault}): {run.gap_ms:.0f} ms")


@pytest.mark.parametrize("stage", ev.STAGES)
async def test_a_call_survives_sigkill_of_the_replica_serving_it(system: Stack, bus: Bus, stage: str) -> None:
    run = await failover.call_with_fault(
        bus, stage, failover.kill_fault(system, bus, stage), owner_stage=stage
    )
    await failover.respawn(system, stage)
    assert_call_went_on(run)
    assert run.new_owner is not None and run.new_owner.epoch == 2  # a peer took the session over
    assert all(p.alive or p.proc.returncode == -signal.SIGKILL for p in system.processes)  # no crash


async def test_a_call_survives_a_nats_restart(
    system: Stack, bus: Bus, nats_server: NatsServer | ContainerNats
) -> None:
    async def restart(session: str) -> None:
        await asyncio.to_thread(nats_server.kill)
        await asyncio.to_thread(nats_server.start)

    run = await failover.call_with_fault(bus, "nats", restart, owner_stage="dialogue")
    assert_call_went_on(run)
    assert run.new_owner is not None and run.new_owner.epoch == 1  # an outage is not a replica's death
    assert all(p.alive or p.proc.returncode == -signal.SIGKILL for p in system.processes)


async def test_rolling_restart_of_every_replica_loses_no_turn(system: Stack, bus: Bus) -> None:
    utterance = read_wav_16k(failover.UTTERANCE)
    spec = ev.SessionSpec(session="chaos-rolling")
    restarted: list[str] = []

    async def roll() -> None:
        for old in [p for stage in ev.STAGES for p in system.of(stage)]:
            assert await asyncio.to_thread(system.kill, old, signal.SIGTERM) == 0  # drained, handed over
            await system.wait_ready_async([system.spawn(old.stage)])
            restarted.append(old.replica)

    async with VirtualCaller(bus, spec) as caller:
        rolling = asyncio.create_task(roll())
        turns = []
        while not rolling.done() or len(turns) < FAULT_TURN:
            turns.append(await caller.converse(utterance, len(turns) + 1, timeout_s=12.0))
        await rolling
        turns.append(await caller.converse(utterance, len(turns) + 1))
        history = await failover.dialogue_history(bus, spec.session, 2 * len(turns))
    assert len(restarted) == 2 * len(ev.STAGES)
    assert [t.number for t in turns if t.missed] == []
    assert [words(t.said) for t in turns] == [SPOKEN] * len(turns)
    assert all(words(t.replied).endswith("sunny and warm with light wind") for t in turns)
    assert [(m.role, m.turn) for m in history] == [
        (role, n) for n in range(1, len(turns) + 1) for role in ("user", "assistant")
    ]
