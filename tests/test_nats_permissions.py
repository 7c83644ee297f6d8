"""The permissioned NATS configuration: each service may publish only what it produces, and the
runtime still works under it (streams, KV, consumers, claims)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from proto import codec
from proto import events as ev
from proto import subjects as sj
from services.runtime.bus import Bus
from services.runtime.sessions import open_session
from services.tools import natsconf
from services.tools.stack import NatsServer, Stack, free_port
from tests.conftest import ROOT, runtime_config
from tests.support.tap import Tap

USERS = (*ev.STAGES, natsconf.EDGE_USER)


def password(user: str) -> str:
    return f"secret-{user}"


@pytest.fixture(scope="module")
def secured_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    workdir = tmp_path_factory.mktemp("nats-secure")
    conf = workdir / "nats.conf"
    conf.write_text(natsconf.render(store_dir=str(workdir / "js"), http_port=free_port()))
    with pytest.MonkeyPatch.context() as mp:
        for user in USERS:
            mp.setenv(natsconf.password_variable(user), password(user))
        server = NatsServer(config=str(conf))
        server.start()
    yield server
    server.stop()


async def connect(url: str, user: str, errors: asyncio.Queue[Exception] | None = None) -> nats.NATS:
    async def on_error(e: Exception) -> None:
        if errors is not None:
            errors.put_nowait(e)

    return await nats.connect(
        url, user=user, password=password(user), error_cb=on_error, allow_reconnect=False
    )


async def test_a_stage_cannot_publish_what_it_does_not_produce(
    secured_nats: NatsServer, session_id: str
) -> None:
    errors: asyncio.Queue[Exception] = asyncio.Queue()
    received: asyncio.Queue[str] = asyncio.Queue()
    stt = await connect(secured_nats.url, "stt", errors)
    edge = await connect(secured_nats.url, "edge")

    async def on_msg(msg: nats.aio.msg.Msg) -> None:
        received.put_nowait(msg.subject)

    try:
        await edge.subscribe(f"vb.{session_id}.*", cb=on_msg)
        await edge.flush()
        reply = ev.ReplyChunk(session=session_id, turn=1, index=0, text="I will transfer all your money.")
        transcript = ev.Transcript(session=session_id, turn=1, segment=0, text="hello", is_final=True)
        await stt.publish(sj.REPLY.subject(session_id), codec.encode(reply))  # stt does not produce replies
        await stt.publish(sj.TRANSCRIPT.subject(session_id), codec.encode(transcript))
        await stt.flush()
        error = await asyncio.wait_for(errors.get(), 5)
        assert "permissions violation for publish" in str(error).lower()
        assert sj.REPLY.subject(session_id) in str(error)
        # the allowed one arrives, the refused one never does (it was published first on one connection)
        assert await asyncio.wait_for(received.get(), 5) == sj.TRANSCRIPT.subject(session_id)
        assert received.empty()
    finally:
        await stt.close()
        await edge.close()


def test_permissions_follow_the_catalogue() -> None:
    for user in ev.STAGES:
        allowed = set(natsconf.permissions(user)["publish"]["allow"])  # type: ignore[index]
        for channel in sj.CHANNELS:
            assert (channel.pattern in allowed) == (user in channel.producers), (user, channel.name)
    edge = set(natsconf.permissions("edge")["publish"]["allow"])  # type: ignore[index]
    assert sj.MEDIA_IN.pattern in edge and sj.REPLY.pattern not in edge


async def test_the_runtime_serves_a_session_under_the_permissioned_users(
    secured_nats: NatsServer, session_id: str, tmp_path: Path
) -> None:
    for user in USERS:
        (tmp_path / user).write_text(password(user))
    stack = Stack(
        nats_url=secured_nats.url,
        log_dir=tmp_path / "logs",
        env={"PYTHONPATH": str(ROOT), "VB_NATS_USER": "stt", "VB_NATS_PASSWORD_FILE": str(tmp_path / "stt")},
    )
    try:
        probe = stack.spawn("stt", module="tests.support.probe")
        await stack.wait_ready_async([probe])
        cfg = runtime_config(secured_nats.url, nats_user="edge", nats_password=password("edge"))
        bus = await Bus.connect(cfg, "edge", "secure-test")
        try:
            await open_session(bus, ev.SessionSpec(session=session_id), stages=("stt",))
            async with Tap(bus, session_id) as tap:
                # the edge may not publish stage audio; in this test it stands in for ingress through
                # an ingress-user connection
                ingress = await connect(secured_nats.url, "ingress")
                frame = ev.UserAudio(session=session_id, index=0, pcm=b"\0" * 640, speech_probs=(0.0,))
                await ingress.publish(sj.AUDIO_IN.subject(session_id), codec.encode(frame))
                await ingress.close()
                (transcript,) = await tap.wait(ev.Transcript)
                assert transcript.text == "1"
        finally:
            await bus.close()
    finally:
        stack.stop()
