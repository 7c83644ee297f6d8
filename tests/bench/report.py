"""Medians with ranges over repeated runs, written as JSON and as a markdown table into the docs."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

OUT = Path("out/bench")
DOCS = Path("docs/benchmarks.md")


def summarize(runs: Sequence[Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """For each metric: median of the runs and their min and max."""
    keys = [k for k in runs[0] if all(k in r for r in runs)]
    return {
        k: {
            "median": statistics.median(r[k] for r in runs),
            "min": min(r[k] for r in runs),
            "max": max(r[k] for r in runs),
        }
        for k in keys
    }


def table(summary: Mapping[str, Mapping[str, float]], units: Mapping[str, str]) -> str:
    """A markdown table: metric, median, range."""
    lines = ["| metric | median | range |", "|---|---|---|"]
    for key, s in summary.items():
        unit = units.get(key, "")
        lines.append(f"| {key} | {s['median']:.4g} {unit} | {s['min']:.4g} - {s['max']:.4g} {unit} |")
    return "\n".join(lines) + "\n"


def write(
    scenario: str, runs: Sequence[Mapping[str, float]], units: Mapping[str, str], note: str = ""
) -> str:
    """Save raw runs and summary to out/bench/<scenario>.json; splice the table into docs/benchmarks.md."""
    summary = summarize(runs)
    OUT.mkdir(parents=True, exist_ok=True)
    meta = {
        "scenario": scenario,
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cores",
        "runs": len(runs),
    }
    (OUT / f"{scenario}.json").write_text(
        json.dumps({**meta, "summary": summary, "raw": list(runs)}, indent=2)
    )
    body = (
        f"_{meta['when']}, {meta['machine']}, median of {meta['runs']} runs (range = min - max)._"
        f"{' ' + note if note else ''}\n\n{table(summary, units)}"
    )
    begin, end = f"<!-- bench:{scenario}:begin -->", f"<!-- bench:{scenario}:end -->"
    if DOCS.exists() and begin in DOCS.read_text():
        doc = DOCS.read_text()
        head, _, rest = doc.partition(begin)
        _, _, tail = rest.partition(end)
        DOCS.write_text(f"{head}{begin}\n{body}{end}{tail}")
    return body
