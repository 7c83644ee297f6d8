"""The per-turn latency table: where each millisecond of a turn went, from the timeline marks.

The phases follow one turn's critical path, so they add up (bus hops included) to the TTFA measured
at the caller's speaker: caller's last speech frame -> first agent audio heard.
"""

from __future__ import annotations

import math
import shutil
import textwrap
from collections.abc import Sequence

from services.tools.caller import Turn

#: (column, from mark, to mark)
PHASES: tuple[tuple[str, str, str], ...] = (
    ("VAD stop", "speech_end", "vad_stop"),
    ("STT final", "vad_stop", "stt_final"),
    ("endpointing", "stt_final", "end_of_turn"),
    ("LLM 1st token", "end_of_turn", "llm_first_token"),
    ("chunk to TTS", "llm_first_token", "tts_text"),
    ("TTS 1st audio", "tts_text", "tts_first_audio"),
    ("audio out", "tts_first_audio", "first_audio_out"),
)


#: (column, TurnUsage kind, format) of the usage table
USAGE: tuple[tuple[str, str, str], ...] = (
    ("STT audio s", "stt_audio_s", "{:.1f}"),
    ("LLM in", "llm_input_tokens", "{:.0f}"),
    ("cache read", "llm_cache_read_tokens", "{:.0f}"),
    ("cache write", "llm_cache_write_tokens", "{:.0f}"),
    ("LLM out", "llm_output_tokens", "{:.0f}"),
    ("TTS chars", "tts_chars", "{:.0f}"),
    ("cost $", "cost_usd", "{:.5f}"),
)


def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.0f}"


def render(turns: Sequence[Turn]) -> str:
    """A plain-text table: what was said on both sides, TTFA and each phase's share (ms)."""
    width = shutil.get_terminal_size((120, 20)).columns
    text_w = max(20, (width - 8 - 9 * (len(PHASES) + 1)) // 2)
    header = ["#", "caller said", "agent said", "TTFA", *(name for name, _, _ in PHASES)]
    rows = []
    for t in turns:
        ttfa = "missed" if t.missed else _ms(t.ttfa_ms)
        phases = [_ms(t.phase_ms(a, b)) for _, a, b in PHASES]
        rows.append([str(t.number), t.said or "-", t.replied or "-", ttfa, *phases])
    widths = [3, text_w, text_w, 7, *(max(len(n), 5) for n, _, _ in PHASES)]
    lines = [" ".join(h.ljust(w) if i < 3 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    lines.append(" ".join("-" * w for w in widths))
    for row in rows:
        said = textwrap.wrap(row[1], text_w) or [""]
        replied = textwrap.wrap(row[2], text_w) or [""]
        for k in range(max(len(said), len(replied))):
            first = k == 0
            cells = [
                row[0] if first else "",
                said[k] if k < len(said) else "",
                replied[k] if k < len(replied) else "",
                *(row[3:] if first else [""] * (len(row) - 3)),
            ]
            lines.append(
                " ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
            )
    lines.append(
        "times in ms; TTFA = caller's last speech frame -> first agent audio at the caller's speaker"
    )
    return "\n".join(lines)


def cache_read_share(turn: Turn) -> float:
    """The share of the turn's LLM input read from the prompt cache (0 without LLM usage)."""
    kinds = ("llm_input_tokens", "llm_cache_read_tokens", "llm_cache_write_tokens")
    total = sum(turn.usage.get(k, 0.0) for k in kinds)
    return turn.usage.get("llm_cache_read_tokens", 0.0) / total if total else 0.0


def render_usage(turns: Sequence[Turn]) -> str:
    """What each turn's providers billed (from the stages' TurnUsage events) and its price; empty if none."""
    if not any(t.usage for t in turns):
        return ""
    header = ["#", *(name for name, _, _ in USAGE), "cached"]
    widths = [3, *(max(len(name), 8) for name, _, _ in USAGE), 7]
    lines = [" ".join(h.rjust(w) for h, w in zip(header, widths))]
    lines.append(" ".join("-" * w for w in widths))
    totals: dict[str, float] = {}
    for t in turns:
        for kind, n in t.usage.items():
            totals[kind] = totals.get(kind, 0.0) + n
        cells = [fmt.format(t.usage[kind]) if kind in t.usage else "-" for _, kind, fmt in USAGE]
        row = [str(t.number), *cells, f"{cache_read_share(t):.0%}"]
        lines.append(" ".join(c.rjust(w) for c, w in zip(row, widths)))
    total = ["all", *(fmt.format(totals.get(kind, 0.0)) for _, kind, fmt in USAGE), ""]
    lines.append(" ".join(c.rjust(w) for c, w in zip(total, widths)))
    lines.append("cached = share of the LLM input read from the prompt cache; prices from VB_PRICE_*")
    return "\n".join(lines)
