"""``voicebus trace``: draw a turn's trace as a waterfall in the terminal.

Reads the JSON-lines span file the services write with ``VB_TRACE_EXPORTER=file`` (the demo does),
groups spans by trace, and draws one trace: every span as a bar on a shared time axis, indented under
its parent, with the service that ran it. In Kubernetes and docker-compose the same traces go to
Jaeger over OTLP.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the command."""
    parser.add_argument("--file", default="out/traces.jsonl", help="span file (VB_TRACE_FILE)")
    parser.add_argument("--session", help="only traces of this session")
    parser.add_argument("--turn", type=int, help="the trace of this turn (default: the latest turn)")
    parser.add_argument("--list", action="store_true", help="list the turns found instead of drawing one")


@dataclass
class Span:
    """One span as exported."""

    name: str
    trace_id: str
    span_id: str
    parent_id: str | None
    start: float
    end: float
    service: str
    attributes: dict[str, object]
    events: list[tuple[str, float]] = field(default_factory=list)
    children: list[Span] = field(default_factory=list)


def _time(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def load(path: Path) -> dict[str, list[Span]]:
    """Spans of the file grouped by trace id (lines that are not spans are skipped)."""
    traces: dict[str, list[Span]] = defaultdict(list)
    for line in path.read_text().splitlines():
        try:
            raw = json.loads(line)
            span = Span(
                name=raw["name"],
                trace_id=raw["context"]["trace_id"],
                span_id=raw["context"]["span_id"],
                parent_id=raw.get("parent_id"),
                start=_time(raw["start_time"]),
                end=_time(raw["end_time"]),
                service=str(raw["resource"]["attributes"].get("service.name", "?")).removeprefix("voicebus-"),
                attributes=raw.get("attributes") or {},
                events=[(e["name"], _time(e["timestamp"])) for e in raw.get("events") or []],
            )
        except (ValueError, KeyError, TypeError):
            continue
        traces[span.trace_id].append(span)
    return traces


def turn_traces(traces: dict[str, list[Span]], session: str | None) -> list[tuple[str, int, list[Span]]]:
    """(session, turn, spans) of every trace rooted at a "turn" span, oldest first."""
    found = []
    for spans in traces.values():
        roots = [s for s in spans if s.name == "turn"]
        if not roots:
            continue
        attrs = roots[0].attributes
        if session and attrs.get("session") != session:
            continue
        found.append((str(attrs.get("session", "?")), int(str(attrs.get("turn", -1))), spans))
    return sorted(found, key=lambda t: min(s.start for s in t[2]))


def draw(spans: list[Span], width: int) -> str:
    """The waterfall: one line per span, depth-first, bars on a shared axis."""
    by_id = {s.span_id: s for s in spans}
    roots: list[Span] = []
    for s in sorted(spans, key=lambda s: s.start):
        parent = by_id.get(s.parent_id or "")
        (parent.children if parent else roots).append(s)
    t0 = min(s.start for s in spans)
    t1 = max(s.end for s in spans)
    total_ms = max((t1 - t0) * 1000, 1.0)
    label_w = 34
    bar_w = max(20, width - label_w - 24)
    lines = [
        f"{'span':<{label_w}} {'service':<9}{'start':>6}{'ms':>7}  0{'':<{bar_w - 8}}{total_ms:>6.0f} ms"
    ]

    def walk(span: Span, depth: int) -> None:
        a = int((span.start - t0) * 1000 / total_ms * bar_w)
        b = max(a + 1, int((span.end - t0) * 1000 / total_ms * bar_w))
        bar = " " * a + "█" * (b - a)
        label = ("  " * depth + span.name)[:label_w]
        start_ms, dur_ms = (span.start - t0) * 1000, (span.end - span.start) * 1000
        lines.append(f"{label:<{label_w}} {span.service:<9}{start_ms:>6.0f}{dur_ms:>7.0f}  {bar}")
        for name, at in span.events:
            pos = int((at - t0) * 1000 / total_ms * bar_w)
            lines.append(
                f"{('  ' * (depth + 1) + '· ' + name)[:label_w]:<{label_w}} {'':<9}"
                f"{(at - t0) * 1000:>6.0f}{'':>7}  {' ' * pos}▏"
            )
        for child in sorted(span.children, key=lambda c: c.start):
            walk(child, depth + 1)

    for root in roots:
        walk(root, 0)
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """List the turns or draw one."""
    path = Path(args.file)
    if not path.exists():
        print(
            f"{path} does not exist: run the services with VB_TRACE_EXPORTER=file (the demo does)",
            file=sys.stderr,
        )
        return 2
    turns = turn_traces(load(path), args.session)
    if not turns:
        print(f"no turn traces in {path}", file=sys.stderr)
        return 1
    if args.list:
        for session, turn, spans in turns:
            print(f"{session}  turn {turn}  {len(spans)} spans")
        return 0
    chosen = [t for t in turns if args.turn is None or t[1] == args.turn]
    if not chosen:
        print(f"no trace for turn {args.turn}", file=sys.stderr)
        return 1
    session, turn, spans = chosen[-1]
    print(f"session {session}, turn {turn}")
    print(draw(spans, shutil.get_terminal_size((120, 20)).columns))
    return 0
