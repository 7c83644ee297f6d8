"""Golden replays: recorded sessions fed back through the real services must come out the same, and
a deliberate change of behaviour must show up as a difference."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from proto import codec
from proto import events as ev
from proto import subjects as sj
from proto.recording import RecordedMessage
from services.runtime.bus import Bus
from services.tools import replay
from services.tools.stack import Stack
from tests.support import golden
from tests.support.nats import ContainerNats, NatsServer

pytestmark = pytest.mark.slow
RECORDINGS = sorted(golden.DIR.glob("*.vbrec"))
SPEED = 2.0


@pytest.fixture(scope="module")
def golden_stack(
    nats_server: NatsServer | ContainerNats, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    stack = Stack(
        nats_url=nats_server.url, env=golden.stack_env(), log_dir=tmp_path_factory.mktemp("golden-logs")
    )
    stack.start()
    yield stack
    stack.stop()


def test_there_are_golden_recordings() -> None:
    assert len(RECORDINGS) >= 2
    for path in RECORDINGS:
        outcomes = replay.outcomes(replay.events_of(replay.load(path)))
        assert outcomes and all(t.said and t.replied for t in outcomes), path.name


def test_replay_reads_the_callers_audio_of_old_and_new_recordings() -> None:
    # recorded when audio.in carried a UserAudioFrame per frame (and kept out of the replays: its turns
    # were cut by the VAD model of the time)
    old = replay.load(golden.DIR / "legacy" / "dog-user-audio-frame.vbrec")
    subject = sj.AUDIO_IN.subject(old.session)
    recorded = [msgspec.msgpack.decode(m.data) for m in old.messages if m.subject == subject]
    old_frames = {d["index"]: d["pcm"] for d in recorded if d["type"] == "UserAudioFrame"}
    frames = replay.caller_frames(old)
    assert frames == [old_frames[i] for i in range(len(old_frames))]
    assert any(f.strip(b"\0") for f in frames)

    # the same audio as the ingress sends it now: UserAudio of up to five frames
    per = ev.USER_AUDIO_MAX_FRAMES
    batches = [
        ev.UserAudio(
            session=old.session,
            index=at,
            pcm=b"".join(frames[at : at + per]),
            speech_probs=(0.0,) * len(frames[at : at + per]),
        )
        for at in range(0, len(frames), per)
    ]
    messages = [m for m in old.messages if m.subject != subject]
    messages += [RecordedMessage(subject, 0, 0, codec.encode(b)) for b in batches]
    new = msgspec.structs.replace(old, messages=messages)
    assert replay.caller_frames(new) == frames
    assert replay.outcomes(replay.events_of(new)) == replay.outcomes(replay.events_of(old))


@pytest.mark.parametrize("path", RECORDINGS, ids=lambda p: p.stem)
async def test_a_recorded_session_replays_the_same(golden_stack: Stack, bus: Bus, path: Path) -> None:
    result = await replay.replay(bus, replay.load(path), speed=SPEED, settle_s=120)
    assert result.same, replay.report(result)
    assert len(result.replayed) == len(result.recorded) >= 2


async def test_a_changed_reply_makes_the_replay_differ(golden_stack: Stack, bus: Bus, tmp_path: Path) -> None:
    script = json.loads(golden.SCRIPT.read_text())
    script["rules"][0]["reply"] = "Sorry, we are fully booked tonight."
    changed = tmp_path / "script.json"
    changed.write_text(json.dumps(script))
    (dialogue,) = golden_stack.of("dialogue")
    golden_stack.kill(dialogue)
    replacement = golden_stack.spawn("dialogue", env=golden.stack_env(changed))
    try:
        await golden_stack.wait_ready_async([replacement])
        result = await replay.replay(
            bus, replay.load(golden.DIR / "booking.vbrec"), speed=SPEED, settle_s=120
        )
    finally:
        golden_stack.kill(replacement)
        await golden_stack.wait_ready_async([golden_stack.spawn("dialogue", env=golden.stack_env())])
    assert not result.same
    assert any("turn 1 reply" in d and "fully booked" in d for d in result.differences), result.differences
    assert not any("transcript" in d or "boundaries" in d for d in result.differences), result.differences


async def test_replay_and_export_from_the_command_line(
    golden_stack: Stack, nats_server: NatsServer | ContainerNats, tmp_path: Path
) -> None:
    import asyncio
    import os
    import sys

    env = {**os.environ, "VB_NATS_URL": nats_server.url, "PYTHONPATH": str(golden.DIR.parents[2])}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services",
        "replay",
        str(golden.DIR / "dog.vbrec"),
        "--speed",
        str(SPEED),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out = (await asyncio.wait_for(proc.communicate(), 120))[0].decode()
    assert proc.returncode == 0, out
    assert "same as the recording" in out and "turn 1" in out

    session = next(line.split()[-1] for line in out.splitlines() if line.startswith("session "))
    target = tmp_path / "exported.vbrec"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services",
        "record",
        "export",
        session,
        "-o",
        str(target),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out = (await asyncio.wait_for(proc.communicate(), 60))[0].decode()
    assert proc.returncode == 0, out
    exported = replay.outcomes(replay.events_of(replay.load(target)))
    recorded = replay.outcomes(replay.events_of(replay.load(golden.DIR / "dog.vbrec")))
    assert replay.compare(recorded, exported).same
