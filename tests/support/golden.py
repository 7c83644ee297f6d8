"""Golden sessions: the stack the golden tests run, and how the recordings in tests/data/golden were made.

``python -m tests.support.golden`` records them again (after a deliberate change of behaviour): it
starts NATS and the five stages with deterministic engines (Whisper STT, the scripted LLM with
tests/data/golden/script.json, flite TTS), plays the demo caller's turns, and exports each session
without the agent's audio (replay compares text and turn boundaries, not audio).
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

from proto import events as ev
from services.runtime.bus import Bus
from services.runtime.config import RuntimeConfig, load
from services.tools import demo, record
from services.tools.caller import VirtualCaller
from services.tools.stack import NatsServer, Stack

DIR = Path(__file__).resolve().parent.parent / "data" / "golden"
SCRIPT = DIR / "script.json"
#: recording name -> which demo caller turns it holds
SESSIONS = {"booking": (0, 1), "dog": (2, 3)}


def stack_env(script: Path = SCRIPT) -> dict[str, str]:
    """Deterministic engines: the same caller audio gives the same turns and replies."""
    return {
        "VB_STT_ENGINE": "whisper",
        "VB_STT_PARTIAL_INTERVAL": "0",
        "VB_LLM_ENGINE": "scripted",
        "VB_LLM_SCRIPT": str(script),
        "VB_TTS_ENGINE": "flite",
        "VB_LOG_LEVEL": "WARNING",
    }


async def record_session(url: str, name: str, utterances: list[bytes]) -> Path:
    bus = await Bus.connect(load(RuntimeConfig, environ={}, nats_url=url), "edge", "golden")
    try:
        spec = ev.SessionSpec(session=f"golden-{name}-{uuid.uuid4().hex[:6]}", agent=demo.AGENT)
        async with VirtualCaller(bus, spec) as caller:
            for n, utterance in enumerate(utterances, start=1):
                turn = await caller.converse(utterance, n, timeout_s=20.0)
                assert not turn.missed, f"{name}: turn {n} missed"
        recording = await record.export(bus, spec.session, agent_audio=False, caller_media=False)
    finally:
        await bus.close()
    path = DIR / f"{name}.vbrec"
    record.write(recording, path)
    return path


def main() -> None:
    utterances = demo.caller_turns(demo.CALLER)
    nats = NatsServer()
    nats.start()
    stack = Stack(nats_url=nats.url, env=stack_env())
    try:
        stack.start()
        for name, turns in SESSIONS.items():
            path = asyncio.run(record_session(nats.url, name, [utterances[i] for i in turns]))
            print(f"wrote {path} ({path.stat().st_size // 1024} KiB)")
    finally:
        stack.stop()
        nats.stop()


if __name__ == "__main__":
    main()
