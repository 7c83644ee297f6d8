"""``voicebus demo``: a real spoken conversation through the five services, offline.

Starts a nats-server and the five stages as separate processes (local engines: Silero VAD, Whisper
tiny.en, SmolLM2, Piper), then plays a caller (a voice other than the agent's, recorded with flite's
"slt" voice: ``flite -voice slt -t "<line>" -o turnN.wav``) turn by turn, waiting for each reply as a
person would. Writes the conversation as heard to out/conversation.wav, the traces to
out/traces.jsonl (``voicebus trace`` draws them) and prints the per-turn latency table.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from proto import events as ev

if TYPE_CHECKING:
    from services.tools.caller import Turn

CALLER = Path(__file__).with_name("data") / "caller"
#: From the caller's last word to the reply played to its end, before the turn counts as missed.
REPLY_TIMEOUT_S = 60.0
AGENT = ev.AgentSpec(
    instructions=(
        "You are the booking line of the Blue Door restaurant. You take table reservations. "
        "Answer in one short, friendly sentence."
    ),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the command."""
    parser.add_argument("--out", default="out", help="directory for conversation.wav, traces and logs")
    parser.add_argument("--caller", default=str(CALLER), help="directory of the caller's turn*.wav files")
    parser.add_argument("--speed", type=float, default=1.0, help="session clock speed (1 = real time)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines, only the table")


def main(args: argparse.Namespace) -> int:
    """Run the demo; exit 1 if a turn was missed."""
    utterances = caller_turns(Path(args.caller))
    if not utterances:
        print(f"no turn*.wav in {args.caller}", file=sys.stderr)
        return 2
    from services.tools import turns as table

    out = prepare(Path(args.out))
    results = asyncio.run(run(out, utterances, speed=args.speed, quiet=args.quiet))
    print(table.render(results))
    if usage := table.render_usage(results):
        print(f"\n{usage}")
    traces = out / "traces.jsonl"
    print(f"\nconversation as heard: {out / 'conversation.wav'}")
    print(f"traces: {traces} (voicebus trace --file {traces})")
    return 1 if any(t.missed for t in results) else 0


def caller_turns(directory: Path) -> list[bytes]:
    """The caller's utterances, turn1.wav, turn2.wav... in order."""
    from services.tools.caller import read_wav_16k

    paths = sorted(directory.glob("turn*.wav"), key=lambda p: int("".join(filter(str.isdigit, p.stem)) or 0))
    return [read_wav_16k(p) for p in paths]


def prepare(out: Path) -> Path:
    """The output directory, created, without the previous run's recording and traces."""
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("conversation.wav", "traces.jsonl"):
        (out / stale).unlink(missing_ok=True)
    return out


def say(quiet: bool, text: str) -> None:
    """A progress line."""
    if not quiet:
        print(text, flush=True)


async def run(
    out: Path,
    utterances: list[bytes],
    *,
    speed: float = 1.0,
    quiet: bool = False,
    env: dict[str, str] | None = None,
) -> list[Turn]:
    """The conversation, callable from tests (``out`` from ``prepare``; ``env`` overrides stage settings)."""
    from services.runtime.bus import Bus
    from services.runtime.config import RuntimeConfig, load
    from services.tools.caller import VirtualCaller
    from services.tools.stack import NatsServer, Stack

    recording, traces = out / "conversation.wav", out / "traces.jsonl"
    nats = None
    url = os.environ.get("VB_NATS_URL", "")
    if not url:
        nats = NatsServer()
        nats.start()
        url = nats.url
    stack = Stack(
        nats_url=url,
        log_dir=out / "logs",
        env={"VB_TRACE_EXPORTER": "file", "VB_TRACE_FILE": str(traces), **(env or {})},
    )
    bus = None
    try:
        say(quiet, "starting nats and the five services (loading models)...")
        await asyncio.to_thread(stack.start, ev.STAGES, 1, 180.0)
        bus = await Bus.connect(load(RuntimeConfig, environ={}, nats_url=url), "edge", "demo")
        spec = ev.SessionSpec(
            session=f"demo-{uuid.uuid4().hex[:8]}", speed=speed, agent=AGENT, recording_path=str(recording)
        )
        results: list[Turn] = []
        async with VirtualCaller(bus, spec) as caller:
            for number, utterance in enumerate(utterances, start=1):
                say(quiet, f"turn {number}: the caller speaks...")
                # the offline model's replies can run to several sentences, and a turn counts once its
                # reply has played to the end
                turn = await caller.converse(utterance, number, timeout_s=REPLY_TIMEOUT_S)
                results.append(turn)
                if turn.missed:
                    say(quiet, f"  turn {number}: no reply in time")
                else:
                    say(
                        quiet,
                        f"  caller: {turn.said}\n  agent:  {turn.replied}   (TTFA {turn.ttfa_ms:.0f} ms)",
                    )
            await caller.hang_up("completed", wait_for=("egress",))
        return results
    finally:
        if bus is not None:
            await bus.close()
        await asyncio.to_thread(stack.stop)
        if nats is not None:
            nats.stop()
