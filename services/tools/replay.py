"""``voicebus replay FILE``: feed a recorded session's caller audio through the running services.

It reports how the new transcripts, turn boundaries and replies differ from the recording. The
caller's 16 kHz frames (``audio.in``, whatever the original media edge was) go back in as a
bus-attached caller at their recorded stream positions, in real time or faster (``--speed``: every
clock of the new session runs that much faster). The golden tests run this on recordings checked into
tests/data/golden and fail on any difference.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import os
import re
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from proto import codec
from proto import events as ev
from proto import subjects as sj
from proto.recording import RecordedCallerAudio, Recording
from services.runtime.bus import Bus

#: Turn boundaries may move this much (VAD windows, endpointing) before they count as different.
BOUNDARY_TOLERANCE_MS = 100


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the command."""
    parser.add_argument("file", help="a recording written by `voicebus record export`")
    parser.add_argument("--speed", type=float, default=1.0, help="replay speed (1 = real time)")


@dataclass(frozen=True)
class TurnOutcome:
    """What one caller turn produced: its boundaries, its transcript, the agent's reply."""

    turn: int
    start_ms: int
    end_ms: int
    said: str
    replied: str


@dataclass
class Comparison:
    """Recorded vs replayed turns, and the differences that matter."""

    recorded: list[TurnOutcome]
    replayed: list[TurnOutcome]
    differences: list[str] = field(default_factory=list)
    #: the new session the replay ran as (its events stay recorded: `voicebus record export` it)
    session: str = ""

    @property
    def same(self) -> bool:
        """Whether the replay reproduced the recording."""
        return not self.differences


def load(path: str | Path) -> Recording:
    """Read a recording file, gzip-compressed or not (ContractError if it is not one)."""
    data = Path(path).read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return codec.decode_record(Recording, data)


def _channel(subject: str) -> sj.Channel | None:
    try:
        return sj.parse(subject)[1]
    except KeyError:
        return None


def events_of(recording: Recording) -> list[ev.Event]:
    """The recording's conversation events decoded on their subjects; refused ones are skipped.

    Media is left out: its event types change with the audio format (see ``caller_frames``).
    """
    out = []
    for m in recording.messages:
        channel = _channel(m.subject)
        if channel is None or channel.is_media:
            continue
        try:
            out.append(codec.decode(m.subject, m.data))
        except codec.ContractError:
            continue
    return out


_caller_audio = msgspec.msgpack.Decoder(RecordedCallerAudio)


def caller_frames(recording: Recording) -> list[bytes]:
    """The caller's audio on ``audio.in`` as 20 ms frames from stream start, gaps filled with silence.

    Reads old recordings (a UserAudioFrame per frame) and new ones (UserAudio of several) alike.
    """
    frames: dict[int, bytes] = {}
    size = ev.USER_FRAME_BYTES
    for m in recording.messages:
        if _channel(m.subject) is not sj.AUDIO_IN:
            continue
        try:
            audio = _caller_audio.decode(m.data)
        except (msgspec.ValidationError, msgspec.DecodeError):
            continue  # the VAD's events, or a payload not worth replaying
        if not audio.pcm or len(audio.pcm) % size:
            continue
        for k in range(len(audio.pcm) // size):
            frames[audio.index + k] = audio.pcm[k * size : (k + 1) * size]
    if not frames:
        return []
    silence = b"\0" * size
    return [frames.get(i, silence) for i in range(max(frames) + 1)]


def outcomes(events: list[ev.Event]) -> list[TurnOutcome]:
    """Each caller turn with the text of the latest generation of the agent's reply to it."""
    replies: dict[int, dict[int, dict[int, str]]] = {}
    for e in events:
        if isinstance(e, ev.ReplyChunk) and e.kind == "reply":
            replies.setdefault(e.turn, {}).setdefault(e.generation, {})[e.index] = e.text
    result = []
    for e in events:
        if isinstance(e, ev.UserTurnEnded):
            gens = replies.get(e.turn, {})
            chunks = gens[max(gens)] if gens else {}
            text = " ".join(chunks[i].strip() for i in sorted(chunks) if chunks[i].strip())
            result.append(TurnOutcome(e.turn, e.start_ms, e.end_ms, e.text, text))
    return result


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]", " ", text.lower()).split())


def compare(recorded: list[TurnOutcome], replayed: list[TurnOutcome]) -> Comparison:
    """Differences in turn count, boundaries, transcripts and replies."""
    result = Comparison(recorded, replayed)
    if len(recorded) != len(replayed):
        result.differences.append(f"{len(replayed)} turns replayed, {len(recorded)} recorded")
    for a, b in zip(recorded, replayed):
        if (
            abs(a.start_ms - b.start_ms) > BOUNDARY_TOLERANCE_MS
            or abs(a.end_ms - b.end_ms) > BOUNDARY_TOLERANCE_MS
        ):
            result.differences.append(
                f"turn {a.turn} boundaries: recorded {a.start_ms}-{a.end_ms} ms, "
                f"replayed {b.start_ms}-{b.end_ms} ms"
            )
        if _norm(a.said) != _norm(b.said):
            result.differences.append(f"turn {a.turn} transcript: recorded {a.said!r}, replayed {b.said!r}")
        if _norm(a.replied) != _norm(b.replied):
            result.differences.append(f"turn {a.turn} reply: recorded {a.replied!r}, replayed {b.replied!r}")
    return result


async def replay(bus: Bus, recording: Recording, *, speed: float = 1.0, settle_s: float = 60.0) -> Comparison:
    """Feed the recording's caller audio into a new session; compare what the services make of it."""
    from services.tools.caller import VirtualCaller

    recorded_events = events_of(recording)
    frames = caller_frames(recording)
    original = next((e.spec for e in recorded_events if isinstance(e, ev.SessionStarted)), None)
    agent = original.agent if original else ev.AgentSpec()
    spec = ev.SessionSpec(
        session=f"replay-{uuid.uuid4().hex[:10]}",
        speed=speed,
        agent=agent,
        output_rate=original.output_rate if original else 24000,
    )
    recorded = outcomes(recorded_events)
    async with VirtualCaller(bus, spec) as caller:
        await caller.play(frames)
        await caller.settle(turns=len(recorded), timeout_s=settle_s)
        replayed = outcomes(caller.events)
    result = compare(recorded, replayed)
    result.session = spec.session
    return result


def report(result: Comparison) -> str:
    """The comparison as text: each turn side by side, then the differences."""
    lines = [f"session {result.session}"] if result.session else []
    for t in result.replayed:
        lines.append(f"turn {t.turn} [{t.start_ms}-{t.end_ms} ms] caller: {t.said}")
        lines.append(f"        agent: {t.replied}")
    lines.append("same as the recording" if result.same else "differences:")
    lines += [f"  - {d}" for d in result.differences]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """Replay a file against the running services (VB_NATS_URL); exit 1 if anything differs."""
    from services.runtime.config import RuntimeConfig
    from services.runtime.config import load as load_config

    async def run() -> int:
        recording = load(args.file)
        bus = await Bus.connect(load_config(RuntimeConfig), "edge", f"replay-{os.getpid()}")
        try:
            result = await replay(bus, recording, speed=args.speed)
        finally:
            await bus.close()
        print(report(result))
        return 0 if result.same else 1

    try:
        return asyncio.run(run())
    except codec.ContractError as e:
        print(f"{args.file}: not a voicebus recording ({e})", file=sys.stderr)
        return 2
