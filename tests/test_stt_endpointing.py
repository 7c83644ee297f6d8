"""Endpointing as pure logic, on a fake clock: which wait a turn gets, what cancels it, what it ends with."""

from __future__ import annotations

import pytest

from services.stt.endpointing import Endpointer, looks_unfinished


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def endpointer(clock: Clock, last_turn: int = 0) -> Endpointer:
    return Endpointer(min_delay_s=0.1, max_delay_s=0.8, last_turn=last_turn, clock=clock)


def segment(ep: Endpointer, clock: Clock, n: int, text: str, *, start_ms: int = 0) -> None:
    """Speech of segment ``n``, its stop, and its flushed final, 0.3 s of clock later."""
    ep.speech_started(n, start_ms)
    ep.speech_stopped(n, start_ms + 1000, speech_end_ts=n + 1)
    clock.now += 0.3
    assert ep.transcript(text, is_final=True, flushed=True) == (ep.turn, n)


@pytest.mark.parametrize(
    ("text", "unfinished"),
    [
        ("What is the weather like today?", False),
        ("Book a table for two.", False),
        ("I think so.", True),  # a known false "unfinished": it costs max_delay, not a cut-off
        ("I want to go to the", True),
        ("Tell me about the weather and", True),
        ("and...", True),
        ("Well, um", True),
        ("Let me think,", True),
        ("uh.", True),
        ("", True),
        ("  ", True),
        ("Is it going to rain?", False),
    ],
)
def test_finished_and_unfinished_text(text: str, unfinished: bool) -> None:
    assert looks_unfinished(text) is unfinished


def test_finished_text_waits_the_min_delay_then_ends_the_turn(clock: Clock) -> None:
    ep = endpointer(clock)
    assert ep.speech_started(0, 500) == 1
    assert ep.deadline is None
    ep.speech_stopped(0, 2000, speech_end_ts=123)
    assert ep.deadline is None  # the final is still being decoded
    clock.now += 0.04
    assert ep.transcript("What is the weather like today?", is_final=True, flushed=True) == (1, 0)
    # the wait is silence after the VAD's stop: the 40 ms of decoding count towards it
    assert ep.deadline == pytest.approx(100.1)
    clock.now = 100.1
    end = ep.end_turn()
    assert (end.turn, end.text, end.reason) == (1, "What is the weather like today?", "silence")
    assert (end.start_ms, end.end_ms, end.speech_end_ts, end.endpointing_ms) == (500, 2000, 123, 60)
    assert ep.turn is None and ep.deadline is None


def test_unfinished_text_waits_the_max_delay(clock: Clock) -> None:
    ep = endpointer(clock)
    segment(ep, clock, 0, "I would like to")
    assert ep.deadline == pytest.approx(100.8)  # 0.8 s after the stop; the final came 0.3 s into it
    clock.now = 100.8
    end = ep.end_turn()
    assert (end.reason, end.endpointing_ms) == ("max_delay", 500)


def test_speech_resuming_cancels_the_wait_and_segments_join_in_one_turn(clock: Clock) -> None:
    ep = endpointer(clock)
    segment(ep, clock, 0, "I would like to book", start_ms=200)
    assert ep.deadline is not None
    assert ep.speech_started(1, 3000) == 1  # the same turn goes on
    assert ep.deadline is None
    assert ep.transcript("a ta", is_final=False) == (1, 1)  # a partial belongs to the spoken segment
    ep.speech_stopped(1, 4200, speech_end_ts=99)
    clock.now += 0.3
    assert ep.transcript("a table for two.", is_final=True, flushed=True) == (1, 1)
    end = ep.end_turn()
    assert end.text == "I would like to book a table for two."
    assert (end.start_ms, end.end_ms, end.speech_end_ts) == (200, 4200, 99)
    assert end.reason == "silence"


def test_the_wait_starts_only_when_every_ended_segment_has_its_final(clock: Clock) -> None:
    ep = endpointer(clock)
    ep.speech_started(0, 0)
    ep.speech_stopped(0, 1000, speech_end_ts=1)
    ep.speech_started(1, 1500)
    ep.speech_stopped(1, 2500, speech_end_ts=2)
    assert ep.transcript("Hello there.", is_final=True, flushed=True) == (1, 0)
    assert ep.deadline is None  # segment 1 is still being decoded
    assert ep.transcript("How are you?", is_final=True, flushed=True) == (1, 1)
    assert ep.deadline is not None
    assert ep.end_turn().text == "Hello there. How are you?"


