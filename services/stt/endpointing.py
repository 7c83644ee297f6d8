"""When is the caller's turn over? Turn bookkeeping and the endpointing wait, as pure logic.

A turn opens at the first SpeechStarted after the previous turn ended and may span several speech
segments (the caller pauses mid-sentence). After each segment, the stage waits for the engine's
flushed final; then the turn's text so far decides how long to wait for more speech: the short
``min_delay`` when it reads as finished, the long ``max_delay`` when it trails off ("and", "the",
"um", a comma). Speech resuming during the wait cancels it and the turn goes on; when the wait runs
out the turn ends. The clock is injected (the event loop's in the service, a fake one in tests), and
nothing here sleeps: the service arms a timer at ``deadline`` and calls ``end_turn`` when it fires.

The wait is silence in the caller's audio, so it counts from the VAD's stop, and whether speech that
resumes continues the turn is decided in stream time (``continues``): the same audio gives the same
turns however long the engine took to decode, and a replay at any speed reproduces them.
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

Reason = Literal["silence", "max_delay", "stt_endpoint"]

#: Last words after which a sentence is rarely over: conjunctions, prepositions, articles, fillers.
#: Words that often end a finished sentence too ("in", "on", "over", "before", "like") are left out:
#: holding on them would add ``max_delay`` to many finished turns.
UNFINISHED_ENDINGS = frozenset(
    {
        *("and", "but", "or", "nor", "so", "because", "if", "although", "though", "unless", "until"),
        *("than", "to", "of", "with", "without", "into", "onto", "from", "by", "for"),
        *("the", "a", "an", "my", "your", "our", "their"),
        *("um", "uh", "uhm", "er", "erm", "hmm", "mm"),
    }
)
_WORD = re.compile(r"[\w']+")


def looks_unfinished(text: str) -> bool:
    """Whether the text so far reads as a sentence the caller has not finished."""
    text = text.strip()
    if not text or text.endswith((",", "...", "\u2026", "-", ";", ":")):
        return True
    if text.endswith("?"):
        return False
    words = _WORD.findall(text.lower())
    return not words or words[-1] in UNFINISHED_ENDINGS


@dataclass(frozen=True, slots=True)
class TurnEnd:
    """A turn endpointing has closed; an empty ``text`` means it was noise."""

    turn: int
    text: str
    start_ms: int
    end_ms: int
    speech_end_ts: int
    endpointing_ms: int
    reason: Reason


@dataclass(slots=True)
class _Turn:
    id: int
    start_ms: int
    speaking: int | None  # the segment being spoken, if any
    last_segment: int
    end_ms: int = 0
    speech_end_ts: int = 0
    stop_ms: int = 0  # stream time at which the VAD declared the last segment over
    stopped_at: float = 0.0  # clock time of that
    #: Segments that ended and whose flushed final has not come yet, oldest first.
    unflushed: deque[int] = field(default_factory=deque)
    finals: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return " ".join(self.finals)


class Endpointer:
    """One session's turns: which turn and segment a transcript belongs to, and when the turn ends."""

    def __init__(
        self,
        *,
        min_delay_s: float,
        max_delay_s: float,
        speed: float = 1.0,
        last_turn: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.min_delay_s, self.max_delay_s, self.speed = min_delay_s, max_delay_s, speed
        self.last_turn = last_turn
        self._clock = clock
        self._turn: _Turn | None = None
        self._deadline: float | None = None
        self._wait_started = 0.0
        self._wait_s: float | None = None  # the wait chosen for the open turn, once its finals are in
        self._reason: Reason = "silence"

    @property
    def turn(self) -> int | None:
        """The open turn's id, if a turn is open."""
        return self._turn.id if self._turn else None

    @property
    def deadline(self) -> float | None:
        """Clock time at which the open turn ends unless speech resumes; None while not waiting."""
        return self._deadline

    def speech_started(self, segment: int, start_ms: int) -> int:
        """The VAD heard speech: open a turn if none is open, else cancel the wait. Returns the turn."""
        if self._turn is None:
            self.last_turn += 1
            self._turn = _Turn(id=self.last_turn, start_ms=start_ms, speaking=segment, last_segment=segment)
        else:
            self._turn.speaking = self._turn.last_segment = segment
        self._deadline = self._wait_s = None
        return self._turn.id

    def continues(self, heard_ms: int) -> bool | None:
        """Whether speech heard at stream time ``heard_ms`` continues the open, silent turn.

        It does when less of the turn's wait had passed since the VAD's stop; None while that cannot
        be told yet (the wait depends on a final still being decoded). True without a silent turn.
        """
        t = self._turn
        if t is None or t.speaking is not None:
            return True
        silence_s = (heard_ms - t.stop_ms) / 1000
        if self._wait_s is not None:
            return silence_s <= self._wait_s
        if silence_s <= min(self.min_delay_s, self.max_delay_s):
            return True
        if silence_s > max(self.min_delay_s, self.max_delay_s):
            return False
        return None

    @property
    def waiting_for_finals(self) -> bool:
        """Whether the open turn has ended segments whose finals are still being decoded."""
        return self._turn is not None and bool(self._turn.unflushed)

    def speech_stopped(
        self, segment: int, end_ms: int, speech_end_ts: int, stop_ms: int | None = None
    ) -> int | None:
        """The VAD heard the segment end, declared at stream time ``stop_ms``.

        The segment's flushed final is now awaited. Returns the turn, if any.
        """
        t = self._turn
        if t is None or t.speaking != segment:
            return None
        t.speaking = None
        t.unflushed.append(segment)
        t.end_ms, t.speech_end_ts = end_ms, speech_end_ts
        t.stop_ms = end_ms if stop_ms is None else stop_ms
        t.stopped_at = self._clock()
        return t.id

    def transcript(
        self, text: str, *, is_final: bool, flushed: bool = False, endpoint: bool = False
    ) -> tuple[int, int] | None:
        """Place an engine result in the open turn; returns (turn, segment), None without a turn.

        A flushed final answers the oldest ended segment; anything else belongs to the segment being
        spoken (or the latest one). A final adds its text to the turn and may start the wait.
        """
        t = self._turn
        if t is None:
            return None
        if flushed and t.unflushed:
            segment = t.unflushed.popleft()
        else:
            segment = t.speaking if t.speaking is not None else (t.unflushed or [t.last_segment])[-1]
        if is_final:
            if text.strip():
                t.finals.append(text.strip())
            self._arm(endpoint)
        return t.id, segment

    def _arm(self, endpoint: bool) -> None:
        t = self._turn
        assert t is not None
        if t.speaking is not None or t.unflushed:
            return  # more of the turn is coming: speech, or a final still being decoded
        if endpoint:
            wait, self._reason = 0.0, "stt_endpoint"
        elif looks_unfinished(t.text):
            wait, self._reason = self.max_delay_s, "max_delay"
        else:
            wait, self._reason = self.min_delay_s, "silence"
        self._wait_started, self._wait_s = self._clock(), wait
        # the wait is silence after the VAD's stop (time spent decoding counts), at the session's speed
        self._deadline = t.stopped_at + wait / self.speed

    def end_turn(self) -> TurnEnd:
        """Close the open turn (its wait has run out)."""
        t = self._turn
        assert t is not None, "no turn is open"
        self._turn, self._deadline, self._wait_s = None, None, None
        return TurnEnd(
            turn=t.id,
            text=t.text,
            start_ms=t.start_ms,
            end_ms=t.end_ms,
            speech_end_ts=t.speech_end_ts,
            endpointing_ms=max(0, round((self._clock() - self._wait_started) * 1000)),
            reason=self._reason,
        )
