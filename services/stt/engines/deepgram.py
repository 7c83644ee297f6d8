"""Deepgram live STT (``/v1/listen``) through the official SDK's async client.

Two things shape the stream besides recognition. Cost: Deepgram bills the audio it receives, so only
speech goes out (from a short pre-roll before the VAD's start to a short post-roll after its stop) and
a caller who stays silent for minutes costs nothing; a ``KeepAlive`` while no audio flows keeps
Deepgram's 10 s idle rule from closing the connection. Liveness: the SDK has no read timeout, so the
stream keeps its own deadlines — audio must be answered within ``stall_s`` and ``Finalize`` with a
flushed final within ``finalize_timeout_s`` — and fails with ``ProviderTimeout`` instead of waiting.

Results: interims are partials; the final that answers the Finalize sent at ``speech_ended`` is
``flushed`` (Deepgram does not promise an answer when it holds almost no unfinalized audio, so then the
adapter answers itself); ``speech_final`` is an ``endpoint``; an UtteranceEnd ends an utterance that got
no speech_final (after having Deepgram finalize words still interim). Deepgram's timestamps count the
audio it received; since silence is not sent, they are mapped back to the stream's clock (ms of audio
pushed since ``open``) before they leave the adapter.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

import httpx
from deepgram import AsyncDeepgramClient, DeepgramClientEnvironment
from deepgram.core.api_error import ApiError
from deepgram.listen.v1.socket_client import AsyncV1SocketClient
from deepgram.listen.v1.types import (
    ListenV1Error,
    ListenV1Results,
    ListenV1UtteranceEnd,
)
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK, InvalidHandshake

from proto.events import Word
from services.runtime.config import ConfigError, setting, settings_class
from services.runtime.resilience import (
    ProviderError,
    ProviderRejected,
    ProviderTimeout,
    ProviderUnavailable,
    provider_failures,
)
from services.stt.engines.base import SttEngine, SttResult, SttStream
from services.stt.engines.gating import ClockMap, SpeechGate

log = logging.getLogger("voicebus.stt")

SAMPLE_RATE = 16_000
_BYTES_PER_S = SAMPLE_RATE * 2
#: Deepgram may not answer a Finalize when it holds less than this much unfinalized audio (its docs:
#: "not guaranteed if there is no significant amount of audio"), so the adapter answers it itself.
_FLUSH_SLACK_S = 0.2
#: Handshakes per ``open``: one quick retry of a retryable refusal, if it fits the connect budget.
_MAX_ATTEMPTS = 2
_RETRY_DELAY_S = 0.2


@settings_class
@dataclass(frozen=True, kw_only=True)
class DeepgramSettings:
    """Deepgram live STT: key, endpoint, recognition options and voice-sized budgets."""

    api_key: str = dataclasses.field(
        default="",
        repr=False,  # the settings object may be logged; the key must not be
        metadata={"env": "DEEPGRAM_API_KEY", "doc": "Deepgram API key (or a file in DEEPGRAM_API_KEY_FILE)."},
    )
    url: str = setting("VB_DEEPGRAM_URL", "wss://api.deepgram.com", "Deepgram streaming base URL.")
    model: str = setting("VB_DEEPGRAM_MODEL", "nova-3", "Deepgram model of the live stream.")
    endpointing_ms: int = setting(
        "VB_DEEPGRAM_ENDPOINTING_MS", 300, "Silence (ms) after which Deepgram marks speech_final; 0: off."
    )
    utterance_end_ms: int = setting(
        "VB_DEEPGRAM_UTTERANCE_END_MS", 1000, "Gap after the last word (ms) before UtteranceEnd; 0: off."
    )
    smart_format: bool = setting("VB_DEEPGRAM_SMART_FORMAT", True, "Punctuation and number formatting.")
    preroll_ms: int = setting("VB_DEEPGRAM_PREROLL_MS", 300, "Audio sent from before the VAD's speech start.")
    postroll_ms: int = setting(
        "VB_DEEPGRAM_POSTROLL_MS", 300, "Audio still sent after the VAD's speech stop."
    )
    keepalive_s: float = setting(
        "VB_DEEPGRAM_KEEPALIVE", 4.0, "Seconds without audio before a KeepAlive (Deepgram closes at 10)."
    )
    connect_timeout_s: float = setting(
        "VB_DEEPGRAM_CONNECT_TIMEOUT", 2.0, "Budget to open a stream, the one retry included."
    )
    stall_s: float = setting(
        "VB_DEEPGRAM_STALL_TIMEOUT",
        2.0,
        "Seconds audio may go unanswered before the stream counts as stalled.",
    )
    finalize_timeout_s: float = setting(
        "VB_DEEPGRAM_FINALIZE_TIMEOUT", 1.5, "Seconds the flushed final may take after Finalize."
    )
    close_timeout_s: float = setting(
        "VB_DEEPGRAM_CLOSE_TIMEOUT", 1.0, "Seconds CloseStream waits for the last results and the close."
    )

    def __post_init__(self) -> None:
        budgets = (self.connect_timeout_s, self.stall_s, self.finalize_timeout_s, self.close_timeout_s)
        if min(budgets) <= 0:
            raise ConfigError("VB_DEEPGRAM_*_TIMEOUT budgets must be positive")
        if not 0 < self.keepalive_s < 10:
            raise ConfigError("VB_DEEPGRAM_KEEPALIVE must be between 0 and 10 s (Deepgram's idle limit)")
        if min(self.preroll_ms, self.postroll_ms, self.endpointing_ms, self.utterance_end_ms) < 0:
            raise ConfigError("VB_DEEPGRAM_*_MS settings cannot be negative")


class DeepgramEngine(SttEngine):
    """Opens one Deepgram live connection per session; one SDK client per process."""

    def __init__(self, settings: DeepgramSettings, *, name: str = "deepgram") -> None:
        if not settings.api_key:
            raise ConfigError("DEEPGRAM_API_KEY is not set")
        self.name, self._settings = name, settings
        self._http = httpx.AsyncClient()  # the SDK's REST side; owned here so aclose can release it
        rest = settings.url.replace("ws", "http", 1)
        environment = DeepgramClientEnvironment(
            base=rest, production=settings.url, agent=settings.url, agent_rest=rest
        )
        self._client = AsyncDeepgramClient(
            api_key=settings.api_key, environment=environment, httpx_client=self._http
        )
        self._errors = _ErrorMapper(name, settings.api_key)

    async def open(self, session: str, language: str) -> DeepgramStream:
        """Connect, retrying a retryable refusal once when the retry fits the connect budget."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.connect_timeout_s
        for attempt in range(1, _MAX_ATTEMPTS + 1):
            stream = DeepgramStream(lambda: self._connect(language), self._settings, self._errors)
            try:
                await stream.start(deadline - loop.time())
                return stream
            except ProviderError as error:
                delay = error.retry_after_s if error.retry_after_s is not None else _RETRY_DELAY_S
                fits = delay + _RETRY_DELAY_S < deadline - loop.time()
                if not (error.retryable and fits and attempt < _MAX_ATTEMPTS):
                    log.warning("deepgram: cannot open a stream (attempt %d): %s", attempt, error)
                    raise
                provider_failures.labels(self.name, error.kind).inc()  # the chain's breaker counts the last
                await asyncio.sleep(delay)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def aclose(self) -> None:
        """Release the HTTP client the SDK holds."""
        await self._http.aclose()

    def _connect(self, language: str) -> AbstractAsyncContextManager[AsyncV1SocketClient]:
        s = self._settings
        flag = {True: "true", False: "false"}  # the SDK would send Python's "True"
        connect: AbstractAsyncContextManager[AsyncV1SocketClient] = self._client.listen.v1.connect(
            model=s.model,
            encoding="linear16",
            sample_rate=SAMPLE_RATE,
            channels=1,
            language=language or None,
            interim_results="true",
            endpointing=s.endpointing_ms or "false",
            utterance_end_ms=s.utterance_end_ms or None,
            vad_events="true",
            smart_format=flag[s.smart_format],
            punctuate=flag[s.smart_format],
        )
        return connect


