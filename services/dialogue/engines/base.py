"""The LLM engine interface: stream a reply to a conversation, cancellable at any token.

``stream`` is an async generator; closing it (``aclose()``, or cancelling the task iterating it)
must close the provider stream (the connection), which is how a barge-in stops generation.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One message of the conversation as the LLM sees it."""

    role: Literal["user", "assistant"]
    text: str


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A tool the LLM may call: name, description and JSON Schema of its input."""

    name: str
    description: str
    input_schema: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TextDelta:
    """Reply text as it is generated."""

    text: str


@dataclass(frozen=True, slots=True)
class ToolStart:
    """The LLM has begun a tool call (its arguments are still streaming): time for a filler line."""

    name: str


@dataclass(frozen=True, slots=True)
class ToolCall:
    """The LLM asks for a tool; the dialogue runs it and continues the reply with its result."""

    id: str
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens the request used (cost telemetry); engines that know them yield one at the end."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    #: the engine that used them (a fallback chain passes on its members' Usage)
    engine: str = ""


LlmDelta = TextDelta | ToolStart | ToolCall | Usage


@dataclass(frozen=True, slots=True)
class LlmRequest:
    """Everything an engine needs for one reply."""

    instructions: str
    messages: Sequence[ChatMessage]
    tools: Sequence[ToolSpec] = ()
    max_tokens: int = 200
    #: Results of tool calls made earlier in this reply, in call order: (call, result text).
    tool_results: Sequence[tuple[ToolCall, str]] = ()


class LlmError(Exception):
    """The engine could not produce the reply; ``retryable`` when asking again may succeed."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class LlmEngine(abc.ABC):
    """Streams replies; loaded once per process, shared by its sessions."""

    name: str = "llm"

    @abc.abstractmethod
    def stream(self, request: LlmRequest) -> AsyncIterator[LlmDelta]:
        """Yield the reply as it is generated; closing the iterator cancels the generation."""

    async def aclose(self) -> None:
        """Release what the engine holds (model, connection pool)."""
