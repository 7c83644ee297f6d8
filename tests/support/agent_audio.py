"""Agent frames as the TTS sends them: ``AgentAudio`` events of consecutive frames of one chunk."""

from __future__ import annotations

from collections.abc import Sequence

from proto import events as ev


def pack(frames: Sequence[ev.AgentAudioFrame]) -> list[ev.AgentAudio]:
    """``frames`` in events of up to ``AGENT_AUDIO_MAX_FRAMES``; a new chunk or a gap in the indices
    starts a new event. The frames' words ride on their event (the egress gives them to its first frame).
    """
    runs: list[list[ev.AgentAudioFrame]] = []
    for f in frames:
        last = runs[-1][-1] if runs else None
        if (
            last is not None
            and len(runs[-1]) < ev.AGENT_AUDIO_MAX_FRAMES
            and (last.turn, last.generation, last.chunk, last.index + 1)
            == (f.turn, f.generation, f.chunk, f.index)
        ):
            runs[-1].append(f)
        else:
            runs.append([f])
    return [
        ev.AgentAudio(
            session=run[0].session,
            turn=run[0].turn,
            generation=run[0].generation,
            index=run[0].index,
            chunk=run[0].chunk,
            pcm=b"".join(f.pcm for f in run),
            sample_rate=run[0].sample_rate,
            words=tuple(w for f in run for w in f.words),
        )
        for run in runs
    ]
