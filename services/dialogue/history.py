"""The conversation as the agent remembers it: what the caller said, and what the caller heard.

A reply enters the history only when its playout stops, as the egress reports it: the whole reply if
it played to the end, else the part the caller heard (marked interrupted). Messages stay in turn order
even when a playout report comes after the caller's next turn, so the LLM reads the conversation as it
happened. The list is the one inside the checkpointed ``DialogueState``, changed in place.
"""

from __future__ import annotations

from proto.state import DialogueMessage
from services.dialogue.engines.base import ChatMessage


class History:
    """Ordered by turn; within a turn the caller's message comes before the agent's."""

    def __init__(self, messages: list[DialogueMessage], limit: int) -> None:
        self.messages = messages
        self.limit = limit

    def add_user(self, turn: int, text: str) -> None:
        """The caller's turn ``turn`` ended with ``text``."""
        self._insert(DialogueMessage(role="user", turn=turn, text=text))

    def add_agent(self, turn: int, generation: int, text: str, *, interrupted: bool) -> bool:
        """What the caller heard of the reply to ``turn``; False if a newer or equal report is there.

        A report of a later generation (the reply was regenerated) replaces the earlier one.
        """
        for i, m in enumerate(self.messages):
            if m.role == "assistant" and m.turn == turn:
                if generation <= m.generation:
                    return False
                del self.messages[i]
                break
        message = DialogueMessage(
            role="assistant", turn=turn, text=text, interrupted=interrupted, generation=generation
        )
        self._insert(message)
        return True

    def _insert(self, message: DialogueMessage) -> None:
        key = _order(message)
        at = len(self.messages)
        while at > 0 and _order(self.messages[at - 1]) > key:
            at -= 1
        self.messages.insert(at, message)
        del self.messages[: max(0, len(self.messages) - self.limit)]

    def prompt(self, turn: int) -> list[ChatMessage]:
        """The conversation the reply to ``turn`` answers: everything said before that reply.

        Consecutive messages of one role (a turn whose reply was cancelled before anything played) are
        joined, since chat APIs expect the roles to alternate.
        """
        chat: list[ChatMessage] = []
        for m in self.messages:
            if m.turn > turn or (m.turn == turn and m.role == "assistant"):
                continue
            if chat and chat[-1].role == m.role:
                chat[-1] = ChatMessage(role=m.role, text=f"{chat[-1].text} {m.text}")
            else:
                chat.append(ChatMessage(role=m.role, text=m.text))
        return chat


def _order(message: DialogueMessage) -> tuple[int, int]:
    return message.turn, 0 if message.role == "user" else 1
