"""The Anthropic engine through the real SDK against the local fake Messages API."""

from __future__ import annotations

import asyncio
import logging
import socket
import traceback
from collections.abc import AsyncIterator
from itertools import pairwise
from pathlib import Path

import aiohttp
import anthropic
import pytest

from services.dialogue.engines.anthropic import AnthropicEngine, AnthropicSettings, request_params
from services.dialogue.engines.base import ChatMessage, LlmDelta, LlmRequest, TextDelta, ToolCall, Usage
from services.dialogue.tools import ToolRegistry, appointment_tool, current_time_tool
from services.runtime.config import load
from services.runtime.resilience import (
    ProviderError,
    ProviderRejected,
    ProviderTimeout,
    ProviderUnavailable,
)
from tests.fakes.anthropic import FakeAnthropic, Reply, split_deltas

KEY = "sk-ant-api03-Zq7SECRETkey0123456789abcdef"
TOOLS = ToolRegistry([current_time_tool(), appointment_tool()])


def ask(text: str = "Can I move my appointment?") -> LlmRequest:
    return LlmRequest(
        instructions="You are the receptionist of a dental practice. Keep answers short.",
        messages=[ChatMessage("user", text)],
        tools=TOOLS.specs(),
    )


@pytest.fixture
async def fake() -> AsyncIterator[FakeAnthropic]:
    async with FakeAnthropic(api_key=KEY) as server:
        yield server


def make_engine(base_url: str, **overrides: object) -> AnthropicEngine:
    settings = dict(api_key=KEY, base_url=base_url, first_token_s=1.5, stall_s=1.0) | overrides
    return AnthropicEngine(AnthropicSettings(**settings))  # type: ignore[arg-type]


@pytest.fixture
async def engine(fake: FakeAnthropic) -> AsyncIterator[AnthropicEngine]:
    e = make_engine(fake.base_url)
    yield e
    await e.aclose()


async def collect(engine: AnthropicEngine, request: LlmRequest) -> list[LlmDelta]:
    return [d async for d in engine.stream(request)]


def text_of(deltas: list[LlmDelta]) -> str:
    return "".join(d.text for d in deltas if isinstance(d, TextDelta))


async def test_a_reply_streams_as_text_deltas_then_usage_with_cache_fields(
    fake: FakeAnthropic, engine: AnthropicEngine
) -> None:
    fake.queue(Reply(text="Of course. Which day would suit you better, Tuesday or Thursday?"))
    deltas = await collect(engine, ask())
    texts = [d for d in deltas if isinstance(d, TextDelta)]
    assert len(texts) == len(split_deltas("Of course. Which day would suit you better, Tuesday or Thursday?"))
    assert text_of(deltas) == "Of course. Which day would suit you better, Tuesday or Thursday?"
    usage = deltas[-1]
    assert isinstance(usage, Usage)
    assert usage.output_tokens == len(texts)
    assert usage.cache_write_tokens > 0 and usage.cache_read_tokens == 0  # first call writes the cache

    (exchange,) = fake.exchanges
    body = exchange.body
    assert exchange.headers["authorization"] == f"Bearer {KEY}"
    assert exchange.headers["anthropic-version"]
    assert body["model"] == AnthropicSettings().model and body["stream"] is True
    assert body["system"][0]["cache_control"] == {"type": "ephemeral"}
    assert body["tools"][-1]["cache_control"] == {"type": "ephemeral"}
    assert all("cache_control" not in t for t in body["tools"][:-1])
    assert not {"temperature", "top_p", "top_k"} & set(body)


async def test_a_long_call_reads_a_growing_share_from_the_prompt_cache(
    fake: FakeAnthropic, engine: AnthropicEngine
) -> None:
    history: list[ChatMessage] = []
    shares = []
    for turn in range(6):
        history.append(ChatMessage("user", f"Question number {turn}: what about the next free slot?"))
        fake.queue(Reply(text=f"Answer {turn}: the next free slot is on day {turn + 3} at nine."))
        deltas = await collect(engine, LlmRequest(instructions="Be brief.", messages=list(history)))
        usage = deltas[-1]
        assert isinstance(usage, Usage)
        total = usage.input_tokens + usage.cache_read_tokens + usage.cache_write_tokens
        shares.append(usage.cache_read_tokens / total)
        history.append(ChatMessage("assistant", text_of(deltas)))
    assert shares[0] == 0
    assert all(later > earlier for earlier, later in pairwise(shares)), shares