class _ErrorMapper:
    """Turns SDK and websockets failures into ProviderErrors that carry no credential."""

    def __init__(self, provider: str, api_key: str) -> None:
        self.provider, self._key = provider, api_key

    def scrub(self, text: str) -> str:
        """The text with the API key masked (provider text is echoed into messages)."""
        return text.replace(self._key, "[secret]") if self._key else text

    def handshake(self, error: BaseException, budget_s: float) -> ProviderError:
        """A failed connect. ApiError holds the request headers: only its status is read."""
        if isinstance(error, TimeoutError):
            return ProviderTimeout(self.provider, f"no handshake within {budget_s:.1f}s")
        if isinstance(error, ApiError) and error.status_code is not None:
            status = error.status_code
            # the response (dg-error, retry-after) is on the websockets exception ApiError was raised from
            headers = getattr(error.__context__, "headers", None) or {}
            reason = self.scrub(str(headers.get("dg-error", "")))[:200]
            message = f"handshake refused: HTTP {status}" + (f" ({reason})" if reason else "")
            if status == 429 or status >= 500 or status == 408:
                return ProviderUnavailable(
                    self.provider, message, status=status, retry_after_s=_seconds(headers.get("retry-after"))
                )
            return ProviderRejected(self.provider, message, status=status)
        if isinstance(error, OSError | InvalidHandshake | ApiError):
            return ProviderUnavailable(self.provider, f"cannot connect: {type(error).__name__}")
        return ProviderUnavailable(self.provider, f"cannot connect: {self.scrub(repr(error))[:200]}")

    def closed(self, error: ConnectionClosed) -> ProviderUnavailable:
        """The connection ended while the stream was in use."""
        if error.rcvd is None:
            return ProviderUnavailable(self.provider, "connection dropped (no close frame)")
        reason = self.scrub(error.rcvd.reason)[:120]
        return ProviderUnavailable(
            self.provider, f"connection closed by the provider: {error.rcvd.code} {reason}"
        )


