"""The Whisper and bench engine streams on their own: what comes out of ``results()`` and when."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from services.stt.engines.base import SttResult, SttStream
from services.stt.engines.bench import BenchEngine
from services.stt.engines.whisper import WhisperEngine, WhisperOptions
from tests.test_stt import SILENCE, SPOKEN, normal, speech_frames


async def push(stream: SttStream, frames: list[bytes]) -> None:
    for pcm in frames:
        await stream.push(pcm)


async def next_result(results: AsyncIterator[SttResult]) -> SttResult:
    return await asyncio.wait_for(anext(results), 60)


@pytest.mark.slow
async def test_whisper_gives_partials_of_an_open_segment_and_one_flushed_final_per_end() -> None:
    engine = WhisperEngine(WhisperOptions(partial_interval_s=0.5))
    stream = await engine.open("s", "en-US")
    results = aiter(stream.results())
    speech = speech_frames()
    await push(stream, [SILENCE] * 20 + speech[:5])
    await stream.speech_started()
    await push(stream, speech[5:60])  # 1.1 s of the segment: one partial is due after 0.5 s
    partial = await next_result(results)
    assert not partial.is_final and not partial.flushed
    assert normal(partial.text).split()[:3] == ["what", "is", "the"]
    await push(stream, speech[60:] + [SILENCE] * 10)
    await stream.speech_ended()
    final = await next_result(results)
    assert final.is_final and final.flushed and normal(final.text) == SPOKEN
    assert 0.0 < final.confidence <= 1.0 and final.words == ()  # word timings are off by default
    await stream.speech_ended()  # no segment open: still answered, with nothing
    empty = await next_result(results)
    assert (empty.text, empty.is_final, empty.flushed) == ("", True, True)
    await stream.aclose()
    assert [r async for r in results] == []
    await engine.aclose()


@pytest.mark.slow
async def test_whisper_word_timings_are_in_ms_from_the_first_frame_pushed() -> None:
    engine = WhisperEngine(WhisperOptions(word_timings=True, preroll_s=0.3))
    stream = await engine.open("s", "en")
    results = aiter(stream.results())
    speech = speech_frames()
    await push(stream, [SILENCE] * 20)  # 400 ms; the pre-roll keeps the last 300 of them
    await stream.speech_started()
    await push(stream, speech + [SILENCE] * 10)
    await stream.speech_ended()
    final = await next_result(results)
    assert normal(" ".join(w.text for w in final.words)) == SPOKEN
    starts = [w.start_ms for w in final.words]
    assert starts == sorted(starts)
    assert starts[0] >= 100  # the segment (pre-roll included) starts 100 ms into the stream
    assert final.words[-1].end_ms <= (20 + len(speech) + 10) * 20
    await stream.aclose()
    await engine.aclose()


async def test_bench_answers_every_end_of_speech_once_with_its_text() -> None:
    stream = await BenchEngine(text="Hello there.", delay_s=0.01).open("s", "en")
    results = aiter(stream.results())
    for _ in range(3):
        await stream.speech_started()
        await push(stream, [SILENCE] * 5)
        await stream.speech_ended()
    got = [await next_result(results) for _ in range(3)]
    assert all((r.text, r.is_final, r.flushed) == ("Hello there.", True, True) for r in got)
    await stream.speech_ended()
    await stream.aclose()  # the final not yet due is dropped
    assert [r async for r in results] == []
