"""State a stage keeps for a session on the bus, so that a peer can take the session over.

Each stage's record subclasses ``StageState``; it is stored (msgpack) inside the stage's
``Checkpoint`` in the state bucket. Same evolution rules as events: new fields get defaults.
"""

from __future__ import annotations

import msgspec


class StageState(msgspec.Struct, kw_only=True):
    """Base of the per-stage session state records."""


class ReplyPosition(msgspec.Struct, kw_only=True):
    """How far a reply had played: frames below ``next_index`` were played (or skipped as lost)."""

    turn: int
    generation: int = 0
    next_index: int = 0
    played: int = 0


class EgressState(StageState, kw_only=True):
    """Egress's playout of a session, so that a successor neither replays nor loses audio.

    ``audio_out_seq`` and ``caller_seq`` are the stream sequences the successor re-reads ``audio.out``
    and ``audio.in`` after: the frames of replies not yet over (queued in memory, never played) and
    caller audio not yet written to the recording.
    """

    #: Replies of turns below ``floor`` are stale (a newer turn's reply has started playing).
    floor: int = 0
    #: Replies of turns up to ``cut`` were interrupted.
    cut: int = -1
    #: Replies that are over (played out, cancelled, superseded): (turn, generation, played_ms).
    closed: list[tuple[int, int, int]] = []
    #: The newest generation seen of each turn: (turn, generation).
    generations: list[tuple[int, int]] = []
    #: The reply that was playing.
    current: ReplyPosition | None = None
    audio_out_seq: int = 0
    caller_seq: int = 0
