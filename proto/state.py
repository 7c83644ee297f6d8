"""State a stage keeps for a session on the bus, so that a peer can take the session over.

Each stage's record subclasses ``StageState``; it is stored (msgpack) inside the stage's
``Checkpoint`` in the state bucket. Same evolution rules as events: new fields get defaults.
"""

from __future__ import annotations

import msgspec


class StageState(msgspec.Struct, kw_only=True):
    """Base of the per-stage session state records."""


class TtsReply(msgspec.Struct, kw_only=True):
    """A reply tts had not finished speaking: the chunks received so far, by index."""

    turn: int
    generation: int
    chunks: dict[int, str] = {}
    #: Index of the chunk marked ``last``, once it has arrived.
    last: int | None = None


class TtsState(StageState, kw_only=True):
    """What a tts successor needs: replies to speak again from their first frame, and what is closed.

    A successor re-synthesises every reply in ``replies`` with the same frame indices (egress drops the
    frames it already has). ``closed`` maps a turn to its highest generation that is finished,
    cancelled or superseded, so late or repeated chunks of those generations are dropped.
    """

    replies: list[TtsReply] = []
    closed: dict[int, int] = {}
