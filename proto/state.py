"""State a stage keeps for a session on the bus, so that a peer can take the session over.

Each stage's record subclasses ``StageState``; it is stored (msgpack) inside the stage's
``Checkpoint`` in the state bucket. Same evolution rules as events: new fields get defaults.
"""

from __future__ import annotations

import msgspec


class StageState(msgspec.Struct, kw_only=True):
    """Base of the per-stage session state records."""


class SttState(StageState, kw_only=True):
    """What stt keeps between turns; checkpointed when a turn ends, while no turn is open.

    A successor resumes reading audio right after that point, so it re-transcribes a turn that was in
    progress from the audio on the bus, under the same turn id.
    """

    #: Id of the last turn that ended (a noise turn included): the next turn is ``last_turn + 1``.
    last_turn: int = 0
    #: Index of the last audio frame handled: frames re-published by a successor ingress are skipped.
    last_frame: int = -1
    #: The last VAD segment handled: its re-published SpeechStarted/SpeechStopped are skipped.
    last_segment: int = -1
