"""State a stage keeps for a session on the bus, so that a peer can take the session over.

Each stage's record subclasses ``StageState``; it is stored (msgpack) inside the stage's
``Checkpoint`` in the state bucket. Same evolution rules as events: new fields get defaults.
"""

from __future__ import annotations

from typing import Literal

import msgspec


class StageState(msgspec.Struct, kw_only=True):
    """Base of the per-stage session state records."""


class DialogueMessage(msgspec.Struct, kw_only=True):
    """One message of the conversation: what the caller said, or what the caller heard of a reply."""

    role: Literal["user", "assistant"]
    turn: int
    text: str
    #: The reply was cut off: ``text`` is the part the caller heard.
    interrupted: bool = False
    #: Generation of the reply the caller heard (a regenerated reply replaces an earlier one).
    generation: int = 0


class SentReply(msgspec.Struct, kw_only=True):
    """A reply sent to TTS whose playout has not been reported yet (its text enters the history then)."""

    turn: int
    generation: int
    text: str
    #: Generated to the end (else cancelled part-way; only the heard text can enter the history).
    complete: bool


class DialogueState(StageState, kw_only=True):
    """The conversation and where its replies stand.

    ``last_turn`` is the latest turn a reply was asked for (0: the greeting) and ``generation`` the
    generation of that reply; ``answered_turn`` the latest turn whose reply needs no more generating
    (it went out to the end, or a Cancel or Interrupt stopped it). A successor that finds
    ``last_turn > answered_turn`` regenerates that reply with the next generation.
    """

    history: list[DialogueMessage] = []
    last_turn: int = -1
    generation: int = 0
    answered_turn: int = -1
    unplayed: list[SentReply] = []
