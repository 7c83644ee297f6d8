"""tts framing: resampling to the session rate, exact 20 ms frames, word timings on the reply's clock."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proto.events import AGENT_AUDIO_MAX_FRAMES, AGENT_RATES, FRAME_MS, WordTiming, frame_bytes
from services.tts.engines.base import SynthAudio
from services.tts.framing import Frame, Framer, ReplyAudio, estimate_words, groups

ENGINE_RATES = (16_000, 22_050, 24_000)


def tone(ms: float, rate: int, hz: float = 440.0) -> bytes:
    n = round(rate * ms / 1000)
    return (np.sin(2 * np.pi * hz * np.arange(n) / rate) * 10_000).astype(np.int16).tobytes()


def split(pcm: bytes, sizes: list[int]) -> list[bytes]:
    """``pcm`` cut into pieces of the given sample counts (cycled), the rest in the last piece."""
    pieces, at, i = [], 0, 0
    while at < len(pcm):
        step = sizes[i % len(sizes)] * 2
        pieces.append(pcm[at : at + step])
        at, i = at + step, i + 1
    return pieces


@pytest.mark.parametrize("out_rate", AGENT_RATES)
@pytest.mark.parametrize("in_rate", ENGINE_RATES)
def test_every_frame_is_exactly_20ms_and_the_duration_is_kept(in_rate: int, out_rate: int) -> None:
    pcm = tone(1234.5, in_rate)
    framer = Framer(out_rate)
    frames = [f for piece in split(pcm, [1, 333, 4410, 97]) for f in framer.push(piece, in_rate)]
    frames += framer.flush()
    assert {len(f) for f in frames} == {frame_bytes(out_rate)}
    in_ms = len(pcm) / 2 / in_rate * 1000
    # the output covers the input, with at most the padding of the last frame on top
    assert in_ms - 1 <= len(frames) * FRAME_MS < in_ms + FRAME_MS + 1


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(min_value=1, max_value=2000), min_size=1, max_size=12))
def test_the_remainder_is_carried_across_pieces(sizes: list[int]) -> None:
    rate = 24_000
    pcm = tone(700, rate)
    framer = Framer(rate)
    frames = [f for piece in split(pcm, sizes) for f in framer.push(piece, rate)]
    assert len(frames) == len(pcm) // frame_bytes(rate)  # every whole frame out before the end
    frames += framer.flush()
    joined = b"".join(frames)
    assert joined[: len(pcm)] == pcm  # same rate: the samples pass untouched, in order
    assert joined[len(pcm) :] == bytes(len(joined) - len(pcm))  # only the last frame is padded


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(min_value=50, max_value=3000), min_size=1, max_size=8))
def test_resampling_in_pieces_sounds_like_resampling_at_once(sizes: list[int]) -> None:
    pcm = tone(600, 22_050)
    whole = Framer(16_000)
    expected = np.frombuffer(b"".join(whole.push(pcm, 22_050) + whole.flush()), np.int16)
    pieces = Framer(16_000)
    got = [f for piece in split(pcm, sizes) for f in pieces.push(piece, 22_050)] + pieces.flush()
    diff = np.abs(np.frombuffer(b"".join(got), np.int16).astype(int) - expected)
    assert diff.max() <= 2  # the stream has no seams at piece boundaries (rounding only)


def test_a_change_of_engine_rate_mid_reply_keeps_the_timeline() -> None:
    framer = Framer(24_000)
    frames = framer.push(tone(500, 22_050), 22_050) + framer.push(tone(300, 16_000), 16_000) + framer.flush()
    assert {len(f) for f in frames} == {frame_bytes(24_000)}
    assert 800 <= len(frames) * FRAME_MS < 820


def test_estimated_words_share_the_duration_by_characters() -> None:
    words = estimate_words("a bb cccc", 700, offset_ms=100)
    assert [w.text for w in words] == ["a", "bb", "cccc"]
    assert [(w.start_ms, w.end_ms) for w in words] == [(100, 200), (200, 400), (400, 800)]
    assert estimate_words("   ", 500) == ()


def piece(chunk: int, ms: float, rate: int = 22_050, words: tuple[WordTiming, ...] = ()) -> SynthAudio:
    return SynthAudio(tone(ms, rate), rate, chunk, words)


def test_an_untimed_chunk_is_held_until_complete_then_its_estimated_words_ride_on_its_first_frame() -> None:
    texts = {0: "Hello there, my friend.", 1: "The weather is lovely today and tomorrow."}
    reply = ReplyAudio(24_000, texts)
    assert reply.add(piece(0, 900)) == [] and reply.add(piece(0, 300)) == []  # chunk 0 may go on
    first = reply.add(piece(1, 2000))  # chunk 0 is complete, chunk 1 is held in its turn
    assert {f.chunk for f in first} == {0} and len(first) >= 1200 // FRAME_MS - 2  # less the resampler delay
    frames = first + reply.finish()
    assert [f.index for f in frames] == list(range(len(frames)))
    starts = {min(f.index for f in frames if f.chunk == c) for c in texts}
    assert all(bool(f.words) == (f.index in starts) for f in frames)
    words = [w for f in frames for w in f.words]
    assert [w.text for w in words] == " ".join(texts.values()).split()
    assert [w.start_ms for w in words] == sorted(w.start_ms for w in words)
    assert all(w.start_ms <= w.end_ms for w in words)
    assert words[0].start_ms == 0 and words[3].end_ms == 1200  # chunk 0 fills its 1.2 s
    assert words[4].start_ms == 1200 and words[-1].end_ms == 3200  # chunk 1 starts where 0 ended
    assert words[-1].end_ms <= len(frames) * FRAME_MS


def test_engine_word_timings_ride_on_the_first_frame_of_their_chunk_shifted_by_its_start() -> None:
    timed = (
        WordTiming(text="Sunny", start_ms=50, end_ms=400),
        WordTiming(text="now.", start_ms=400, end_ms=700),
    )
    reply = ReplyAudio(16_000, {0: "First.", 1: "Sunny now."})
    first = reply.add(piece(0, 1000, 16_000, (WordTiming(text="First.", start_ms=0, end_ms=1000),)))
    second = reply.add(piece(1, 800, 16_000, timed))
    assert first[0].words[0].text == "First." and all(not f.words for f in first[1:])
    assert second[0].chunk == 1
    assert [(w.text, w.start_ms, w.end_ms) for w in second[0].words] == [
        ("Sunny", 1050, 1400),
        ("now.", 1400, 1700),
    ]
    assert all(not f.words for f in second[1:] + reply.finish())


def test_frames_ready_together_go_in_runs_of_one_chunk_of_at_most_the_event_limit() -> None:
    frames = [Frame(i, 0 if i < 23 else 1, bytes(960)) for i in range(26)]
    runs = groups(frames)
    assert [len(r) for r in runs] == [AGENT_AUDIO_MAX_FRAMES, AGENT_AUDIO_MAX_FRAMES, 3, 3]
    assert [f for r in runs for f in r] == frames  # every frame once, in order
    assert [{f.chunk for f in r} for r in runs] == [{0}, {0}, {0}, {1}]
    assert groups([]) == [] and groups(frames[:1]) == [frames[:1]]  # one frame ready: it goes alone
