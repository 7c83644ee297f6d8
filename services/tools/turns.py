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
