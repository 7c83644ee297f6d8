"""The dialogue's pure parts: the history, and the scripted and bench engines."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from proto import codec
from proto.state import DialogueMessage, DialogueState
from services.dialogue.config import DialogueConfig
from services.dialogue.engines import bench, create, scripted
from services.dialogue.engines.base import ChatMessage, LlmRequest, TextDelta, Usage
from services.dialogue.history import History
from services.runtime.config import ConfigError, load


def test_history_keeps_turn_order_when_a_playout_report_comes_late() -> None:
    history = History([], limit=10)
    history.add_user(1, "Hi there")
    history.add_user(2, "What time is it")  # the reply to turn 1 is still playing
    assert history.add_agent(1, 0, "Hello, how can", interrupted=True)
    assert [(m.role, m.turn) for m in history.messages] == [("user", 1), ("assistant", 1), ("user", 2)]
    assert history.prompt(2) == [
        ChatMessage("user", "Hi there"),
        ChatMessage("assistant", "Hello, how can"),
        ChatMessage("user", "What time is it"),
    ]
    assert history.messages[1].interrupted


def test_prompt_leaves_out_the_reply_being_generated_and_later_turns() -> None:
    history = History([], limit=10)
    history.add_agent(0, 0, "Welcome!", interrupted=False)
    for turn in (1, 2):
        history.add_user(turn, f"question {turn}")
        history.add_agent(turn, 0, f"answer {turn}", interrupted=False)
    # regenerating turn 1 after a takeover: its own earlier answer and turn 2 are not part of it
    assert history.prompt(1) == [ChatMessage("assistant", "Welcome!"), ChatMessage("user", "question 1")]
    assert len(history.prompt(2)) == 4


def test_prompt_joins_turns_whose_reply_was_never_heard() -> None:
    history = History([], limit=10)
    history.add_user(1, "Tell me a story")
    history.add_user(2, "actually, the weather")
    assert history.prompt(2) == [ChatMessage("user", "Tell me a story actually, the weather")]


def test_a_regenerated_reply_replaces_the_earlier_report_and_duplicates_are_ignored() -> None:
    history = History([], limit=10)
    history.add_user(1, "Hi")
    assert history.add_agent(1, 0, "Hel", interrupted=True)
    assert not history.add_agent(1, 0, "Hel", interrupted=True)  # delivered again
    assert history.add_agent(1, 1, "Hello there.", interrupted=False)
    assert [(m.text, m.generation) for m in history.messages if m.role == "assistant"] == [
        ("Hello there.", 1)
    ]


def test_history_is_bounded_and_round_trips_in_the_state_record() -> None:
    state = DialogueState()
    history = History(state.history, limit=4)
    for turn in range(1, 5):
        history.add_user(turn, f"q{turn}")
        history.add_agent(turn, 0, f"a{turn}", interrupted=turn == 4)
    assert [m.text for m in state.history] == ["q3", "a3", "q4", "a4"]
    restored = codec.decode_record(DialogueState, codec.encode(state))
    assert restored.history[-1] == DialogueMessage(role="assistant", turn=4, text="a4", interrupted=True)


def request(*texts: str) -> LlmRequest:
    roles = ["user", "assistant"]
    return LlmRequest(
        instructions="Be brief.",
        messages=[ChatMessage(roles[i % 2], t) for i, t in enumerate(texts)],  # type: ignore[arg-type]
    )


async def collect(engine: scripted.ScriptedEngine | bench.BenchEngine, req: LlmRequest) -> list[object]:
    return [d async for d in engine.stream(req)]


async def test_scripted_engine_follows_its_script_word_by_word(tmp_path: Path) -> None:
    script = tmp_path / "script.json"
    rules = [
        {"match": r"\bweather\b", "reply": "Sunny and warm."},
        {"match": "remember", "reply": "I was given {messages} messages: {text}"},
    ]
    script.write_text(json.dumps(rules))
    engine = create(load(DialogueConfig, environ={"VB_LLM_ENGINE": "scripted", "VB_LLM_SCRIPT": str(script)}))
    assert isinstance(engine, scripted.ScriptedEngine)
    deltas = await collect(engine, request("How is the WEATHER?"))
    assert deltas[:-1] == [TextDelta("Sunny"), TextDelta(" and"), TextDelta(" warm.")]
    assert isinstance(deltas[-1], Usage) and deltas[-1].output_tokens == 3
    assert (
        engine.reply_to(request("hi", "hello", "do you remember?"))
        == "I was given 3 messages: do you remember?"
    )
    assert engine.reply_to(request("good morning")) == "You said: good morning."


def test_a_broken_script_is_refused_with_its_variable(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('[{"match": "(unclosed", "reply": "x"}]')
    with pytest.raises(ConfigError, match="VB_LLM_SCRIPT"):
        scripted.load_script(str(bad))
    with pytest.raises(ConfigError, match="unknown dialogue engine gpt-7"):
        create(load(DialogueConfig, environ={"VB_LLM_ENGINE": "gpt-7"}))


async def test_bench_engine_keeps_its_absolute_schedule() -> None:
    engine = bench.BenchEngine()
    loop = asyncio.get_running_loop()
    start = loop.time()
    times: list[float] = []
    text = ""
    async for delta in engine.stream(request("anything")):
        if isinstance(delta, TextDelta):
            times.append(loop.time() - start)
            text += delta.text
    assert text == " " + bench.REPLY
    assert len(times) == 20
    # never early: token i is due at 200 ms + i * 10 ms after the request
    assert all(t >= bench.FIRST_TOKEN_S + i * bench.TOKEN_INTERVAL_S - 0.001 for i, t in enumerate(times))
