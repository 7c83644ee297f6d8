"""The chunker on its own: when chunks become speakable, what is never cut, and how text is cleaned."""

from __future__ import annotations

import pytest

from services.dialogue.chunker import Chunker, clean_for_speech
from services.dialogue.engines.bench import REPLY as BENCH_REPLY


def tokens(text: str) -> list[str]:
    """The text as an LLM streams it: a word per delta, each with its leading space."""
    words = text.split(" ")
    return [words[0], *(f" {w}" for w in words[1:])]


def stream(deltas: list[str], **settings: int) -> list[tuple[int, str]]:
    """(index of the delta that completed it, chunk) for every chunk; the flushed rest has index -1."""
    chunker = Chunker(**settings)
    out = [(i, chunk) for i, delta in enumerate(deltas) for chunk in chunker.push(delta)]
    if rest := chunker.flush():
        out.append((-1, rest))
    return out


def chunks(text: str, **settings: int) -> list[str]:
    return [chunk for _, chunk in stream(tokens(text), **settings)]


def test_first_chunk_goes_out_after_max_words_without_a_boundary() -> None:
    out = stream(tokens(BENCH_REPLY))
    first_at, first = out[0]
    assert first == "The weather today is sunny and"
    assert first_at == 6  # the 7th token shows the 6th word is complete
    assert [c for _, c in out[1:]] == [
        "warm with light wind.",
        "Tonight will be clear and cool with calm air everywhere.",
    ]


def test_first_chunk_goes_out_at_the_first_clause_with_enough_words() -> None:
    out = stream(tokens("Sure, I can help with that. Your order ships tomorrow."))
    # "Sure," has one word, fewer than the minimum of three
    assert out[0] == (6, "Sure, I can help with that.")
    assert stream(tokens("Well I think so, yes. It is fine."))[0] == (4, "Well I think so,")


def test_first_chunk_word_limits_are_settings() -> None:
    assert (
        chunks("One two, three four five six seven.", first_min_words=2, first_max_words=3)[0] == "One two,"
    )
    assert chunks("One two three four five six seven.", first_min_words=2, first_max_words=3)[0] == (
        "One two three"
    )


def test_later_chunks_follow_sentences_not_clauses() -> None:
    text = "Yes, of course I can. First, preheat the oven, then mix the flour. Bake it! Is that clear?"
    assert chunks(text) == [
        "Yes, of course I can.",
        "First, preheat the oven, then mix the flour.",
        "Bake it!",
        "Is that clear?",
    ]


def test_a_long_sentence_is_split_at_a_clause() -> None:
    long = (
        "This sentence keeps going and going without a pause because the model rambles on and on, "
        "and it still has not stopped talking about everything it knows, which is a lot. Done."
    )
    assert chunks(long, max_words=12) == [
        "This sentence keeps going and going",
        "without a pause because the model rambles on and on,",  # 13 words without a sentence end
        "and it still has not stopped talking about everything it knows,",  # the sentence has 15
        "which is a lot.",
        "Done.",
    ]
    assert chunks(long)[1:] == [
        long.removeprefix("This sentence keeps going and going ").removesuffix(" Done."),
        "Done.",
    ]


@pytest.mark.parametrize(
    "text",
    [
        "I asked Mr. Smith and Dr. Jones about it yesterday. They agreed.",
        "Bring fruit, e.g. apples or pears, and water, i.e. lots of it. Thanks.",
        "She moved to the U.S. last year with her family. Nice.",
        "It costs 3.5 dollars per kilo and 10,000 in total. Cheap.",
    ],
)
def test_abbreviations_and_numbers_are_not_cut(text: str) -> None:
    out = chunks(text, first_min_words=10, first_max_words=20)
    assert out == [text.rsplit(". ", 1)[0] + ".", text.rsplit(". ", 1)[1]]


def test_numbers_split_across_deltas_are_not_cut() -> None:
    # the stream stops right after the dot or comma: the next delta decides
    deltas = ["It costs", " 3.", "5 dollars", " or", " 10,", "000 pounds", " in", " total", " today."]
    assert [c for _, c in stream(deltas)] == ["It costs 3.5 dollars or 10,000", "pounds in total today."]


def test_every_character_boundary_gives_the_same_chunks() -> None:
    text = "Well, Mr. Brown paid 3.5 dollars, e.g. cash. Then he left! Bye."
    by_word = chunks(text)
    by_char = [c for _, c in stream(list(text))]
    whole = [c for _, c in stream([text])]
    assert by_word == by_char == whole
    assert " ".join(by_word) == text


def test_list_items_are_chunks_and_markers_are_dropped() -> None:
    text = (
        "Here are two options:\n- **Pasta** with `pesto`\n"
        "- _Rice_ and beans 🍚\n1. First step\n2. Second step"
    )
    assert [c for _, c in stream(list(text))] == [
        "Here are two options:",
        "Pasta with pesto",
        "Rice and beans",
        "1. First step",
        "2. Second step",
    ]


@pytest.mark.parametrize(
    ("raw", "spoken"),
    [
        ("**Great** choice! 🎉", "Great choice!"),
        ("Use the `reset` button, *then* wait.", "Use the reset button, then wait."),
        ("See [our page](https://example.com) for __more__.", "See our page for more."),
        ("## Summary\n* one\n+ two", "Summary one two"),
        ("snake_case stays", "snake_case stays"),
        ("I ❤️ it 👍🏽", "I it"),
        ("🙂", ""),
        ("  spaced   out\n\ntext ", "spaced out text"),
    ],
)
def test_clean_for_speech(raw: str, spoken: str) -> None:
    assert clean_for_speech(raw) == spoken


def test_nothing_speakable_makes_no_chunk() -> None:
    chunker = Chunker()
    assert chunker.push("🙂 ** \n") == []
    assert chunker.flush() == ""
    assert chunks("Okay. 👍 Fine then, that is all.") == ["Okay. Fine then,", "that is all."]
