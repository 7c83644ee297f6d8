"""Cut the LLM's text stream into chunks TTS can speak, as early as each one is speakable.

The first chunk of a reply decides when the caller hears the agent, so it goes out at the first
clause boundary once it holds a few words, or after a few words without one; later chunks follow
sentence boundaries (a sentence that runs long is split at a clause), which keeps prosody natural.

A boundary only counts once the character after it is known: "3.5", "10,000" and "e.g." must not be
cut, and the stream may stop in the middle of any of them. Text is cleaned for speech on the way out
(markdown, list markers, emoji).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_CLOSERS = "\"')]}\u201d\u2019\u00bb"  # closing quotes and brackets
#: A punctuation run and any closing quotes or brackets, confirmed by the whitespace after it; or a line
#: break (list items and paragraphs often end without punctuation).
_BOUNDARY = re.compile(rf"(?P<punct>[.!?…]+|[,;:])[{re.escape(_CLOSERS)}]*(?=\s)|\n")
_SENTENCE_MARKS = frozenset(".!?…\n")
_TOKEN = re.compile(r"\S+")
_OPENERS = "\"'([\u201c\u2018\u00ab"
_LAST_TOKEN = re.compile(rf"(?:^|\s)[{re.escape(_OPENERS)}]*(?P<token>\S+)$")

#: Words that end with a dot without ending a sentence. "No." is left out on purpose: as an answer it
#: is a whole sentence, far more often in a conversation than "No. 5".
ABBREVIATIONS = frozenset(
    {"mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "approx", "dept", "est", "inc", "ltd"}
    | {"corp", "mt", "ft", "jan", "feb", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec"}
)


def _is_word(token: str) -> bool:
    return any(c.isalnum() for c in token)


def _count_words(text: str) -> int:
    return sum(1 for token in text.split() if _is_word(token))


def _ends_sentence(text: str, mark_start: int, mark: str) -> bool:
    """Whether a boundary dot really ends something (not "Mr.", "e.g.", "U.S." or a list number)."""
    if mark != ".":
        return True
    before = text[:mark_start]
    found = _LAST_TOKEN.search(before)
    if found is None:
        return True
    token = found.group("token").lower()
    if token in ABBREVIATIONS or "." in token or (len(token) == 1 and token.isalpha()):
        return False
    line_start = not before[: found.start("token")].rpartition("\n")[2].strip(" \t\"'(")
    return not (token.isdigit() and line_start)


@dataclass(frozen=True, slots=True)
class _Boundary:
    end: int
    words: int
    sentence: bool


class Chunker:
    """Incremental: ``push`` text deltas as they arrive, take the chunks that became speakable."""

    def __init__(self, *, first_min_words: int = 3, first_max_words: int = 6, max_words: int = 25) -> None:
        self.first_min_words = first_min_words
        self.first_max_words = first_max_words
        self.max_words = max_words
        self._pending = ""
        self._first = True

    def push(self, text: str) -> list[str]:
        """Add generated text; returns the chunks now ready, cleaned for speech."""
        self._pending += text
        ready = []
        while (cut := self._next_cut()) is not None:
            piece, self._pending = self._pending[:cut], self._pending[cut:]
            if spoken := clean_for_speech(piece):
                ready.append(spoken)
                self._first = False
        return ready

    def flush(self) -> str:
        """The rest of the reply (the stream ended), cleaned; empty if nothing speakable is left."""
        piece, self._pending = self._pending, ""
        return clean_for_speech(piece)

    def _next_cut(self) -> int | None:
        text = self._pending
        boundaries = [
            _Boundary(m.end(), _count_words(text[: m.end()]), mark[0] in _SENTENCE_MARKS)
            for m in _BOUNDARY.finditer(text)
            if _ends_sentence(text, m.start(), mark := m.group("punct") or "\n")
        ]
        if self._first:
            at_clause = next((b.end for b in boundaries if b.words >= self.first_min_words), None)
            after_words = self._end_of_word(text, self.first_max_words)
            cuts = [c for c in (at_clause, after_words) if c is not None]
            return min(cuts) if cuts else None
        sentence = next((b for b in boundaries if b.sentence), None)
        if sentence is not None and sentence.words <= self.max_words:
            return sentence.end
        if (sentence.words if sentence else _count_words(text)) > self.max_words:
            # a long sentence: split it at its last clause within the limit, else its first one after
            before = sentence.end if sentence else len(text)
            clauses = [
                b for b in boundaries if not b.sentence and b.end < before and b.words >= self.first_min_words
            ]
            within = [b for b in clauses if b.words <= self.max_words]
            if within or clauses:
                return (within[-1] if within else clauses[0]).end
        if sentence is not None:
            return sentence.end
        return self._end_of_word(text, 2 * self.max_words)

    @staticmethod
    def _end_of_word(text: str, n: int) -> int | None:
        """Where the ``n``-th word ends, once a space after it shows it is complete."""
        count = 0
        for m in _TOKEN.finditer(text):
            count += _is_word(m.group())
            if count == n:
                return m.end() if m.end() < len(text) else None
        return None


_LINK = re.compile(r"\[([^\]]*)\]\([^)]*\)")
_LINE_MARKER = re.compile(r"(?m)^[ \t]*(?:[-*+•]|#{1,6})[ \t]+")
_EMPHASIS = re.compile(r"[*`~]+|(?<!\w)_+|_+(?!\w)")
_EMOJI = re.compile(
    "[\U0001f000-\U0001faff\U0001f1e6-\U0001f1ff\u2600-\u27bf\u2b00-\u2bff\u2300-\u23ff\ufe0f\u200d]"
)
_SPACE = re.compile(r"\s+")


def clean_for_speech(text: str) -> str:
    """Text as it should be spoken: no markdown, list markers or emoji; single spaces."""
    text = _LINK.sub(r"\1", text)
    text = _LINE_MARKER.sub("", text)
    text = _EMPHASIS.sub("", text)
    text = _EMOJI.sub("", text)
    text = _SPACE.sub(" ", text).strip()
    return text if _is_word(text) else ""
