"""Tools the agent can use mid-reply: a registry, the specs the LLM sees, and their execution.

A tool call spends the caller's time in the middle of a turn, so every tool has its own timeout and
the calls of one reply run concurrently. A failing tool never ends the reply: an error, a timeout or
a call the model got wrong comes back as result text that the model reads and talks around ("I
can't look that up right now"), and is logged and counted. Arguments are not logged (they are the
caller's data). The two demo tools need no network: the time in a time zone, and an in-memory
appointment book.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from prometheus_client import Counter, Histogram

from services.dialogue.engines.base import ToolCall, ToolSpec
from services.runtime.config import ConfigError, setting, settings_class
from services.runtime.metrics import LATENCY_BUCKETS

log = logging.getLogger("voicebus.dialogue")

tool_calls = Counter(
    "vb_tool_calls_total", "Tool calls by outcome: ok, error, timeout, invalid", ["tool", "outcome"]
)
tool_seconds = Histogram("vb_tool_call_seconds", "Tool call duration", ["tool"], buckets=LATENCY_BUCKETS)

#: JSON-schema types of tool arguments and the Python types that satisfy them
JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
}


@dataclass(frozen=True, slots=True)
class Tool:
    """A tool: what the model is told about it, the coroutine that runs it, and its time limit.

    ``run`` takes the call's arguments as keywords and returns the text the model reads.
    ``filler`` is a short line the dialogue can speak while the tool runs, instead of silence.
    """

    name: str
    description: str
    run: Callable[..., Awaitable[str]]
    input_schema: Mapping[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})
    timeout_s: float = 2.0
    filler: str = "One moment, please."

    @property
    def spec(self) -> ToolSpec:
        """The definition sent to the LLM."""
        return ToolSpec(self.name, self.description, dict(self.input_schema))


class ToolRegistry:
    """The tools of an agent, looked up by name."""

    def __init__(self, tools: Iterable[Tool] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        for tool in tools:
            self.add(tool)

    def add(self, tool: Tool) -> None:
        """Register a tool; names are unique (the LLM calls tools by name)."""
        if tool.name in self._tools:
            raise ValueError(f"tool {tool.name!r} is registered twice")
        self._tools[tool.name] = tool

    def get(self, name: str) -> Tool | None:
        """The tool called ``name``, if there is one."""
        return self._tools.get(name)

    def specs(self) -> tuple[ToolSpec, ...]:
        """Definitions of every tool, in registration order (stable: the prompt cache keys on it)."""
        return tuple(tool.spec for tool in self._tools.values())

    async def run_tool_calls(self, calls: Sequence[ToolCall]) -> list[tuple[ToolCall, str]]:
        """Run the calls concurrently, each under its tool's timeout; (call, result text) in call order.

        The pairs are what ``LlmRequest.tool_results`` takes. Never raises for a tool's failure.
        """
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(self._run(call), name=f"tool-{call.name}") for call in calls]
        return [(call, task.result()) for call, task in zip(calls, tasks)]

    async def _run(self, call: ToolCall) -> str:
        tool = self._tools.get(call.name)
        if tool is None:
            return self._failed(call.name, "invalid", f"there is no tool named {call.name!r}")
        if problem := argument_problem(tool.input_schema, call.arguments):
            return self._failed(call.name, "invalid", f"{call.name} was called wrongly: {problem}")
        start = time.perf_counter()
        try:
            async with asyncio.timeout(tool.timeout_s):
                result = await tool.run(**call.arguments)
        except TimeoutError:
            return self._failed(
                call.name, "timeout", f"{call.name} did not answer within {tool.timeout_s:g} s"
            )
        except Exception as err:
            log.warning("tool %s raised %s", call.name, type(err).__name__, exc_info=True)
            return self._failed(call.name, "error", f"{call.name} failed; it may work if tried again later")
        finally:
            tool_seconds.labels(call.name).observe(time.perf_counter() - start)
        tool_calls.labels(call.name, "ok").inc()
        return result

    @staticmethod
    def _failed(name: str, outcome: str, text: str) -> str:
        tool_calls.labels(name, outcome).inc()
        log.warning("tool call %s: %s", outcome, text)
        return f"error: {text}"


def argument_problem(schema: Mapping[str, Any], arguments: Mapping[str, Any]) -> str | None:
    """What is wrong with the arguments for a flat object schema (required, known, typed), if anything."""
    properties: Mapping[str, Any] = schema.get("properties", {})
    if missing := [name for name in schema.get("required", ()) if name not in arguments]:
        return f"missing {', '.join(missing)}"
    for name, value in arguments.items():
        if name not in properties:
            return f"unknown argument {name!r}"
        expected = JSON_TYPES.get(properties[name].get("type", ""), (object,))
        if not isinstance(value, expected) or (isinstance(value, bool) and bool not in expected):
            return f"{name} must be a {properties[name]['type']}"
    return None


def current_time_tool(clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> Tool:
    """The date and time in a time zone: for opening hours, 'tomorrow', 'in an hour'."""

    async def current_time(timezone: str) -> str:
        try:
            now = clock().astimezone(ZoneInfo(timezone))
        except (ZoneInfoNotFoundError, ValueError):
            return f"error: {timezone!r} is not a known time zone; use a name like Europe/London"
        return f"{now:%A %d %B %Y, %H:%M} in {timezone} (UTC{now:%z})"

    return Tool(
        name="current_time",
        description="The current date and time in a time zone. Use it before talking about today, "
        "tomorrow, opening hours or how long until an appointment.",
        input_schema={
            "type": "object",
            "properties": {"timezone": {"type": "string", "description": "IANA name, e.g. Europe/London"}},
            "required": ["timezone"],
        },
        run=current_time,
        filler="Let me check the time.",
    )


#: the demo practice's appointments (no real data): caller name -> bookings
DEMO_APPOINTMENTS: dict[str, list[str]] = {
    "dana whitfield": ["dental check-up with Dr. Okafor on Thursday 12 March 2026 at 09:30"],
    "sam patel": [
        "hygienist cleaning with Lee Moreno on Monday 9 March 2026 at 14:00",
        "filling with Dr. Okafor on Friday 20 March 2026 at 11:15",
    ],
}


def appointment_tool(book: Mapping[str, list[str]] = DEMO_APPOINTMENTS) -> Tool:
    """Look up a caller's upcoming appointments by name in an in-memory book."""

    async def find_appointment(name: str) -> str:
        found = book.get(" ".join(name.lower().split()))
        if not found:
            return f"No upcoming appointments are booked under the name {name}."
        return f"{name} has: " + "; ".join(found) + "."

    return Tool(
        name="find_appointment",
        description="Find a caller's upcoming appointments by their full name. Ask for the name first.",
        input_schema={
            "type": "object",
            "properties": {"name": {"type": "string", "description": "the caller's full name"}},
            "required": ["name"],
        },
        run=find_appointment,
        filler="Let me look that up.",
    )


DEMO_TOOLS: dict[str, Callable[[], Tool]] = {
    "current_time": current_time_tool,
    "find_appointment": appointment_tool,
}


@settings_class
@dataclass(frozen=True, kw_only=True)
class ToolSettings:
    """Which tools the agent has and how long each may take."""

    tools: tuple[str, ...] = setting(
        "VB_TOOLS", ("current_time", "find_appointment"), "Tools the agent may call (comma-separated)."
    )
    timeout_s: float = setting(
        "VB_TOOL_TIMEOUT", 2.0, "Seconds a tool call may take before it counts as failed."
    )

    def __post_init__(self) -> None:
        if unknown := [name for name in self.tools if name not in DEMO_TOOLS]:
            raise ConfigError(f"VB_TOOLS: unknown tools {unknown}; known: {sorted(DEMO_TOOLS)}")
        if self.timeout_s <= 0:
            raise ConfigError("VB_TOOL_TIMEOUT must be positive")


def registry(settings: ToolSettings) -> ToolRegistry:
    """The agent's tools as configured."""
    return ToolRegistry(replace(DEMO_TOOLS[name](), timeout_s=settings.timeout_s) for name in settings.tools)
