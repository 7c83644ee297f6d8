"""ElevenLabs streaming TTS: a context per reply on the session's multi-stream-input WebSocket.

Each chunk is sent as it arrives and flushed, so the provider speaks it at once instead of waiting
for its buffer to fill. The audio's character alignment splits it into the reply's chunks and gives
word timings (``char_alignment``). The reply's context is closed once all of its letters have been
spoken, or at once on ``cancel`` (barge-in); late frames of a closed context are dropped.

Deadlines run only while the provider owes audio (letters sent, not yet spoken): waiting for the LLM's
next chunk is not a stall. A 1008 close that a fresh socket cures (input timeout, context limit) is
recovered inside the reply: reconnect, new context, unfinished chunks sent again. When the socket
cannot be opened (refused, 429/5xx handshake) the reply goes over the HTTP stream endpoint through the
official SDK instead, chunk by chunk, and later replies skip the WebSocket for a while; a handshake
that times out is not retried over HTTP (the host does not answer: the fallback chain takes over).
Other failures raise typed ProviderErrors for the stage's fallback chain.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import httpx
from elevenlabs import VoiceSettings
from elevenlabs.client import AsyncElevenLabs
from elevenlabs.core.api_error import ApiError
from prometheus_client import Counter

from services.runtime.config import ConfigError, setting, settings_class
from services.runtime.resilience import (
    CircuitBreaker,
    ProviderRejected,
    ProviderTimeout,
    ProviderUnavailable,
    watchdog,
)
from services.tts.engines.base import SynthAudio, TtsEngine, TtsStream
from services.tts.engines.char_alignment import CharTimes, ChunkAligner
from services.tts.engines.elevenlabs_socket import PROVIDER, ContextSocket, SocketClosed

log = logging.getLogger("voicebus.tts")

characters_sent = Counter(
    "vb_tts_characters_total", "Characters sent to a TTS provider (what it bills)", ["provider"]
)

PCM_RATES = (8000, 16000, 22050, 24000, 32000, 44100, 48000)
_VOICE_ID = re.compile(r"[A-Za-z0-9]{20}")


@settings_class
@dataclass(frozen=True, kw_only=True)
class ElevenLabsSettings:
    """The ElevenLabs engine: account, voice, output and voice-sized time budgets."""

    api_key: str = field(
        default="",
        repr=False,
        metadata={"env": "ELEVENLABS_API_KEY", "doc": "ElevenLabs API key; the TTS engine is used when set."},
    )
    base_url: str = setting("VB_ELEVENLABS_URL", "https://api.elevenlabs.io", "ElevenLabs API base URL.")
    voice_id: str = setting(
        "VB_ELEVENLABS_VOICE", "21m00Tcm4TlvDq8ikWAM", "Voice id used when the session names none."
    )
    model: str = setting(
        "VB_ELEVENLABS_MODEL", "eleven_flash_v2_5", "ElevenLabs model (flash: lowest latency)."
    )
    sample_rate: int = setting(
        "VB_ELEVENLABS_RATE", 24000, "PCM rate requested from ElevenLabs (pcm_<rate>)."
    )
    first_audio_s: float = setting(
        "VB_ELEVENLABS_FIRST_AUDIO", 1.5, "Seconds to the first audio of text sent before giving up."
    )
    stall_s: float = setting(
        "VB_ELEVENLABS_STALL", 1.5, "Seconds of silence mid-audio that count as a stall."
    )
    connect_s: float = setting("VB_ELEVENLABS_CONNECT", 1.0, "Seconds for the WebSocket or HTTP handshake.")
    keepalive_s: float = setting(
        "VB_ELEVENLABS_KEEPALIVE", 10.0, "Keep-alive period of a context waiting for text (seconds)."
    )
    inactivity_s: int = setting(
        "VB_ELEVENLABS_INACTIVITY", 60, "Provider-side inactivity_timeout of the socket (seconds, 5-180)."
    )
    idle_close_s: float = setting(
        "VB_ELEVENLABS_IDLE_CLOSE", 30.0, "Seconds a session's socket stays open with no reply on it."
    )
    reconnects: int = setting(
        "VB_ELEVENLABS_RECONNECTS", 1, "Reconnects within one reply after a recoverable 1008 close."
    )
    ws_retry_s: float = setting(
        "VB_ELEVENLABS_WS_RETRY", 30.0, "After a failed WebSocket connect, replies use HTTP for this long."
    )
    stability: float = setting("VB_ELEVENLABS_STABILITY", 0.5, "Voice stability (0-1).")
    similarity: float = setting("VB_ELEVENLABS_SIMILARITY", 0.75, "Voice similarity boost (0-1).")
    speed: float = setting("VB_ELEVENLABS_SPEED", 1.0, "Speaking speed (0.7-1.2).")

    def __post_init__(self) -> None:
        if self.sample_rate not in PCM_RATES:
            raise ConfigError(f"VB_ELEVENLABS_RATE={self.sample_rate}: use one of {PCM_RATES}")
        if not 5 <= self.inactivity_s <= 180:
            raise ConfigError("VB_ELEVENLABS_INACTIVITY must be between 5 and 180 seconds")
        if self.keepalive_s >= self.inactivity_s:
            raise ConfigError("VB_ELEVENLABS_KEEPALIVE must be shorter than VB_ELEVENLABS_INACTIVITY")

    @property
    def enabled(self) -> bool:
        """Whether a key is configured (the stage then defaults to this engine)."""
        return bool(self.api_key)

    def voice_settings(self) -> dict[str, float]:
        """The voice settings sent with every context and HTTP request."""
        return {"stability": self.stability, "similarity_boost": self.similarity, "speed": self.speed}


class ElevenLabsEngine(TtsEngine):
    """Holds the sessions' sockets and the SDK client for the HTTP path; one per process."""

    name = PROVIDER

    def __init__(self, settings: ElevenLabsSettings) -> None:
        if not settings.enabled:
            raise ConfigError("ELEVENLABS_API_KEY is not set")
        self.settings = settings
        #: open while the WebSocket cannot be reached: replies go straight to the HTTP path
        self.ws_breaker = CircuitBreaker(f"{PROVIDER}-ws", threshold=1, cooldown_s=settings.ws_retry_s)
        self._sockets: dict[tuple[str, str], ContextSocket] = {}
        # the SDK passes its own timeout on every request (default 240 s): a backstop behind the watchdog
        self._http = httpx.AsyncClient()
        self._sdk = AsyncElevenLabs(
            api_key=settings.api_key,
            base_url=settings.base_url,
            timeout=settings.connect_s + max(settings.first_audio_s, settings.stall_s),
            httpx_client=self._http,
        )

    async def open(self, session: str, reply_id: str, voice: str = "") -> ElevenLabsStream:
        """A stream for one reply; ``voice`` is used when it is an ElevenLabs voice id."""
        voice_id = voice if _VOICE_ID.fullmatch(voice) else self.settings.voice_id
        return ElevenLabsStream(self, session, reply_id, voice_id)

    def socket(self, session: str, voice_id: str) -> ContextSocket:
        """The session's socket for this voice (the voice is part of the URL)."""
        key = (session, voice_id)
        if (sock := self._sockets.get(key)) is None:
            s = self.settings
            query = urlencode(
                {
                    "model_id": s.model,
                    "output_format": f"pcm_{s.sample_rate}",
                    "inactivity_timeout": s.inactivity_s,
                }
            )
            base = re.sub(r"^http", "ws", s.base_url.rstrip("/"))
            sock = ContextSocket(
                f"{base}/v1/text-to-speech/{voice_id}/multi-stream-input?{query}",
                s.api_key,
                connect_s=s.connect_s,
                keepalive_s=s.keepalive_s,
                idle_close_s=s.idle_close_s,
                on_gone=self._forget,
            )
            self._sockets[key] = sock
        return sock

    def _forget(self, sock: ContextSocket) -> None:
        """A socket closed: the session's next reply gets a new one."""
        self._sockets = {k: v for k, v in self._sockets.items() if v is not sock}

    async def http_audio(self, voice_id: str, text: str, previous: str) -> AsyncIterator[bytes]:
        """One chunk over the HTTP stream endpoint, as raw PCM; SDK and transport errors typed."""
        s = self.settings
        try:
            async for data in self._sdk.text_to_speech.stream(
                voice_id,
                text=text,
                model_id=s.model,
                output_format=f"pcm_{s.sample_rate}",
                voice_settings=VoiceSettings(
                    stability=s.stability, similarity_boost=s.similarity, speed=s.speed
                ),
                previous_text=previous or None,
            ):
                yield data
        except ApiError as e:
            status = e.status_code or 0
            if status == 429 or status >= 500:
                retry = (e.headers or {}).get("retry-after")
                after = float(retry) if retry and retry.replace(".", "", 1).isdigit() else None
                raise ProviderUnavailable(
                    PROVIDER, f"HTTP {status}", status=status, retry_after_s=after
                ) from None
            raise ProviderRejected(PROVIDER, f"HTTP {status}: {_detail(e.body)}", status=status) from None
        except httpx.HTTPError as e:
            raise ProviderUnavailable(PROVIDER, f"HTTP stream failed: {type(e).__name__}") from None

    async def aclose(self) -> None:
        """Close every session's socket and the HTTP client."""
        for sock in list(self._sockets.values()):
            await sock.aclose()
        self._sockets.clear()
        await self._http.aclose()


def _detail(body: Any) -> str:
    """The provider's error status (``{"detail": {"status": ...}}``), never the whole body."""
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, dict):
        return str(detail.get("status", "error"))
    return "invalid request" if isinstance(detail, list) else "error"


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
        breaker.success()
        self.transport = "websocket"
        return True

    async def _new_context(self) -> None:
        self._socket = self._engine.socket(self._session, self._voice)
        await self._socket.open()
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
        if self._socket is not None:
            self._socket.detach(self._context)
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
        sock, context, self._socket = self._socket, self._context, None
        if sock is not None:
            sock.detach(context)
            if not self._closing:
                self._closing = True
                with contextlib.suppress(SocketClosed):
                    await sock.send({"context_id": context, "close_context": True})
        request, self._request = self._request, None
        if request is not None:
            request.cancel()
            await asyncio.gather(request, return_exceptions=True)


def _char_times(message: dict[str, Any]) -> CharTimes | None:
    """The message's character timings: ``alignment`` (the text as sent) if present, else normalised."""
    a = message.get("alignment") or message.get("normalizedAlignment")
    if not isinstance(a, dict) or not a.get("chars"):
        return None
    return CharTimes(a["chars"], a.get("charStartTimesMs") or [], a.get("charDurationsMs") or [])