async def test_a_tool_call_round_trip(fake: FakeAnthropic, engine: AnthropicEngine) -> None:
    fake.queue(
        Reply(text="Let me look that up.", tool=("find_appointment", {"name": "Sam Patel"})),
        Reply(text="You have two appointments, the first on Monday the ninth."),
    )
    request = ask("When is my next appointment? I'm Sam Patel.")
    first = await collect(engine, request)
    calls = [d for d in first if isinstance(d, ToolCall)]
    assert [(c.name, c.arguments) for c in calls] == [("find_appointment", {"name": "Sam Patel"})]
    results = await TOOLS.run_tool_calls(calls)
    follow_up = LlmRequest(
        instructions=request.instructions,
        messages=[*request.messages, ChatMessage("assistant", text_of(first))],
        tools=request.tools,
        tool_results=results,
    )
    second = await collect(engine, follow_up)
    assert text_of(second) == "You have two appointments, the first on Monday the ninth."

    body = fake.exchanges[1].body
    assert fake.exchanges[1].status == 200  # the fake checked every tool_use has its tool_result
    said, use = body["messages"][-2]["content"]
    assert said["text"] == "Let me look that up." and use["id"] == calls[0].id
    (result,) = body["messages"][-1]["content"]
    assert result["tool_use_id"] == calls[0].id and "Sam Patel has:" in result["content"]


async def test_the_fake_refuses_sampling_parameters_as_the_api_does(fake: FakeAnthropic) -> None:
    client = anthropic.AsyncAnthropic(api_key=KEY, base_url=fake.base_url, max_retries=0)
    params = request_params(ask(), "claude-haiku-5-5")
    with pytest.raises(anthropic.BadRequestError, match="temperature"):
        await client.messages.create(**params, stream=True, extra_body={"temperature": 0.2})
    await client.close()


async def test_the_fake_speaks_sse_with_event_lines_and_ends_the_body(fake: FakeAnthropic) -> None:
    body = request_params(ask(), "claude-haiku-5-5") | {"stream": True}
    headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}  # what older SDKs send
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{fake.base_url}/v1/messages", json=body, headers=headers) as response,
    ):
        assert response.status == 200 and response.content_type == "text/event-stream"
        raw = await response.text()  # returns only because the fake ends the body
    events = [block.splitlines() for block in raw.strip().split("\n\n")]
    assert all(lines[0].startswith("event: ") and lines[1].startswith("data: {") for lines in events)
    names = [lines[0].removeprefix("event: ") for lines in events]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]


async def test_a_bad_key_is_rejected_without_retry(fake: FakeAnthropic) -> None:
    engine = AnthropicEngine(AnthropicSettings(api_key="sk-ant-wrong-key-000000", base_url=fake.base_url))
    with pytest.raises(ProviderRejected) as err:
        await collect(engine, ask())
    await engine.aclose()
    assert err.value.status == 401 and not err.value.retryable
    assert [e.retry_count for e in fake.exchanges] == [0]


@pytest.mark.parametrize(
    ("first", "retry_after"),
    [(Reply(status=429, retry_after=0.05), 0.05), (Reply(status=529), None), (Reply(status=500), None)],
)
async def test_a_retryable_status_is_retried_once_within_the_budget(
    fake: FakeAnthropic, engine: AnthropicEngine, first: Reply, retry_after: float | None
) -> None:
    fake.queue(first, Reply(text="Yes, that works."))
    deltas = await collect(engine, ask())
    assert text_of(deltas) == "Yes, that works."
    assert [(e.status, e.retry_count) for e in fake.exchanges] == [(first.status, 0), (200, 1)]


@pytest.mark.parametrize("status", [429, 500, 529])
async def test_a_status_that_persists_becomes_unavailable(
    fake: FakeAnthropic, engine: AnthropicEngine, status: int
) -> None:
    fake.queue(Reply(status=status, retry_after=0.01), Reply(status=status, retry_after=0.01))
    with pytest.raises(ProviderUnavailable) as err:
        await collect(engine, ask())
    assert err.value.status == status and err.value.retryable
    assert err.value.retry_after_s == pytest.approx(0.01)
    assert [e.retry_count for e in fake.exchanges] == [0, 1]


async def test_a_retry_after_beyond_the_budget_fails_over_at_once(
    fake: FakeAnthropic, engine: AnthropicEngine
) -> None:
    fake.queue(Reply(status=429, retry_after=30))
    with pytest.raises(ProviderUnavailable) as err:
        await collect(engine, ask())
    assert err.value.retry_after_s == 30 and err.value.status == 429
    assert len(fake.exchanges) == 1  # the SDK did not sleep 30 s to retry


async def test_a_slow_first_byte_within_the_budget_is_waited_for(
    fake: FakeAnthropic, engine: AnthropicEngine
) -> None:
    fake.queue(Reply(text="Here I am.", first_byte_delay_s=0.2))
    assert text_of(await collect(engine, ask())) == "Here I am."


async def test_no_first_byte_within_the_budget_is_a_timeout_and_hangs_up(fake: FakeAnthropic) -> None:
    engine = make_engine(fake.base_url, first_token_s=0.3)
    fake.queue(Reply(first_byte_delay_s=30))
    with pytest.raises(ProviderTimeout, match="no first byte"):
        await collect(engine, ask())
    await engine.aclose()
    (exchange,) = fake.exchanges
    await asyncio.wait_for(exchange.done.wait(), 10)
    assert exchange.client_closed