def test_turn_ids_count_on_from_the_restored_turn(clock: Clock) -> None:
    ep = endpointer(clock, last_turn=4)
    segment(ep, clock, 7, "Yes.")
    assert ep.end_turn().turn == 5
    segment(ep, clock, 8, "No.")
    assert ep.end_turn().turn == 6
    assert ep.last_turn == 6


def test_noise_ends_with_empty_text_after_the_max_delay(clock: Clock) -> None:
    ep = endpointer(clock)
    segment(ep, clock, 0, "")
    assert ep.deadline == pytest.approx(100.8)  # the max delay after the stop
    assert ep.end_turn().text == ""
    assert ep.speech_started(1, 0) == 2  # ids are never reused


def test_an_engine_endpoint_ends_the_turn_at_once(clock: Clock) -> None:
    ep = endpointer(clock)
    ep.speech_started(0, 0)
    ep.speech_stopped(0, 1000, speech_end_ts=1)
    ep.transcript("I want to", is_final=True, flushed=True)
    assert ep.deadline == pytest.approx(clock.now + 0.8)
    ep.transcript("", is_final=True, endpoint=True)
    assert ep.deadline == pytest.approx(clock.now)
    assert ep.end_turn().reason == "stt_endpoint"


def test_an_endpoint_while_the_caller_speaks_does_not_end_the_turn(clock: Clock) -> None:
    ep = endpointer(clock)
    ep.speech_started(0, 0)
    assert ep.transcript("Hello", is_final=True, endpoint=True) == (1, 0)
    assert ep.deadline is None


def test_results_outside_a_turn_and_stops_of_unknown_segments_are_refused(clock: Clock) -> None:
    ep = endpointer(clock)
    assert ep.transcript("late", is_final=True, flushed=True) is None
    assert ep.speech_stopped(3, 100, speech_end_ts=1) is None
    ep.speech_started(4, 0)
    assert ep.speech_stopped(3, 100, speech_end_ts=1) is None
    assert ep.speech_stopped(4, 100, speech_end_ts=1) == 1


def test_a_decode_slower_than_the_wait_ends_the_turn_as_soon_as_its_final_is_in(clock: Clock) -> None:
    ep = endpointer(clock)
    ep.speech_started(0, 0)
    ep.speech_stopped(0, 1000, speech_end_ts=1)
    clock.now += 2.0  # a slow decoder
    ep.transcript("Book a table for two.", is_final=True, flushed=True)
    assert ep.deadline is not None and ep.deadline <= clock.now  # due at once


@pytest.mark.parametrize(
    ("final", "silence_ms", "continues"),
    [
        ("Book a table for two.", 50, True),  # shorter than the min delay: the turn goes on
        ("Book a table for two.", 300, False),  # finished text, the min delay had run out
        ("I would like to", 300, True),  # unfinished text: within the max delay
        ("I would like to", 900, False),  # longer than the max delay
    ],
)
def test_whether_speech_continues_the_turn_is_decided_in_stream_time(
    clock: Clock, final: str, silence_ms: int, continues: bool
) -> None:
    ep = endpointer(clock)
    ep.speech_started(0, 0)
    ep.speech_stopped(0, 1000, speech_end_ts=1, stop_ms=1200)
    heard = 1200 + silence_ms
    # before the final: only the silences beyond doubt are decided
    assert ep.continues(heard) is {50: True, 300: None, 900: False}[silence_ms]
    clock.now += 5.0  # however long the decode took
    ep.transcript(final, is_final=True, flushed=True)
    assert ep.continues(heard) is continues


def test_speed_shortens_the_wait_on_the_clock_but_not_in_the_audio(clock: Clock) -> None:
    ep = Endpointer(min_delay_s=0.1, max_delay_s=0.8, speed=4.0, clock=clock)
    ep.speech_started(0, 0)
    ep.speech_stopped(0, 1000, speech_end_ts=1, stop_ms=1200)
    ep.transcript("I would like to", is_final=True, flushed=True)
    assert ep.deadline == pytest.approx(100.2)  # 0.8 s of audio at 4x
    assert ep.continues(1900) is True and ep.continues(2100) is False
