"""The LLM fallback chain: Claude (real SDK against the fake) first, a second engine behind it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from services.dialogue.engines.anthropic import AnthropicEngine, AnthropicSettings
from services.dialogue.engines.base import (
    ChatMessage,
    LlmDelta,
    LlmEngine,
    LlmRequest,
    TextDelta,
    ToolCall,
    Usage,
)
from services.dialogue.engines.fallback import FallbackLlmEngine, FallbackSettings
from services.runtime.resilience import ProviderError, ProviderUnavailable
from tests.fakes.anthropic import FakeAnthropic, Reply, split_deltas

KEY = "sk-ant-api03-fallback-test-key-0123456789"
REQUEST = LlmRequest(
    instructions="You are the receptionist of a dental practice.",
    messages=[ChatMessage("user", "When is my appointment?")],
)


class ScriptedEngine(LlmEngine):
    """A second engine (stands in for the local model): streams its text, records what it was asked."""

    def __init__(
        self,
        name: str,
        text: str = " on Thursday at nine thirty.",
        *,
        tool: ToolCall | None = None,
        fail_after: int | None = None,
        hang: bool = False,
    ) -> None:
        self.name, self.text, self.tool, self.fail_after, self.hang = name, text, tool, fail_after, hang
        self.requests: list[LlmRequest] = []
        self.started = asyncio.Event()

    async def stream(self, request: LlmRequest) -> AsyncIterator[LlmDelta]:  # type: ignore[override]
        self.requests.append(request)
        self.started.set()
        if self.hang:
            await asyncio.Event().wait()
        items: list[LlmDelta] = [self.tool] if self.tool else []
        items += [TextDelta(piece) for piece in split_deltas(self.text)]
        for i, item in enumerate(items):
            if i == self.fail_after:
                raise ProviderUnavailable(self.name, "scripted failure")
            yield item
        if self.fail_after is not None:  # after everything it had to say
            raise ProviderUnavailable(self.name, "scripted failure")
        yield Usage(output_tokens=len(items))


@pytest.fixture
async def fake() -> AsyncIterator[FakeAnthropic]:
    async with FakeAnthropic(api_key=KEY) as server:
        yield server


@pytest.fixture
async def claude(fake: FakeAnthropic) -> AsyncIterator[AnthropicEngine]:
    engine = AnthropicEngine(AnthropicSettings(api_key=KEY, base_url=fake.base_url, first_token_s=1.5))
    yield engine
    await engine.aclose()


async def reply(chain: LlmEngine, request: LlmRequest = REQUEST) -> str:
    return "".join([d.text async for d in chain.stream(request) if isinstance(d, TextDelta)])


async def test_a_dead_primary_is_passed_over_then_skipped_by_its_breaker(
    fake: FakeAnthropic, claude: AnthropicEngine
) -> None:
    fake.default = Reply(status=529)
    local = ScriptedEngine("local", "Your appointment is on Thursday.")
    chain = FallbackLlmEngine([claude, local], FallbackSettings(breaker_threshold=2))
    for _ in range(2):
        assert await reply(chain) == "Your appointment is on Thursday."
    assert [e.retry_count for e in fake.exchanges] == [0, 1, 0, 1]  # each reply: one try and one retry
    assert local.requests == [REQUEST, REQUEST]  # the same request: nothing had been said yet

    assert await reply(chain) == "Your appointment is on Thursday."
    assert len(fake.exchanges) == 4  # the breaker is open: Claude was not asked again
    assert len(local.requests) == 3


async def test_a_reply_broken_mid_stream_is_continued_by_the_next_engine(
    fake: FakeAnthropic, claude: AnthropicEngine
) -> None:
    fake.queue(Reply(text="Your appointment is on Monday at ten.", fault="drop", fault_after=3))
    local = ScriptedEngine("local", " on Thursday at nine thirty.")
    chain = FallbackLlmEngine([claude, local])
    assert await reply(chain) == "Your appointment is on Thursday at nine thirty."
    (asked,) = local.requests
    assert asked.messages == REQUEST.messages
    assert asked.instructions.startswith(REQUEST.instructions)
    assert '"Your appointment is"' in asked.instructions and "without repeating" in asked.instructions


async def test_closing_the_chain_mid_reply_closes_claudes_connection(
    fake: FakeAnthropic, claude: AnthropicEngine
) -> None:
    fake.token_gap_s = 0.02
    fake.queue(Reply(text=" ".join(f"w{i}" for i in range(200))))
    local = ScriptedEngine("local")
    chain = FallbackLlmEngine([claude, local])
    stream = chain.stream(REQUEST)
    got = [await anext(stream) for _ in range(3)]
    await stream.aclose()  # type: ignore[attr-defined]
    assert all(isinstance(d, TextDelta) for d in got)
    (exchange,) = fake.exchanges
    await asyncio.wait_for(exchange.done.wait(), 10)
    assert exchange.client_closed
    assert not local.requests  # a barge-in is not a failure: no switch
    breaker = chain.chain[0][1]
    assert breaker.failures == 0 and not breaker.is_open


async def test_a_failure_after_a_tool_call_ends_the_reply_with_the_call() -> None:
    call = ToolCall("toolu_9", "find_appointment", {"name": "Sam Patel"})
    primary = ScriptedEngine("primary", "", tool=call, fail_after=1)
    local = ScriptedEngine("local")
    deltas = [d async for d in FallbackLlmEngine([primary, local]).stream(REQUEST)]
    assert deltas == [call]  # the dialogue runs the tool and asks again; no second engine mid-call
    assert not local.requests


async def test_when_every_engine_fails_the_last_error_surfaces_then_the_chain_fails_fast() -> None:
    first, second = ScriptedEngine("a", fail_after=0), ScriptedEngine("b", fail_after=0)
    chain = FallbackLlmEngine([first, second], FallbackSettings(breaker_threshold=1))
    with pytest.raises(ProviderError, match="b: scripted failure"):
        await reply(chain)
    with pytest.raises(ProviderUnavailable, match="every engine is skipped"):
        await reply(chain)
    assert len(first.requests) == len(second.requests) == 1


async def test_an_abandoned_trial_does_not_leave_the_breaker_open() -> None:
    primary = ScriptedEngine("primary", fail_after=0)
    local = ScriptedEngine("local", "Fine.")
    # threshold 1 and a cooldown that has passed by the next call: every call after a failure is a trial
    chain = FallbackLlmEngine(
        [primary, local], FallbackSettings(breaker_threshold=1, breaker_cooldown_s=1e-9)
    )
    assert await reply(chain) == "Fine."  # primary failed: breaker open

    primary.fail_after, primary.hang = None, True
    primary.started.clear()
    task = asyncio.create_task(reply(chain), name="trial-reply")
    await asyncio.wait_for(primary.started.wait(), 10)  # the trial is running
    task.cancel()  # the caller barged in before the trial said anything
    await asyncio.gather(task, return_exceptions=True)

    primary.hang = False
    assert await reply(chain) == " on Thursday at nine thirty."  # the primary gets its next trial
    assert len(primary.requests) == 3


async def test_a_continuation_that_starts_a_new_word_is_spaced_from_what_was_said(
    fake: FakeAnthropic, claude: AnthropicEngine
) -> None:
    fake.queue(Reply(text="Certainly, a table for two.", fault="drop", fault_after=2))
    local = ScriptedEngine("local", "Of course.")  # a local model starts its own sentence, unspaced
    assert await reply(FallbackLlmEngine([claude, local])) == "Certainly, a Of course."


@pytest.mark.parametrize(
    ("said", "then", "joined"),
    [("Certainly, a", "Of course.", "Certainly, a Of course."), ("We open at", " nine.", "We open at nine.")],
)
def test_a_word_left_unfinished_is_joined_and_a_new_one_spaced(said: str, then: str, joined: str) -> None:
    from services.dialogue.engines.fallback import _needs_space

    assert said + (" " if _needs_space(said, then) else "") + then == joined
    assert not _needs_space("a tab", "le")
