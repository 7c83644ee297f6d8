"""A call ends cleanly when it has gone on too long or nobody has been heard for a while."""

from __future__ import annotations

import time

from proto import events as ev
from proto import subjects as sj
from services.runtime.bus import Bus
from services.runtime.sessions import open_session
from services.tools.stack import Stack
from tests.support.tap import Tap


async def test_a_silent_call_ends_for_inactivity_and_activity_postpones_it(
    stack: Stack, bus: Bus, session_id: str
) -> None:
    await stack.wait_ready_async([stack.spawn("ingress", env={"VB_SESSION_INACTIVITY": "1.5"})])
    async with Tap(bus, session_id) as tap:
        await open_session(bus, ev.SessionSpec(session=session_id), stages=("ingress",))
        # the agent speaks for a while: the call is alive even though the caller says nothing
        playing = ev.PlayoutStarted(session=session_id, turn=0, generation=0)
        await bus.publish(sj.PLAYOUT, playing)
        (ended,) = await tap.wait(ev.SessionEnded, timeout=20)
    assert ended.reason == "inactivity"
    # it came once the last sign of life was 1.5 s old, not 1.5 s after the opening
    (started,) = tap.of(ev.PlayoutStarted)
    assert ended.ts - started.ts >= 1.5e9
    assert not tap.of(ev.ErrorEvent)


async def test_a_call_ends_at_its_maximum_duration_counted_from_its_opening(
    stack: Stack, bus: Bus, session_id: str
) -> None:
    env = {"VB_SESSION_MAX_DURATION": "2", "VB_SESSION_INACTIVITY": "0"}
    await stack.wait_ready_async([stack.spawn("ingress", env=env)])
    opened_ts = time.time_ns()
    spec = ev.SessionSpec(session=session_id, opened_ts=opened_ts)
    async with Tap(bus, session_id) as tap:
        await open_session(bus, spec, stages=("ingress",))
        (ended,) = await tap.wait(ev.SessionEnded, timeout=20)
    assert ended.reason == "max_duration"
    assert ended.ts - opened_ts >= 2e9
