"""State a stage keeps for a session on the bus, so that a peer can take the session over.

Each stage's record subclasses ``StageState``; it is stored (msgpack) inside the stage's
``Checkpoint`` in the state bucket. Same evolution rules as events: new fields get defaults.
"""

from __future__ import annotations

import msgspec


class StageState(msgspec.Struct, kw_only=True):
    """Base of the per-stage session state records."""
