"""Preemptive generation, with the dialogue as a process on a real nats-server and Claude's fake: the
LLM starts on a final transcript before the turn ends; the reply uses that stream when the turn ends
with the same text, and closes it at the provider (asking again) when the text changed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from proto import events as ev
from proto import subjects as sj
from services.runtime.bus import Bus
from services.runtime.sessions import open_session
from services.tools.stack import Stack
from tests.fakes.anthropic import FakeAnthropic, Reply
from tests.support.tap import Tap
from tests.test_dialogue import reply_to, spoken, user_turn


@pytest.fixture
async def fake(stack: Stack, bus: Bus, session_id: str) -> AsyncIterator[FakeAnthropic]:
    """Claude's fake, and a dialogue replica using it, serving the test's session."""
    async with FakeAnthropic(token_gap_s=0.02) as server:
        env = {
            "VB_LLM_ENGINE": "anthropic",
            "VB_DIALOGUE_PREEMPTIVE": "true",
            "ANTHROPIC_API_KEY": server.api_key,
            "VB_ANTHROPIC_BASE_URL": server.base_url,
        }
        await stack.wait_ready_async([stack.spawn("dialogue", env=env)])
        await open_session(bus, ev.SessionSpec(session=session_id), stages=("dialogue",))
        yield server


def final(session: str, turn: int, text: str) -> ev.Transcript:
    return ev.Transcript(session=session, turn=turn, segment=0, text=text, is_final=True)


async def test_a_turn_ending_with_its_final_transcript_uses_the_early_reply(
    fake: FakeAnthropic, bus: Bus, session_id: str
) -> None:
    fake.queue(Reply(text="It is sunny and warm all day."))
    async with Tap(bus, session_id) as tap:
        await bus.publish(sj.TRANSCRIPT, final(session_id, 1, "How is the weather?"))
        (early,) = await fake.requested(1)
        await asyncio.wait_for(early.done.wait(), 10)  # the whole reply is written before the turn ends
        ended = await bus.publish(sj.TURN, user_turn(session_id, 1, "How is the weather?"))
        chunks = await reply_to(tap, 1)

    assert spoken(chunks) == "It is sunny and warm all day."
    assert len(fake.exchanges) == 1 and not early.client_closed  # the early stream was the reply
    order = [e for _, e, _ in tap.events]
    turn_at = next(n for n, e in enumerate(order) if isinstance(e, ev.UserTurnEnded) and e.seq == ended.seq)
    first_chunk_at = next(n for n, e in enumerate(order) if isinstance(e, ev.ReplyChunk))
    assert first_chunk_at > turn_at  # held until the turn was over


async def test_a_turn_that_changed_after_the_final_closes_the_early_stream_and_asks_again(
    fake: FakeAnthropic, bus: Bus, session_id: str
) -> None:
    fake.queue(Reply(text=" ".join(f"word{i}." for i in range(200))), Reply(text="Paris is sunny today."))
    async with Tap(bus, session_id) as tap:
        await bus.publish(sj.TRANSCRIPT, final(session_id, 1, "How is the weather"))
        await fake.requested(1)
        await bus.publish(sj.TURN, user_turn(session_id, 1, "How is the weather in Paris?"))
        chunks = await reply_to(tap, 1)
        early, asked = await fake.requested(2)
        await asyncio.wait_for(early.done.wait(), 10)

    assert early.client_closed and early.sent.count("content_block_delta") < 200
    assert spoken(chunks) == "Paris is sunny today."
    assert "Paris" in str(asked.body["messages"][-1])
