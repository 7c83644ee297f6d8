"""Character alignment -> chunks and word timings (the pure part of the ElevenLabs engine)."""

from __future__ import annotations

from services.tts.engines.char_alignment import CharTimes, ChunkAligner

RATE = 8000
MS = 10  # every character lasts 10 ms in these messages


def message(chars: str) -> tuple[bytes, CharTimes]:
    """A provider message speaking ``chars``: 10 ms of audio each, times from the message start."""
    pcm = bytes(2 * RATE * MS * len(chars) // 1000)
    return pcm, CharTimes(list(chars), [i * MS for i in range(len(chars))], [MS] * len(chars))


def test_a_message_spanning_two_chunks_is_cut_at_the_first_letter_of_the_second() -> None:
    a = ChunkAligner(RATE)
    a.add(0, "Hi you. ")
    a.add(1, "Bye. ")
    pieces = a.feed(*message("Hi you. Bye. "))
    assert [p.chunk for p in pieces] == [0, 1]
    assert len(pieces[0].pcm) == 2 * RATE * 8 * MS // 1000  # "Hi you. " up to the B
    assert [(w.text, w.start_ms, w.end_ms) for w in pieces[0].words] == [("Hi", 0, 20), ("you.", 30, 60)]
    assert [(w.text, w.start_ms, w.end_ms) for w in pieces[1].words] == [("Bye.", 0, 30)]
    assert a.outstanding == 0


def test_a_word_split_over_two_messages_is_timed_from_the_chunk_start() -> None:
    a = ChunkAligner(RATE)
    a.add(0, "Good morning ")
    first = a.feed(*message("Good mor"))
    assert [w.text for p in first for w in p.words] == ["Good"]
    assert a.outstanding == len("ning")
    second = a.feed(*message("ning "))
    ((word,),) = [p.words for p in second]
    assert (word.text, word.start_ms, word.end_ms) == ("morning", 50, 120)


def test_provider_punctuation_and_spacing_do_not_shift_the_count() -> None:
    a = ChunkAligner(RATE)
    a.add(0, "It's 5 o'clock, ok? ")
    pieces = a.feed(*message("Its5oclock ok"))  # normalised: no spaces or apostrophes
    assert [w.text for p in pieces for w in p.words] == ["It's", "5", "o'clock,", "ok?"]
    assert a.outstanding == 0


def test_an_unfinished_chunk_is_spoken_again_after_what_was_heard() -> None:
    a = ChunkAligner(RATE)
    a.add(0, "One two. ")
    a.add(1, "Three. ")
    heard = a.feed(*message("One t"))
    assert a.respeak_unfinished() == [0, 1]
    again = a.feed(*message("One two. Three. "))
    assert [p.chunk for p in again] == [0, 1]
    heard_ms = len(heard[0].pcm) / 2 / RATE * 1000
    assert [w.start_ms for w in again[0].words] == [heard_ms, heard_ms + 40]
    assert [w.start_ms for w in again[1].words] == [0]


def test_audio_without_alignment_stays_with_the_current_chunk() -> None:
    a = ChunkAligner(RATE)
    a.add(0, "Hi. ")
    a.add(1, "Yo. ")
    a.feed(*message("Hi. "))
    (tail,) = a.feed(bytes(160), None)
    assert tail.chunk == 0 and not tail.words
