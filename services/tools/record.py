"""``voicebus record export SESSION``: write a recorded session from JetStream to a file.

Every session's events are recorded by the events stream as they travel; this reads one session's
messages back (conversation channels, caller audio, agent audio) in stream order and writes them as
one msgpack ``Recording`` that ``voicebus replay`` and the golden tests read.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import os
import time
from pathlib import Path

from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy

from proto import codec
from proto import subjects as sj
from proto.events import SCHEMA_VERSION
from proto.recording import RecordedMessage, Recording
from services.runtime.bus import Bus


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the command."""
    sub = parser.add_subparsers(dest="action", required=True)
    export = sub.add_parser("export", help="write one session's recorded events to a file")
    export.add_argument("session")
    export.add_argument("-o", "--output", help="file to write (default: <session>.vbrec)")
    export.add_argument(
        "--no-agent-audio",
        action="store_true",
        help="leave out the agent's audio frames (the caller side and all text events stay)",
    )
    export.add_argument(
        "--no-caller-media",
        action="store_true",
        help="leave out the caller's raw media (its 16 kHz frames on audio.in stay)",
    )


async def export(
    bus: Bus, session: str, *, agent_audio: bool = True, caller_media: bool = True, timeout_s: float = 30.0
) -> Recording:
    """Every recorded message of ``session``, merged across its subjects in stream order."""
    subjects = [sj.conversation(session), sj.AUDIO_IN.subject(session)]
    if caller_media:
        subjects.append(sj.MEDIA_IN.subject(session))
    if agent_audio:
        subjects.append(sj.AUDIO_OUT.subject(session))
    messages: list[RecordedMessage] = []
    for subject in subjects:
        messages += await _read_all(bus, subject, timeout_s)
    messages.sort(key=lambda m: m.stream_seq)
    return Recording(
        session=session, schema_version=SCHEMA_VERSION, exported_ts=time.time_ns(), messages=messages
    )


async def _read_all(bus: Bus, subject: str, timeout_s: float) -> list[RecordedMessage]:
    got: list[RecordedMessage] = []
    done = asyncio.Event()

    async def on_msg(msg: Msg) -> None:
        meta = msg.metadata
        got.append(
            RecordedMessage(
                msg.subject,
                meta.sequence.stream,
                int(meta.timestamp.timestamp() * 1e9) if meta.timestamp else 0,
                msg.data,
            )
        )
        if meta.num_pending == 0:
            done.set()

    info = await bus.js.stream_info(sj.EVENTS_STREAM, subjects_filter=subject)
    if not (info.state.subjects or {}):
        return got
    sub = await bus.js.subscribe(
        subject, stream=sj.EVENTS_STREAM, cb=on_msg, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    try:
        await asyncio.wait_for(done.wait(), timeout_s)
    finally:
        await sub.unsubscribe()
    return got


def main(args: argparse.Namespace) -> int:
    """Export a session to a file."""
    from services.runtime.config import RuntimeConfig, load

    async def run() -> int:
        bus = await Bus.connect(load(RuntimeConfig), "edge", f"record-{os.getpid()}", setup=False)
        try:
            recording = await export(
                bus, args.session, agent_audio=not args.no_agent_audio, caller_media=not args.no_caller_media
            )
        finally:
            await bus.close()
        if not recording.messages:
            print(f"nothing recorded for session {args.session}")
            return 1
        return write(recording, Path(args.output or f"{args.session}.vbrec"))

    return asyncio.run(run())


def write(recording: Recording, path: Path) -> int:
    """Save a recording (gzip-compressed msgpack: sessions are mostly silence); 0."""
    path.write_bytes(gzip.compress(codec.encode(recording)))
    print(f"wrote {len(recording.messages)} messages of {recording.session} to {path}")
    return 0
