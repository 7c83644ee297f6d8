"""The tool registry: specs for the LLM, parallel execution, and failures turned into readable results."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

import pytest

from services.dialogue.engines.base import ToolCall
from services.dialogue.tools import (
    Tool,
    ToolRegistry,
    ToolSettings,
    appointment_tool,
    current_time_tool,
    registry,
    tool_calls,
)
from services.runtime.config import ConfigError, load


def calls_counted(tool: str, outcome: str) -> float:
    return tool_calls.labels(tool, outcome)._value.get()


def test_specs_describe_every_tool_in_registration_order() -> None:
    specs = ToolRegistry([current_time_tool(), appointment_tool()]).specs()
    assert [s.name for s in specs] == ["current_time", "find_appointment"]
    assert specs[1].input_schema["required"] == ["name"]
    with pytest.raises(ValueError, match="twice"):
        ToolRegistry([appointment_tool(), appointment_tool()])


async def test_calls_run_in_parallel_and_a_slow_one_times_out(caplog: pytest.LogCaptureFixture) -> None:
    ready = asyncio.Event()

    async def waits_for_partner(label: str) -> str:
        await ready.wait()  # only finishes if `partner` runs at the same time
        return f"{label} done"

    async def partner(label: str) -> str:
        ready.set()
        return f"{label} done"

    async def hangs(label: str) -> str:
        await asyncio.Event().wait()
        return label

    schema = {"type": "object", "properties": {"label": {"type": "string"}}, "required": ["label"]}
    tools = ToolRegistry(
        [
            Tool("first", "waits", waits_for_partner, schema, timeout_s=10),
            Tool("second", "sets", partner, schema, timeout_s=10),
            Tool("slow", "hangs", hangs, schema, timeout_s=0.05),
        ]
    )
    before = calls_counted("slow", "timeout")
    calls = [
        ToolCall("t1", "first", {"label": "a"}),
        ToolCall("t2", "slow", {"label": "b"}),
        ToolCall("t3", "second", {"label": "c"}),
    ]
    results = await tools.run_tool_calls(calls)
    assert [call for call, _ in results] == calls
    assert [text for _, text in results] == ["a done", "error: slow did not answer within 0.05 s", "c done"]
    assert calls_counted("slow", "timeout") == before + 1
    assert any("timeout" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


async def test_wrong_calls_and_failing_tools_become_results_the_model_can_read() -> None:
    async def broken(name: str) -> str:
        raise RuntimeError("database is down")

    tools = ToolRegistry(
        [Tool("lookup", "fails", broken, appointment_tool().input_schema), appointment_tool()]
    )
    results = await tools.run_tool_calls(
        [
            ToolCall("1", "teleport", {}),
            ToolCall("2", "find_appointment", {}),
            ToolCall("3", "find_appointment", {"name": 7}),
            ToolCall("4", "find_appointment", {"name": "Dana Whitfield", "pin": "1234"}),
            ToolCall("5", "lookup", {"name": "Dana Whitfield"}),
            ToolCall("6", "find_appointment", {"name": "dana  WHITFIELD"}),
        ]
    )
    texts = [text for _, text in results]
    assert texts[0] == "error: there is no tool named 'teleport'"
    assert texts[1] == "error: find_appointment was called wrongly: missing name"
    assert texts[2] == "error: find_appointment was called wrongly: name must be a string"
    assert texts[3] == "error: find_appointment was called wrongly: unknown argument 'pin'"
    assert texts[4].startswith("error: lookup failed") and "database" not in texts[4]
    assert texts[5].startswith("dana  WHITFIELD has: dental check-up with Dr. Okafor")


async def test_current_time_in_a_time_zone() -> None:
    tool = current_time_tool(clock=lambda: datetime(2026, 3, 3, 13, 5, tzinfo=UTC))
    assert (
        await tool.run(timezone="Europe/Paris") == "Tuesday 03 March 2026, 14:05 in Europe/Paris (UTC+0100)"
    )
    assert (await tool.run(timezone="Mars/Olympus")).startswith(
        "error: 'Mars/Olympus' is not a known time zone"
    )


async def test_appointment_lookup_without_a_booking() -> None:
    tool = appointment_tool({"ann lee": ["cleaning on Monday"]})
    assert await tool.run(name="Ann Lee") == "Ann Lee has: cleaning on Monday."
    assert await tool.run(name="Bo Chen") == "No upcoming appointments are booked under the name Bo Chen."


def test_settings_choose_the_tools_and_their_timeout() -> None:
    tools = registry(load(ToolSettings, environ={"VB_TOOLS": "find_appointment", "VB_TOOL_TIMEOUT": "0.5"}))
    assert [s.name for s in tools.specs()] == ["find_appointment"]
    found = tools.get("find_appointment")
    assert found is not None and found.timeout_s == 0.5
    with pytest.raises(ConfigError, match="unknown tools"):
        load(ToolSettings, environ={"VB_TOOLS": "current_time,send_email"})
