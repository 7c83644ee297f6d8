"""ElevenLabs streaming TTS: a context per reply on the session's multi-stream-input WebSocket.

The engine holds one socket per session (``elevenlabs_socket``), shared by the session's replies, and
the official SDK client for the HTTP stream endpoint, the path used when the socket cannot be opened.
How one reply is spoken, recovered and cancelled is in ``elevenlabs_stream``. The SDK has no async
WebSocket client that reaches a configurable ``ws://`` URL, so the socket speaks the protocol with
``websockets`` directly.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import httpx
from elevenlabs import VoiceSettings
from elevenlabs.client import AsyncElevenLabs
from elevenlabs.core.api_error import ApiError

from services.runtime.config import ConfigError, setting, settings_class
from services.runtime.resilience import CircuitBreaker, ProviderUnavailable
from services.tts.engines.base import TtsEngine
from services.tts.engines.elevenlabs_socket import PROVIDER, ContextSocket, status_error
from services.tts.engines.elevenlabs_stream import ElevenLabsStream

PCM_RATES = (8000, 16000, 22050, 24000, 32000, 44100, 48000)
_VOICE_ID = re.compile(r"[A-Za-z0-9]{20}")


@settings_class
@dataclass(frozen=True, kw_only=True)
class ElevenLabsSettings:
    """The ElevenLabs engine: account, voice, output and voice-sized time budgets."""

    api_key: str = field(
        default="",
        repr=False,
        metadata={
            "env": "ELEVENLABS_API_KEY",
            "doc": "ElevenLabs API key (or a file in ELEVENLABS_API_KEY_FILE); TTS speaks with it when set.",
        },
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
        "VB_ELEVENLABS_FIRST_AUDIO",
        1.0,
        "Seconds to the first audio of text sent before giving up (flash answers in ~0.1 s; the next "
        "engine must still make it within 2 s of the caller's turn).",
    )
    stall_s: float = setting(
        "VB_ELEVENLABS_STALL", 1.0, "Seconds of silence mid-audio that count as a stall."
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
            what = f"HTTP {status}" if status == 429 or status >= 500 else f"HTTP {status}: {_detail(e.body)}"
            raise status_error(status, what, (e.headers or {}).get("retry-after")) from None
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
