"""Fixtures shared by every test: a real nats-server with JetStream, a bus, stacks of stage processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from nats.js.errors import NoKeysError

from proto import subjects as sj
from services.runtime.bus import Bus
from services.runtime.config import RuntimeConfig, load
from services.runtime.sessions import end_session
from services.tools.stack import Stack
from tests.support.nats import ContainerNats, NatsServer, make_server
from tests.support.netns import NetnsUnavailable, veth_address

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsServer | ContainerNats]:
    """One nats-server (JetStream on) for the test session; tests may kill and restart it."""
    server = make_server()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def veth_host() -> Iterator[str]:
    """An address of a non-loopback interface made for a module's tests (libwebrtc ignores loopback)."""
    try:
        with veth_address() as address:
            yield address
    except NetnsUnavailable as e:
        pytest.skip(str(e))


def runtime_config(url: str, **overrides: object) -> RuntimeConfig:
    """Runtime settings for test processes: the test server, short leases."""
    return load(RuntimeConfig, environ={}, nats_url=url, **overrides)


@pytest.fixture(scope="session")
async def bus(nats_server: NatsServer | ContainerNats) -> AsyncIterator[Bus]:
    """An edge-side bus connection (what a gateway or the virtual caller holds)."""
    connected = await Bus.connect(runtime_config(nats_server.url), "edge", "test")
    yield connected
    await connected.close()


@pytest.fixture
def session_id(request: pytest.FixtureRequest) -> str:
    """A session id unique to the test."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def stack(nats_server: NatsServer | ContainerNats, tmp_path: Path) -> Iterator[Stack]:
    """Stage processes started by the test, stopped (SIGTERM, then SIGKILL) after it."""
    s = Stack(
        nats_url=nats_server.url,
        log_dir=tmp_path / "logs",
        env={"VB_LEASE_TTL": "1.0", "VB_HEARTBEAT": "0.25", "PYTHONPATH": str(ROOT)},
    )
    yield s
    s.stop(timeout_s=15)


#: Clients whose own tasks outlive a test: the NATS client restarts them on reconnect; a LiveKit room's
#: event task ends when the SDK closes its event stream, a moment after the room is disconnected.
_THEIRS = (f"{os.sep}nats{os.sep}", f"{os.sep}livekit{os.sep}rtc{os.sep}")


def _ours(task: asyncio.Task[object]) -> bool:
    """Tasks of the code under test, not those of the clients in ``_THEIRS``."""
    code = getattr(task.get_coro(), "cr_code", None)
    return code is None or not any(part in code.co_filename for part in _THEIRS)


@pytest.fixture(autouse=True)
async def calls_hung_up(bus: Bus) -> AsyncIterator[None]:
    """End every call a test left open, once its processes are gone.

    The test server outlives each test, and a session in the registry whose replicas died is exactly
    what a live replica takes over (that is failover): a later test's replicas would answer an earlier
    test's calls, on its fakes.
    """
    yield
    with contextlib.suppress(NoKeysError):
        for session in await bus.kv[sj.SESSIONS_BUCKET].keys():
            await end_session(bus, session, reason="operator")


@pytest.fixture(autouse=True)
async def no_leftover_tasks() -> AsyncIterator[None]:
    """Fail a test that leaves tasks of its own running."""
    before = asyncio.all_tasks()
    yield
    left = [
        t
        for t in asyncio.all_tasks() - before
        if not t.done() and t is not asyncio.current_task() and _ours(t)
    ]
    for _ in range(20):  # give cancelled tasks a few loop turns to finish
        if not (left := [t for t in left if not t.done()]):
            break
        await asyncio.sleep(0)
    assert not left, f"tasks left running: {[t.get_name() for t in left]}"
