"""A local ElevenLabs TTS: the multi-stream-input WebSocket and the HTTP stream endpoint, on 127.0.0.1.

Speaks the wire protocol as read from the elevenlabs SDK (2.78) types and the providers reference:
the first message of a socket is the text " "; every message names its ``context_id``, replies carry
``contextId``; text is buffered per context until the ``chunk_length_schedule`` is reached or a flush;
``{"text": ""}`` keeps a context alive; ``close_context`` stops a context (a couple of frames already
in flight still go out, then ``isFinal``); at most 5 contexts per socket (``max_active_conversations``,
close 1008); no client message within the inactivity timeout closes the socket (1008,
``input_timeout_exceeded``). Audio is deterministic: every character is ``CHAR_MS`` of a tone (letters
and digits) or silence (anything else), with its alignment relative to each audio message.

``Faults`` inject what the adapter must survive; ``Seen`` records what the client did.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import math
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

CHAR_MS = 40
PCM_RATES = (8000, 16000, 22050, 24000, 32000, 44100, 48000)
MODELS = ("eleven_flash_v2_5", "eleven_turbo_v2_5", "eleven_multilingual_v2")


@functools.cache
def char_pcm(ch: str, rate: int) -> bytes:
    """CHAR_MS of mono s16le: a tone whose pitch depends on the letter, or silence."""
    n = rate * CHAR_MS // 1000
    if not ch.isalnum():
        return bytes(2 * n)
    freq = 220 + 20 * (ord(ch.lower()) % 24)
    samples = (int(8000 * math.sin(2 * math.pi * freq * i / rate)) for i in range(n))
    return b"".join(s.to_bytes(2, "little", signed=True) for s in samples)


@dataclass
class Faults:
    """What goes wrong; socket faults apply to every connection or only to number ``on_connection``."""

    on_connection: int | None = None
    ws_status: int | None = None  # refuse the WebSocket handshake with this HTTP status
    ws_handshake_delay_s: float = 0.0  # answer the upgrade this late
    first_audio_delay_s: float = 0.0  # before the first frame of each context
    drop_after_frames: int | None = None  # abort the TCP connection after this many audio frames
    stall_after_frames: int | None = None  # go silent (socket open) after this many audio frames
    max_contexts: int = 5
    inactivity_s: float | None = None  # overrides the client's inactivity_timeout
    late_frames: int = 2  # frames still sent after close_context
    http_status: int | None = None  # answer POST /stream with this error
    http_first_byte_delay_s: float = 0.0
    http_drop_after_bytes: int | None = None
    http_stall_after_bytes: int | None = None


@dataclass
class Seen:
    """What the client did, for the tests to assert."""

    handshakes: list[dict[str, Any]] = field(default_factory=list)  # path, query, header_key
    inits: list[dict[str, Any]] = field(default_factory=list)  # context init messages, key removed
    texts: list[tuple[str, str, bool]] = field(default_factory=list)  # (context, text, flush)
    keepalives: list[str] = field(default_factory=list)
    opened: list[str] = field(default_factory=list)
    closed: list[str] = field(default_factory=list)  # close_context received
    finals: list[str] = field(default_factory=list)  # isFinal sent
    late: list[str] = field(default_factory=list)  # frames sent after close_context
    errors: list[str] = field(default_factory=list)  # error codes sent before a 1008 close
    frames: dict[str, int] = field(default_factory=dict)  # audio frames per context
    max_active: int = 0
    close_socket: int = 0
    http: list[dict[str, Any]] = field(default_factory=list)  # stream requests (body, query)


@dataclass
class _Context:
    id: str
    schedule: list[int]
    buffer: str = ""
    step: int = 0
    closed: bool = False
    jobs: asyncio.Queue[str] = field(default_factory=asyncio.Queue)
    task: asyncio.Task[None] | None = None


class _Socket:
    def __init__(
        self, server: FakeElevenLabs, ws: web.WebSocketResponse, request: web.Request, faults: Faults
    ):
        self.server, self.ws, self.request, self.faults = server, ws, request, faults
        self.rate = int(request.query["output_format"].removeprefix("pcm_"))
        self.key_ok = request.headers.get("xi-api-key") == server.api_key
        self.contexts: dict[str, _Context] = {}
        self.frames = 0
        self.lock = asyncio.Lock()
        self.last_heard = asyncio.get_running_loop().time()

    async def send(self, message: dict[str, Any]) -> None:
        async with self.lock:
            await self.ws.send_str(json.dumps(message))

    async def fail(self, error: str, message: str) -> None:
        """An error frame, then close 1008, as the provider does."""
        self.server.seen.errors.append(error)
        self.server.bump()
        with contextlib.suppress(ConnectionError):
            await self.send({"message": message, "error": error, "code": 1008})
        await self.ws.close(code=1008, message=error.encode())

    def active(self) -> int:
        return sum(not c.closed for c in self.contexts.values())

    async def speak(self, ctx: _Context) -> None:
        """The context's generator: each job (flushed text) becomes audio messages of a few characters."""
        seen, first = self.server.seen, True
        while True:
            text = await ctx.jobs.get()
            if first and await self.server.pause(self.faults.first_audio_delay_s):
                return
            first = False
            late = self.faults.late_frames
            for i in range(0, len(text), self.server.chars_per_frame):
                if ctx.closed:
                    if late <= 0:
                        break
                    late -= 1
                    seen.late.append(ctx.id)
                if (
                    self.faults.stall_after_frames is not None
                    and self.frames >= self.faults.stall_after_frames
                ):
                    await self.server.stopping.wait()
                    return
                if self.faults.drop_after_frames is not None and self.frames >= self.faults.drop_after_frames:
                    assert self.request.transport is not None
                    self.request.transport.abort()
                    return
                await self.send(self.frame(ctx.id, text[i : i + self.server.chars_per_frame]))
                self.frames += 1
                seen.frames[ctx.id] = seen.frames.get(ctx.id, 0) + 1
                self.server.bump()
                await asyncio.sleep(self.server.frame_gap_s)
            if ctx.closed:
                await self.final(ctx)
                return

    def frame(self, context: str, chars: str) -> dict[str, Any]:
        pcm = b"".join(char_pcm(c, self.rate) for c in chars)
        alignment = {
            "chars": list(chars),
            "charStartTimesMs": [i * CHAR_MS for i in range(len(chars))],
            "charDurationsMs": [CHAR_MS] * len(chars),
        }
        return {
            "audio": base64.b64encode(pcm).decode(),
            "contextId": context,
            "alignment": alignment,
            "normalizedAlignment": alignment,
        }

    async def final(self, ctx: _Context) -> None:
        with contextlib.suppress(ConnectionError):
            await self.send({"isFinal": True, "contextId": ctx.id})
        self.server.seen.finals.append(ctx.id)
        self.server.bump()

    def generate(self, ctx: _Context, flush: bool) -> None:
        """Start audio for the buffer when the schedule's next size is reached, or on flush."""
        need = ctx.schedule[min(ctx.step, len(ctx.schedule) - 1)]
        if ctx.buffer.strip() and (flush or len(ctx.buffer) >= need):
            ctx.jobs.put_nowait(ctx.buffer)
            ctx.buffer, ctx.step = "", ctx.step + 1

    async def watch_inactivity(self, limit: float) -> None:
        loop = asyncio.get_running_loop()
        while not self.ws.closed:
            idle = loop.time() - self.last_heard
            if idle >= limit:
                await self.fail(
                    "input_timeout_exceeded",
                    f"Have not received a new text input within the timeout of {limit} seconds.",
                )
                return
            await asyncio.sleep(limit - idle)

    async def handle(self, data: dict[str, Any]) -> bool:
        """One client message; False ends the socket."""
        seen = self.server.seen
        self.last_heard = asyncio.get_running_loop().time()
        if data.get("close_socket"):
            seen.close_socket += 1
            for ctx in self.contexts.values():
                if not ctx.closed:
                    ctx.closed = True
                    await self.final(ctx)
            await self.ws.close()
            return False
        cid = str(data.get("context_id", ""))
        text = data.get("text")
        ctx = self.contexts.get(cid)
        if data.get("close_context") and (ctx is None or ctx.closed):
            return True  # closing what is already closed is harmless
        if ctx is None or ctx.closed:
            if not isinstance(text, str) or not text.endswith(" "):
                await self.fail(
                    "invalid_input_message", f"context {cid!r} must start with text ending in a space"
                )
                return False
            key = data.pop("xi_api_key", None)
            if not self.key_ok and key != self.server.api_key:
                await self.fail("invalid_api_key", "Invalid API key")
                return False
            if self.active() >= self.faults.max_contexts:
                await self.fail(
                    "max_active_conversations",
                    "Maximum simultaneous contexts per WebSocket connection exceeded "
                    f"({self.faults.max_contexts}).",
                )
                return False
            schedule = (data.get("generation_config") or {}).get("chunk_length_schedule") or [
                120,
                160,
                250,
                290,
            ]
            ctx = self.contexts[cid] = _Context(cid, list(schedule))
            ctx.task = asyncio.create_task(self.speak(ctx))
            self.server.tasks.append(ctx.task)
            seen.inits.append({**data, "key_in_message": key is not None})
            seen.opened.append(cid)
            seen.max_active = max(seen.max_active, self.active())
            self.server.bump()
            text = text[1:]
            if not text:
                return True
        if data.get("close_context"):
            ctx.closed, ctx.buffer = True, ""
            seen.closed.append(cid)
            if ctx.jobs.empty():
                ctx.jobs.put_nowait("")  # wakes the generator so it can send isFinal
        elif text == "" and not data.get("flush"):
            seen.keepalives.append(cid)
        elif isinstance(text, str) or data.get("flush"):
            if text:
                seen.texts.append((cid, text, bool(data.get("flush"))))
                ctx.buffer += text
            self.generate(ctx, bool(data.get("flush")))
        self.server.bump()
        return True