def _seconds(value: Any) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class _Control:
    def __init__(self, name: str) -> None:
        self.name = name


_FINALIZE, _CLOSE = _Control("Finalize"), _Control("CloseStream")


@dataclass(frozen=True, slots=True)
class _Flush:
    """A Finalize awaiting its answer: the final that covers ``until_s`` of Deepgram's clock."""

    until_s: float
    deadline: float
    #: True: answers the VAD's speech end (a flushed result); False: sent on UtteranceEnd (an endpoint)
    vad: bool


class DeepgramStream(SttStream):
    """One live connection: a sender (audio, control, KeepAlive), a reader and a watchdog task.

    ``billed_s`` rides on finals: the audio sent since the previous final (the one CloseStream brings
    carries the rest), so summing it over a session gives the seconds Deepgram bills.
    """

    def __init__(
        self,
        connect: Callable[[], AbstractAsyncContextManager[AsyncV1SocketClient]],
        settings: DeepgramSettings,
        errors: _ErrorMapper,
    ) -> None:
        self._connect, self._s, self._errors = connect, settings, errors
        self._gate = SpeechGate(
            settings.preroll_ms * _BYTES_PER_S // 1000, settings.postroll_ms * _BYTES_PER_S // 1000
        )
        self._clock = ClockMap()
        self._outbox: asyncio.Queue[bytes | _Control] = asyncio.Queue()
        self._results: asyncio.Queue[SttResult | ProviderError | None] = asyncio.Queue()
        self._wake = asyncio.Event()  # the watchdog's deadlines changed
        self._ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._task: asyncio.Task[None] | None = None
        self._pushed = 0  # stream clock: bytes of audio pushed by the caller
        self._sent = 0  # Deepgram's clock: bytes of audio handed to the connection
        self._billed_to = 0
        self._covered_s = 0.0  # Deepgram's clock up to which finals have settled the audio
        # (Deepgram time at the end of a frame, when it was sent) for audio no Results has covered yet
        self._unanswered: deque[tuple[float, float]] = deque()
        self._flushes: list[_Flush] = []
        self._closing_at: float | None = None
        self._open_utterance = False  # a final with text came and no endpoint after it yet
        self._interim_pending = False  # an interim with text came and no final after it yet
        self._finished = False

    async def start(self, budget_s: float) -> None:
        """Connect within ``budget_s``; raises the mapped ProviderError when the handshake fails."""
        self._task = asyncio.create_task(self._run(budget_s), name="deepgram.stream")
        try:
            await self._ready
        except BaseException:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            raise

    async def push(self, pcm: bytes) -> None:
        """Queue the frame if the gate lets it through; silence stays in the pre-roll ring."""
        if self._finished:
            return
        for frame in self._gate.push(pcm):
            self._send_audio(frame)
        self._pushed += len(pcm)
        if not self._gate.is_open:
            self._unanswered.clear()  # Deepgram may hold the tail of a run until more audio comes

    async def speech_started(self) -> None:
        """Open the gate: the pre-roll goes out first, so the onset of the speech is not clipped."""
        if self._finished:
            return
        if self._gate.is_open:  # speech resumed within the post-roll: the run goes on
            self._gate.start()
            return
        preroll = self._gate.start()
        stream_at = self._pushed - sum(map(len, preroll))
        self._clock.start_run(self._sent / _BYTES_PER_S, stream_at / _BYTES_PER_S)
        for frame in preroll:
            self._send_audio(frame)

    async def speech_ended(self) -> None:
        """Finalize now (latency); the post-roll still follows, for Deepgram's own endpointing."""
        if self._finished:
            return
        self._gate.stop()
        if not self._flushes and self._sent / _BYTES_PER_S - self._covered_s <= _FLUSH_SLACK_S:
            self._emit(SttResult("", is_final=True, flushed=True, billed_s=self._take_billed()))
            return
        self._finalize(vad=True)

    async def results(self) -> AsyncIterator[SttResult]:
        """Results until the stream closes; a failure is raised as its ProviderError."""
        while True:
            item = await self._results.get()
            if not isinstance(item, SttResult):
                self._results.put_nowait(item)  # a second reader ends the same way
                if item is None:
                    return
                raise item
            yield item

    async def aclose(self) -> None:
        """CloseStream: Deepgram sends what it still holds and closes; bounded by close_timeout_s."""
        if self._task is None:
            return
        if not self._finished:
            self._finished = True
            self._unanswered.clear()
            self._flushes = []
            self._closing_at = asyncio.get_running_loop().time()
            self._outbox.put_nowait(_CLOSE)
            self._wake.set()
        await self._task

    # --- the connection ----------------------------------------------------------------------------

    async def _run(self, budget_s: float) -> None:
        stack = contextlib.AsyncExitStack()
        try:
            try:
                async with asyncio.timeout(budget_s):
                    conn = await stack.enter_async_context(self._connect())
            except Exception as error:
                self._ready.set_exception(self._errors.handshake(error, budget_s))
                return
            self._ready.set_result(None)
            try:
                await self._serve(conn)
            except ProviderError as error:
                self._fail(error)
            except Exception as error:  # a bug here must still end results(), so the chain can switch
                log.exception("deepgram: stream task crashed")
                self._fail(
                    ProviderUnavailable(self._errors.provider, f"adapter error: {type(error).__name__}")
                )
            else:
                self._results.put_nowait(None)
        finally:
            with contextlib.suppress(TimeoutError, ConnectionClosed, OSError):
                async with asyncio.timeout(self._s.close_timeout_s):
                    await stack.aclose()

    async def _serve(self, conn: AsyncV1SocketClient) -> None:
        """Until the close completes or a task fails; the sender returns early, after CloseStream."""
        sender = asyncio.create_task(self._send_loop(conn), name="deepgram.send")
        reader = asyncio.create_task(self._read_loop(conn), name="deepgram.read")
        watch = asyncio.create_task(self._watch(), name="deepgram.watch")
        pending = {sender, reader, watch}
        try:
            while True:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()
                if done != {sender}:
                    return
        finally:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _send_loop(self, conn: AsyncV1SocketClient) -> None:
        loop = asyncio.get_running_loop()
        last_activity = loop.time()
        try:
            while True:
                try:
                    async with asyncio.timeout_at(last_activity + self._s.keepalive_s):
                        item = await self._outbox.get()
                except TimeoutError:
                    await conn.send_keep_alive()
                    last_activity = loop.time()
                    continue
                if isinstance(item, bytes):
                    await conn.send_media(item)
                    last_activity = loop.time()
                elif item is _FINALIZE:
                    await conn.send_finalize()
                else:
                    await conn.send_close_stream()
                    return
        except ConnectionClosed as error:
            raise self._errors.closed(error) from None

    async def _read_loop(self, conn: AsyncV1SocketClient) -> None:
        while True:
            try:
                message = await conn.recv()
            except ConnectionClosedOK as error:
                if self._closing_at is not None:
                    return
                raise self._errors.closed(error) from None
            except ConnectionClosed as error:
                raise self._errors.closed(error) from None
            match message:
                case ListenV1Results():
                    self._on_results(message)
                case ListenV1UtteranceEnd() if self._interim_pending:
                    # no speech_final came and words are still interim: have them finalized as the end
                    self._interim_pending = False
                    self._finalize(vad=False)
                case ListenV1UtteranceEnd() if self._open_utterance:
                    # no speech_final came for the last words: the utterance ends here
                    self._open_utterance = False
                    self._emit(SttResult("", is_final=True, endpoint=True, billed_s=self._take_billed()))
                case ListenV1Error():
                    text = self._errors.scrub(f"{message.variant}: {message.description}")[:200]
                    raise ProviderUnavailable(self._errors.provider, f"error message: {text}")
                case _:
                    pass  # SpeechStarted, Metadata: proof of life only; the service has its own VAD

    async def _watch(self) -> None:
        """Fail the stream when a deadline passes; return when the close has had its time."""
        loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()
            deadlines = []
            if self._unanswered:
                sent_at = self._unanswered[0][1]
                deadlines.append((sent_at + self._s.stall_s, f"no answer to audio in {self._s.stall_s}s"))
            if self._flushes:
                what = f"no flushed final within {self._s.finalize_timeout_s}s of Finalize"
                deadlines.append((self._flushes[0].deadline, what))
            if self._closing_at is not None:
                deadlines.append((self._closing_at + self._s.close_timeout_s, ""))
            if not deadlines:
                await self._wake.wait()
                continue
            at, what = min(deadlines)
            if loop.time() >= at:
                if not what:
                    log.info("deepgram: no close from the provider within %.1fs", self._s.close_timeout_s)
                    return
                raise ProviderTimeout(self._errors.provider, what)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(at):
                    await self._wake.wait()

    # --- results -----------------------------------------------------------------------------------

    def _on_results(self, message: ListenV1Results) -> None:
        alternatives = message.channel.alternatives
        best = alternatives[0] if alternatives else None
        text = best.transcript.strip() if best else ""
        words = tuple(self._word(w) for w in best.words) if best else ()
        confidence = min(max(best.confidence, 0.0), 1.0) if best else 0.0
        answered = message.start + message.duration
        while self._unanswered and self._unanswered[0][0] <= answered + 0.001:
            self._unanswered.popleft()
        if not message.is_final:
            self._interim_pending = bool(text)
            if text:
                self._emit(SttResult(text, is_final=False, words=words, confidence=confidence))
            return
        self._interim_pending = False
        self._covered_s = max(self._covered_s, answered)
        answers = [f for f in self._flushes if f.until_s <= self._covered_s + _FLUSH_SLACK_S]
        if message.from_finalize and self._flushes and not answers:
            answers = self._flushes[:1]
        self._flushes = [f for f in self._flushes if f not in answers]
        flushed = sum(f.vad for f in answers)
        endpoint = bool(message.speech_final) or not all(f.vad for f in answers)
        closing = self._closing_at is not None  # CloseStream's final carries the last billed audio
        if not (text or flushed or (endpoint and self._open_utterance) or closing):
            return
        self._open_utterance = bool(text) and not (endpoint or flushed)
        self._emit(
            SttResult(
                text,
                is_final=True,
                words=words,
                confidence=confidence,
                flushed=flushed > 0,
                endpoint=endpoint,
                billed_s=self._take_billed(),
            )
        )
        for _ in range(flushed - 1):  # one flushed result per speech_ended, even if one final answers several
            self._emit(SttResult("", is_final=True, flushed=True))

    def _word(self, word: Any) -> Word:
        return Word(
            text=word.punctuated_word or word.word,
            start_ms=self._clock.to_stream_ms(word.start),
            end_ms=self._clock.to_stream_ms(word.end),
            confidence=min(max(word.confidence, 0.0), 1.0),
        )

    def _fail(self, error: ProviderError) -> None:
        self._finished = True
        log.warning("deepgram: stream failed: %s", error)
        self._results.put_nowait(error)

    def _emit(self, result: SttResult) -> None:
        self._results.put_nowait(result)

    def _send_audio(self, frame: bytes) -> None:
        self._outbox.put_nowait(frame)
        self._sent += len(frame)
        if not self._unanswered:
            self._wake.set()  # a stall deadline begins
        self._unanswered.append((self._sent / _BYTES_PER_S, asyncio.get_running_loop().time()))

    def _finalize(self, *, vad: bool) -> None:
        deadline = asyncio.get_running_loop().time() + self._s.finalize_timeout_s
        self._flushes.append(_Flush(self._sent / _BYTES_PER_S, deadline, vad))
        self._outbox.put_nowait(_FINALIZE)
        self._wake.set()

    def _take_billed(self) -> float:
        billed, self._billed_to = self._sent - self._billed_to, self._sent
        return billed / _BYTES_PER_S
