"""Speech segments from VAD probabilities: when the caller starts and stops speaking, in stream time.

Pure logic over one probability per 32 ms VAD window, so it is tested on synthetic sequences and
behaves the same live, replayed faster than real time, or resumed by a successor from its saved state.
Durations are counted in whole windows, rounded to the nearest (as pipecat counts its VAD frames):
a 96 ms minimum speech is 3 windows, a 200 ms minimum silence is 6 windows (192 ms). A segment starts
once the probability has stayed at or above the threshold for the minimum speech; it stops once it has
stayed below the lower (negative) threshold for the minimum silence. In between, windows that are not
clearly silent keep the segment going (hysteresis), so a word with a soft syllable is not split.
"""

from __future__ import annotations

from dataclasses import dataclass

from proto.state import SpeechState

WINDOW_SAMPLES = 512
#: Stream time of one VAD window at 16 kHz.
WINDOW_MS = 32


@dataclass(frozen=True, slots=True)
class Started:
    """The caller started speaking at ``start_ms`` (the first speech window of the segment)."""

    segment: int
    start_ms: int


@dataclass(frozen=True, slots=True)
class Stopped:
    """The caller stopped speaking; ``end_ms`` is the end of the segment's last speech window."""

    segment: int
    start_ms: int
    end_ms: int


def windows(ms: int) -> int:
    """A duration in whole VAD windows, rounded to the nearest, at least one."""
    return max(1, (ms + WINDOW_MS // 2) // WINDOW_MS)


class SpeechSegmenter:
    """Turns window probabilities into speech start and stop decisions; ``state`` is what to save."""

    def __init__(
        self,
        *,
        threshold: float,
        neg_threshold: float,
        min_speech_ms: int,
        min_silence_ms: int,
        state: SpeechState | None = None,
    ) -> None:
        self.threshold, self.neg_threshold = threshold, neg_threshold
        self.min_speech, self.min_silence = windows(min_speech_ms), windows(min_silence_ms)
        self.state = state if state is not None else SpeechState()

    @property
    def speech_window(self) -> bool:
        """Whether the last window pushed is speech of the open segment (not its trailing silence)."""
        return self.state.in_speech and self.state.silence_from == self.state.window

    @property
    def deciding_soon(self) -> bool:
        """Whether one of the next two windows can complete a speech start or stop.

        Their VAD results are not held back: a window held while the frame completing the next one
        arrives (20 ms later, at times) would delay the deciding one behind it.
        """
        s = self.state
        return s.run + 2 >= (self.min_silence if s.in_speech else self.min_speech)

    def push(self, prob: float) -> Started | Stopped | None:
        """Classify the next window; returns the decision it completes, if any."""
        s = self.state
        k = s.window
        s.window += 1
        if not s.in_speech:
            if prob < self.threshold:
                s.run = 0
                return None
            if s.run == 0:
                s.start_window = k
            s.run += 1
            if s.run < self.min_speech:
                return None
            s.in_speech, s.run, s.silence_from = True, 0, k + 1
            s.segments += 1
            return Started(s.segments - 1, s.start_window * WINDOW_MS)
        if prob >= self.neg_threshold:
            s.run, s.silence_from = 0, k + 1
            return None
        s.run += 1
        if s.run < self.min_silence:
            return None
        s.in_speech, s.run = False, 0
        return Stopped(s.segments - 1, s.start_window * WINDOW_MS, s.silence_from * WINDOW_MS)