@pytest.mark.parametrize(("fault", "error"), [("error", ProviderUnavailable), ("drop", ProviderUnavailable)])
async def test_a_stream_broken_mid_reply_is_unavailable_and_not_retried(
    fake: FakeAnthropic, engine: AnthropicEngine, fault: str, error: type[ProviderError]
) -> None:
    fake.queue(Reply(text="One two three four five six.", fault=fault, fault_after=3))  # type: ignore[arg-type]
    got: list[LlmDelta] = []
    with pytest.raises(error) as err:
        async for delta in engine.stream(ask()):
            got.append(delta)
    assert text_of(got) == "One two three"
    assert err.value.retryable
    assert len(fake.exchanges) == 1  # mid-stream failures are the fallback chain's to handle


async def test_a_stall_mid_reply_is_a_timeout_and_hangs_up(fake: FakeAnthropic) -> None:
    engine = make_engine(fake.base_url, stall_s=0.3)
    fake.queue(Reply(text="One two three four.", fault="stall", fault_after=2))
    got: list[LlmDelta] = []
    with pytest.raises(ProviderTimeout, match="stalled"):
        async for delta in engine.stream(ask()):
            got.append(delta)
    await engine.aclose()
    assert text_of(got) == "One two"
    await asyncio.wait_for(fake.exchanges[0].done.wait(), 10)
    assert fake.exchanges[0].client_closed


async def test_connection_refused_is_unavailable() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    engine = make_engine(f"http://127.0.0.1:{port}")
    with pytest.raises(ProviderUnavailable, match="connection"):
        await collect(engine, ask())
    await engine.aclose()


@pytest.mark.parametrize("how", ["aclose", "cancel"])
async def test_a_barge_in_closes_the_connection_mid_reply(fake: FakeAnthropic, how: str) -> None:
    fake.token_gap_s = 0.02
    words = " ".join(f"word{i}" for i in range(200))
    fake.queue(Reply(text=words))
    engine = make_engine(fake.base_url)
    got: list[LlmDelta] = []
    three = asyncio.Event()

    async def consume() -> None:
        stream = engine.stream(ask())
        async for delta in stream:
            got.append(delta)
            if len(got) == 3:
                three.set()
                if how == "aclose":
                    await stream.aclose()  # type: ignore[attr-defined]
                    return

    task = asyncio.create_task(consume(), name="consume-reply")
    await asyncio.wait_for(three.wait(), 10)
    if how == "cancel":
        task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    (exchange,) = fake.exchanges
    await asyncio.wait_for(exchange.done.wait(), 10)
    assert exchange.client_closed
    assert exchange.sent.count("content_block_delta") < 200  # generation stopped early
    await engine.aclose()


async def test_no_api_key_in_logs_or_errors(fake: FakeAnthropic, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    engine = make_engine(fake.base_url, stall_s=0.3)
    seen: list[str] = [repr(engine.settings), str(engine.settings)]
    fake.queue(
        Reply(text="fine"),
        Reply(status=500),
        Reply(status=500),
        Reply(fault="error", fault_after=0),
        Reply(fault="drop", fault_after=1),
        Reply(fault="stall", fault_after=1),
    )
    for _ in range(5):
        try:
            await collect(engine, ask())
        except ProviderError as err:
            logging.getLogger("voicebus.dialogue").exception("reply failed: %s", err)
            seen += [str(err), repr(err), "".join(traceback.format_exception(err))]
    bad = make_engine(fake.base_url, api_key=KEY[::-1])
    with pytest.raises(ProviderRejected) as rejected:
        await collect(bad, ask())
    seen.append("".join(traceback.format_exception(rejected.value)))
    await engine.aclose()
    await bad.aclose()
    seen += [r.getMessage() for r in caplog.records] + [caplog.text]
    assert len(seen) > 20 and any("HTTP Request" in line for line in seen)  # the SDK did log
    for line in seen:
        assert KEY not in line and KEY[::-1] not in line and KEY[12:30] not in line


def test_settings_read_the_key_from_a_secret_file(tmp_path: Path) -> None:
    secret = tmp_path / "key"
    secret.write_text(KEY + "\n")
    settings = load(AnthropicSettings, environ={"ANTHROPIC_API_KEY_FILE": str(secret)})
    assert settings.api_key == KEY
    assert KEY not in repr(settings)


def test_request_body_carries_tool_results_after_what_was_said() -> None:
    call = ToolCall("toolu_1", "current_time", {"timezone": "Europe/Paris"})
    request = LlmRequest(
        instructions="Be brief.",
        messages=[ChatMessage("user", "What time is it in Paris?"), ChatMessage("assistant", "")],
        tool_results=[(call, "14:05")],
    )
    body = request_params(request, "m")
    assert "tools" not in body
    roles = [m["role"] for m in body["messages"]]
    assert roles == ["user", "assistant", "user"]  # the empty assistant text was dropped, not sent
    assert body["messages"][1]["content"] == [
        {"type": "tool_use", "id": "toolu_1", "name": "current_time", "input": {"timezone": "Europe/Paris"}}
    ]
    assert body["messages"][2]["content"][-1]["cache_control"] == {"type": "ephemeral"}
