"""One ElevenLabs multi-stream-input WebSocket per session, shared by the session's replies.

Each reply is a context on the socket (the provider's design for conversational agents: a turn per
context, an interrupted turn closed without dropping the connection). A reader routes server
messages to the context's inbox by ``contextId`` and drops those of contexts already let go (the
provider may still send a few frames after ``close_context``). A keeper sends the keep-alive message
for contexts that wait on the LLM, so the provider's inactivity timeout only closes sockets that
nobody uses, and closes the socket itself once no context has used it for a while.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from services.runtime.resilience import ProviderError, ProviderRejected, ProviderTimeout, ProviderUnavailable

PROVIDER = "elevenlabs"
log = logging.getLogger("voicebus.tts")
# websockets logs handshake headers and frames at DEBUG, and both carry the API key: its logger is
# pinned at INFO so that turning debug logging on for voicebus never prints the key.
_wire_log = logging.getLogger("voicebus.tts.elevenlabs.wire")
_wire_log.setLevel(logging.INFO)

#: 1008 closes that a fresh socket cures: idle too long, or too many contexts open on this one
RECOVERABLE = frozenset({"input_timeout_exceeded", "max_active_conversations"})


class SocketClosed(Exception):
    """The socket closed under a context; ``code``/``error`` say why (from the close and error frame)."""

    def __init__(self, code: int | None, error: str) -> None:
        super().__init__(f"socket closed ({code}, {error or 'no error frame'})")
        self.code, self.error = code, error

    @property
    def recoverable(self) -> bool:
        """A new socket (and context) will work: the provider closed it for a reason of its own state."""
        return self.code == 1008 and self.error in RECOVERABLE

    def as_provider_error(self) -> ProviderError:
        """The typed failure for the caller when recovering is not possible or not allowed."""
        if self.code == 1008 and self.error not in RECOVERABLE:
            return ProviderRejected(PROVIDER, f"policy close: {self.error or 'unknown'}", status=1008)
        return ProviderUnavailable(PROVIDER, str(self), status=self.code)


def status_error(status: int, what: str, retry_after: str | None = None) -> ProviderError:
    """An HTTP status from the provider as a typed failure: 429 and 5xx may pass, the rest will not."""
    if status == 429 or status >= 500:
        seconds = float(retry_after) if retry_after and retry_after.replace(".", "", 1).isdigit() else None
        return ProviderUnavailable(PROVIDER, what, status=status, retry_after_s=seconds)
    return ProviderRejected(PROVIDER, what, status=status)


def handshake_error(exc: Exception) -> ProviderError:
    """Classify a failed WebSocket connect (never echoing the request, which carries the key)."""
    if isinstance(exc, InvalidStatus):
        status = exc.response.status_code
        return status_error(
            status, f"handshake refused: HTTP {status}", exc.response.headers.get("retry-after")
        )
    if isinstance(exc, TimeoutError):
        return ProviderTimeout(PROVIDER, "no WebSocket handshake in time")
    return ProviderUnavailable(PROVIDER, f"cannot connect: {type(exc).__name__}")


class ContextSocket:
    """The session's socket: opened on demand, reopened after the provider closed it."""

    def __init__(
        self,
        url: str,
        api_key: str,
        *,
        connect_s: float,
        keepalive_s: float,
        idle_close_s: float,
        on_gone: Callable[[ContextSocket], None],
    ) -> None:
        self._url, self._key = url, api_key
        self._connect_s, self._keepalive_s, self._idle_close_s = connect_s, keepalive_s, idle_close_s
        self._on_gone = on_gone
        self._ws: ClientConnection | None = None
        self._lock = asyncio.Lock()
        self._inboxes: dict[str, asyncio.Queue[Any]] = {}
        self._last_sent: dict[str, float] = {}
        self._idle_since = time.monotonic()
        self._tasks: list[asyncio.Task[None]] = []
        #: messages of contexts already let go (late frames after close_context), dropped
        self.dropped = 0

    @property
    def is_open(self) -> bool:
        """Whether a connection is up (a context opened now needs no handshake)."""
        return self._ws is not None

    async def open(self) -> None:
        """Connect if not connected. Raises ProviderRejected/ProviderUnavailable on handshake failure."""
        async with self._lock:
            if self._ws is not None:
                return
            try:
                self._ws = await connect(
                    self._url,
                    additional_headers={"xi-api-key": self._key},
                    open_timeout=self._connect_s,
                    logger=_wire_log,
                    max_size=2**24,
                )
            except (OSError, TimeoutError, InvalidHandshake) as e:
                raise handshake_error(e) from None
            self._idle_since = time.monotonic()
            self._tasks = [
                asyncio.create_task(self._read(self._ws), name="elevenlabs-reader"),
                asyncio.create_task(self._keep(self._ws), name="elevenlabs-keeper"),
            ]

    def attach(self, context: str, inbox: asyncio.Queue[Any]) -> None:
        """Route the context's messages (and the socket's closing) into ``inbox``."""
        self._inboxes[context] = inbox
        self._last_sent[context] = time.monotonic()

    def detach(self, context: str) -> None:
        """Let the context go: its late messages are dropped from now on."""
        self._inboxes.pop(context, None)
        self._last_sent.pop(context, None)
        if not self._inboxes:
            self._idle_since = time.monotonic()

    async def send(self, message: dict[str, Any]) -> None:
        """Send one message; raises SocketClosed if the socket is gone."""
        ws = self._ws
        if ws is None:
            raise SocketClosed(None, "not connected")
        try:
            await ws.send(json.dumps(message))
        except ConnectionClosed as e:
            raise SocketClosed(e.rcvd.code if e.rcvd else None, "") from None
        if (context := message.get("context_id")) in self._last_sent:
            self._last_sent[context] = time.monotonic()

    async def aclose(self) -> None:
        """Close the connection (telling the provider first) and stop the reader and keeper."""
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(ConnectionClosed):
                await ws.send(json.dumps({"close_socket": True}))
            await ws.close()
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _read(self, ws: ClientConnection) -> None:
        error = ""
        try:
            async for raw in ws:
                message = json.loads(raw)
                inbox = self._inboxes.get(message.get("contextId") or "")
                if inbox is not None:
                    inbox.put_nowait(message)
                elif message.get("error"):
                    # errors of the socket as a whole (input timeout, context limit) come before the close
                    error = str(message["error"])
                    log.warning("elevenlabs error frame: %s", error)
                else:
                    self.dropped += 1
        except ConnectionClosed:
            pass
        except (ValueError, AttributeError):
            log.warning("elevenlabs sent a frame that is not a JSON object; closing the socket")
            await ws.close(1002)
        finally:
            self._ws = None
            closed = SocketClosed(ws.close_code, error)
            for inbox in self._inboxes.values():
                inbox.put_nowait(closed)
            self._inboxes.clear()
            self._last_sent.clear()
            for task in self._tasks:
                if task is not asyncio.current_task():
                    task.cancel()
            self._on_gone(self)

    async def _keep(self, ws: ClientConnection) -> None:
        while True:
            await asyncio.sleep(min(self._keepalive_s, self._idle_close_s) / 2)
            now = time.monotonic()
            if not self._inboxes and now - self._idle_since >= self._idle_close_s:
                with contextlib.suppress(ConnectionClosed):
                    await ws.send(json.dumps({"close_socket": True}))
                await ws.close()
                return
            for context, at in list(self._last_sent.items()):
                if now - at >= self._keepalive_s:
                    with contextlib.suppress(SocketClosed):
                        await self.send({"text": "", "context_id": context})