class FakeElevenLabs:
    """The fake server; ``url`` is its base URL (``http://127.0.0.1:<port>``)."""

    def __init__(self, api_key: str, faults: Faults | None = None) -> None:
        self.api_key = api_key
        self.faults = faults or Faults()
        self.seen = Seen()
        self.chars_per_frame = 5
        self.frame_gap_s = 0.002
        self.stopping = asyncio.Event()
        self._changed = asyncio.Event()
        self._sockets: list[_Socket] = []
        self.tasks: list[asyncio.Task[None]] = []
        app = web.Application()
        app.router.add_get("/v1/text-to-speech/{voice}/multi-stream-input", self._websocket)
        app.router.add_post("/v1/text-to-speech/{voice}/stream", self._stream)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1.0)
        self.url = ""

    async def __aenter__(self) -> FakeElevenLabs:
        await self._runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        await web.SockSite(self._runner, sock).start()
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stopping.set()
        for s in self._sockets:
            await s.ws.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self._runner.cleanup()

    async def pause(self, seconds: float) -> bool:
        """Sleep, cut short when the server stops (True then)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)
        return self.stopping.is_set()

    def bump(self) -> None:
        """Wake the tests waiting on ``seen``."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait(self, predicate: Callable[[Seen], bool], timeout: float = 10.0) -> None:
        """Until ``predicate(seen)`` holds (the timeout only bounds a hang)."""
        async with asyncio.timeout(timeout):
            while not predicate(self.seen):
                await self._changed.wait()

    def _faults(self, connection: int) -> Faults:
        f = self.faults
        return f if f.on_connection in (None, connection) else Faults()

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        seen = self.seen
        seen.handshakes.append(
            {
                "path": request.path,
                "query": dict(request.query),
                "header_key": "xi-api-key" in request.headers,
            }
        )
        self.bump()
        faults = self._faults(len(seen.handshakes))
        if await self.pause(faults.ws_handshake_delay_s):
            return web.Response(status=503)
        if faults.ws_status is not None:
            return web.json_response({"detail": {"status": "refused"}}, status=faults.ws_status)
        header = request.headers.get("xi-api-key")
        if header is not None and header != self.api_key:
            return web.json_response({"detail": {"status": "invalid_api_key"}}, status=401)
        fmt, model = request.query.get("output_format", ""), request.query.get("model_id", "")
        if model not in MODELS or fmt.removeprefix("pcm_") not in {str(r) for r in PCM_RATES}:
            return web.json_response({"detail": {"status": "invalid_request"}}, status=400)
        ws = web.WebSocketResponse(timeout=1.0)
        await ws.prepare(request)
        sock = _Socket(self, ws, request, faults)
        self._sockets.append(sock)
        limit = faults.inactivity_s or float(request.query.get("inactivity_timeout", 20))
        watcher = asyncio.create_task(sock.watch_inactivity(limit))
        self.tasks.append(watcher)
        first = True
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    break
                data = json.loads(msg.data)
                if first and data.get("text") != " ":
                    await sock.fail("invalid_input_message", 'the first message must be the text " "')
                    break
                first = False
                if not await sock.handle(data):
                    break
        finally:
            watcher.cancel()
            for ctx in sock.contexts.values():
                if ctx.task is not None:
                    ctx.task.cancel()
        return ws

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        faults, seen = self.faults, self.seen
        body = await request.json()
        seen.http.append({"body": body, "query": dict(request.query)})
        self.bump()
        if request.headers.get("xi-api-key") != self.api_key:
            return _error(401, "invalid_api_key", "Invalid API key")
        if faults.http_status is not None:
            status = faults.http_status
            code = {422: "validation_error", 429: "too_many_concurrent_requests"}.get(status, "system_busy")
            headers = {"retry-after": "1"} if status == 429 else None
            return _error(status, code, "fault injected", headers)
        rate = request.query.get("output_format", "").removeprefix("pcm_")
        if (
            not rate.isdigit()
            or int(rate) not in PCM_RATES
            or not body.get("text")
            or body.get("model_id") not in MODELS
        ):
            return web.json_response({"detail": [{"loc": ["body"], "msg": "invalid"}]}, status=422)
        response = web.StreamResponse(headers={"content-type": "audio/pcm"})
        await response.prepare(request)
        if await self.pause(faults.http_first_byte_delay_s):
            return response
        sent = 0
        for ch in body["text"]:
            if faults.http_drop_after_bytes is not None and sent >= faults.http_drop_after_bytes:
                assert request.transport is not None
                request.transport.abort()
                return response
            if faults.http_stall_after_bytes is not None and sent >= faults.http_stall_after_bytes:
                await self.stopping.wait()
                return response
            pcm = char_pcm(ch, int(rate))
            await response.write(pcm)
            sent += len(pcm)
        await response.write_eof()
        return response


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"detail": {"status": code, "message": message}}, status=status, headers=headers)
