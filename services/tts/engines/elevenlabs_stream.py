"""One reply spoken by ElevenLabs: a context on the session's socket, or HTTP requests chunk by chunk.

Each chunk is sent as it arrives and flushed, so the provider speaks it at once instead of waiting
for its buffer to fill. The audio's character alignment splits it into the reply's chunks and gives
word timings (``char_alignment``). The reply's context is closed once all of its letters have been
spoken, or at once on ``cancel`` (barge-in); late frames of a closed context are dropped.

Deadlines run only while the provider owes audio (letters sent, not yet spoken): waiting for the LLM's
next chunk is not a stall. A 1008 close that a fresh socket cures (input timeout, context limit) is
recovered inside the reply: reconnect, new context, unfinished chunks sent again. When the socket
cannot be opened (refused, 429/5xx handshake) the reply goes over the HTTP stream endpoint instead,
chunk by chunk, and later replies skip the WebSocket for a while; a handshake that times out is not
retried over HTTP (the host does not answer: the fallback chain takes over). Other failures raise
typed ProviderErrors for the stage's fallback chain.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter

from services.runtime.resilience import ProviderRejected, ProviderTimeout, ProviderUnavailable, watchdog
from services.tts.engines.base import SynthAudio, TtsStream
from services.tts.engines.char_alignment import CharTimes, ChunkAligner
from services.tts.engines.elevenlabs_socket import PROVIDER, ContextSocket, SocketClosed

if TYPE_CHECKING:
    from services.tts.engines.elevenlabs import ElevenLabsEngine

log = logging.getLogger("voicebus.tts")

characters_sent = Counter(
    "vb_tts_provider_characters_total", "Characters sent to a TTS provider (what it bills)", ["provider"]
)


@dataclass(frozen=True, slots=True)
class _HttpChunkDone:
    pass


_WAKE = object()  # the caller pushed text, ended or cancelled


class ElevenLabsStream(TtsStream):
    """Synthesis of one reply: a context on the session's socket, or HTTP requests chunk by chunk."""

    def __init__(self, engine: ElevenLabsEngine, session: str, reply_id: str, voice_id: str) -> None:
        self._engine, self._s = engine, engine.settings
        self._session, self._reply, self._voice = session, reply_id, voice_id
        self._texts: dict[int, str] = {}
        self._order: list[int] = []
        self._unsent: list[int] = []
        self._ended = self._cancelled = self._closing = False
        self._inbox: asyncio.Queue[Any] = asyncio.Queue()
        self._aligner = ChunkAligner(self._s.sample_rate)
        self._socket: ContextSocket | None = None
        self._context = ""
        self._contexts = 0
        self._request: asyncio.Task[None] | None = None
        #: characters sent to the provider for this reply (re-sent chunks count again: they are billed)
        self.characters = 0
        #: "websocket" or "http": the path that served the reply
        self.transport = ""

    async def push_text(self, text: str, chunk: int) -> None:
        """Queue a chunk; it is sent (and flushed) as soon as the reply's context is open."""
        if self._cancelled or not text.strip():
            return
        self._texts[chunk] = text.strip() + " "
        self._order.append(chunk)
        self._unsent.append(chunk)
        self._inbox.put_nowait(_WAKE)

    async def end(self) -> None:
        """No more text: the context closes once what was sent has been spoken."""
        self._ended = True
        self._inbox.put_nowait(_WAKE)

    async def cancel(self) -> None:
        """Barge-in: close the context (or the HTTP request) now; later audio of it is dropped."""
        if not self._cancelled:
            self._cancelled = True
            self._inbox.put_nowait(_WAKE)
            await self._let_go()

    async def audio(self) -> AsyncIterator[SynthAudio]:
        """The reply's audio, chunk by chunk, until it is spoken or cancelled."""
        if self._cancelled:
            return
        try:
            if await self._open_websocket():
                async for piece in self._websocket_audio():
                    yield piece
            else:
                async for piece in self._http_audio():
                    yield piece
        finally:
            await self._let_go()

    # --- WebSocket path ------------------------------------------------------------------------------

    async def _open_websocket(self) -> bool:
        """Open the reply's context; False when the WebSocket cannot be reached (use HTTP)."""
        breaker = self._engine.ws_breaker
        if not breaker.allow():
            return False
        try:
            await self._new_context()
        except ProviderRejected:
            breaker.success()  # the provider answered: the transport is fine, the request is not
            raise
        except ProviderTimeout as e:
            breaker.failure(e)  # the host does not answer: HTTP to it would only spend more of the budget
            raise
        except ProviderUnavailable as e:
            breaker.failure(e)
            log.warning("elevenlabs websocket unavailable (%s); reply %s goes over HTTP", e, self._reply)
            return False
        except BaseException:
            breaker.release()  # cancelled while connecting: no verdict on the transport
            raise
        breaker.success()
        self.transport = "websocket"
        return True

    async def _new_context(self) -> None:
        self._socket = self._engine.socket(self._session, self._voice)
        await self._socket.open()
        if self._cancelled:
            return  # cancelled while connecting: no context to open (and none to leak)
        self._contexts += 1
        self._context = self._reply if self._contexts == 1 else f"{self._reply}~{self._contexts}"
        self._closing = False
        self._socket.attach(self._context, self._inbox)
        init = {"text": " ", "context_id": self._context, "voice_settings": self._s.voice_settings()}
        init["xi_api_key"] = self._s.api_key
        try:
            await self._socket.send(init)
        except SocketClosed as e:
            raise e.as_provider_error() from None

    async def _websocket_audio(self) -> AsyncIterator[SynthAudio]:
        s, awaiting_first = self._s, True
        while not self._cancelled:
            awaiting_first = await self._send_pending() or awaiting_first
            owed = self._aligner.outstanding
            timeout = s.stall_s if self._closing else (s.first_audio_s if awaiting_first else s.stall_s)
            try:
                event = await asyncio.wait_for(self._inbox.get(), timeout if owed or self._closing else None)
            except TimeoutError:
                if self._closing:
                    return  # every letter was spoken; only the isFinal did not come
                what = "no first audio" if awaiting_first else "audio stalled"
                raise ProviderTimeout(PROVIDER, f"{what} within {timeout:.1f}s") from None
            match event:
                case SocketClosed() as closed:
                    await self._recover(closed)
                    awaiting_first = True
                case {"isFinal": True}:
                    if self._closing:
                        return
                    # the provider ended the context on its own (its per-context input timeout)
                    await self._recover(SocketClosed(1008, "input_timeout_exceeded"))
                    awaiting_first = True
                case {"error": error}:
                    await self._recover(SocketClosed(1008, str(error)))  # raises unless a retry can cure it
                    awaiting_first = True
                case {"audio": str(audio)} if audio:
                    awaiting_first = False
                    for piece in self._aligner.feed(base64.b64decode(audio), _char_times(event)):
                        if self._cancelled:
                            return
                        yield piece

    async def _send_pending(self) -> bool:
        """Send the chunks pushed since; close the context when the reply is spoken. True: new text owed.

        A failed send leaves the chunk queued: the reader reports the close, after the audio that
        arrived before it, and the recovery sends the chunk again.
        """
        assert self._socket is not None
        owed_before = self._aligner.outstanding
        with contextlib.suppress(SocketClosed):
            while self._unsent:
                chunk = self._unsent[0]
                text = self._texts[chunk]
                await self._socket.send({"text": text, "context_id": self._context, "flush": True})
                if chunk not in self._aligner:
                    self._aligner.add(chunk, text)
                self._unsent.pop(0)
                self._count(text)
            if self._ended and not self._aligner.outstanding and not self._closing:
                await self._socket.send({"context_id": self._context, "close_context": True})
                self._closing = True
        return not owed_before and self._aligner.outstanding > 0

    async def _recover(self, closed: SocketClosed) -> None:
        """Reconnect after a close a fresh socket cures, then send the unfinished chunks again."""
        if not closed.recoverable or self._contexts > self._s.reconnects:
            raise closed.as_provider_error()
        log.info("elevenlabs context of reply %s lost (%s); reopening", self._reply, closed.error)
        await self._close_context()  # it may live on if only the context failed, not the socket
        self._unsent = self._aligner.respeak_unfinished() + self._unsent
        await self._new_context()

    # --- HTTP path -----------------------------------------------------------------------------------

    async def _http_audio(self) -> AsyncIterator[SynthAudio]:
        self.transport, done = "http", 0
        while not self._cancelled:
            if self._request is None and done < len(self._order):
                self._request = asyncio.create_task(self._http_chunk(done), name="elevenlabs-http")
            elif self._request is None and self._ended:
                return
            match await self._inbox.get():
                case SynthAudio() as piece:
                    yield piece
                case _HttpChunkDone():
                    self._request, done = None, done + 1
                case Exception() as error:
                    raise error

    async def _http_chunk(self, position: int) -> None:
        """Request one chunk; its audio, then a done marker or the failure, go to the inbox."""
        chunk = self._order[position]
        text = self._texts[chunk]
        previous = "".join(self._texts[c] for c in self._order[max(0, position - 2) : position])
        self._count(text)
        try:
            stream = self._engine.http_audio(self._voice, text, previous)
            async for pcm in watchdog(
                stream, PROVIDER, first_s=self._s.first_audio_s, stall_s=self._s.stall_s
            ):
                self._inbox.put_nowait(SynthAudio(pcm=pcm, sample_rate=self._s.sample_rate, chunk=chunk))
            self._inbox.put_nowait(_HttpChunkDone())
        except Exception as e:  # handed to the consumer, which raises it
            self._inbox.put_nowait(e)

    # --- both ----------------------------------------------------------------------------------------

    def _count(self, text: str) -> None:
        self.characters += len(text)
        characters_sent.labels(PROVIDER).inc(len(text))

    async def _let_go(self) -> None:
        """Close the provider side of the reply (idempotent): context closed and detached, request ended."""
        await self._close_context()
        request, self._request = self._request, None
        if request is not None:
            request.cancel()
            await asyncio.gather(request, return_exceptions=True)

    async def _close_context(self) -> None:
        """Stop routing the context's messages here and ask the provider to close it (once)."""
        if self._socket is None or not self._context:
            return
        self._socket.detach(self._context)
        if not self._closing:
            self._closing = True
            with contextlib.suppress(SocketClosed):
                await self._socket.send({"context_id": self._context, "close_context": True})


def _char_times(message: dict[str, Any]) -> CharTimes | None:
    """The message's character timings: ``alignment`` (the text as sent) if present, else normalised."""
    a = message.get("alignment") or message.get("normalizedAlignment")
    if not isinstance(a, dict) or not a.get("chars"):
        return None
    return CharTimes(a["chars"], a.get("charStartTimesMs") or [], a.get("charDurationsMs") or [])
