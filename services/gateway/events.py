"""A session's conversation events for the page, as server-sent events.

The page draws the captions, the agent's state and each turn's latency from them. Each event's SSE id
is its sequence in the events stream, so an EventSource that reconnects (it does so by itself) resumes
after the last event it got (``Last-Event-ID``) instead of replaying the conversation.
"""

from __future__ import annotations

import asyncio
import contextlib

import msgspec
from aiohttp import web

from proto import events as ev
from proto import subjects as sj
from services.runtime.bus import Bus, Delivery

#: A comment line this often keeps proxies from closing a quiet stream.
KEEPALIVE_S = 15.0
#: Events buffered for a client that reads slowly; beyond it the stream is closed (it reconnects).
BUFFER = 1024
#: Acks are bookkeeping between stages; the page has no use for them.
HIDDEN = (ev.ControlAck,)

_json = msgspec.json.Encoder()


def resume_after(request: web.Request) -> int:
    """Stream sequence of the last event the client has, from ``Last-Event-ID`` (0: from the start)."""
    raw = request.headers.get("Last-Event-ID", "")
    return int(raw) if raw.isdigit() else 0


async def stream(request: web.Request, bus: Bus, session: str, closing: asyncio.Event) -> web.StreamResponse:
    """Send the session's events until it ends, the client goes, or the gateway shuts down."""
    queue: asyncio.Queue[Item] = asyncio.Queue(BUFFER)
    overflow = asyncio.Event()

    async def collect(event: ev.Event, delivery: Delivery) -> None:
        if isinstance(event, HIDDEN):
            return
        try:
            queue.put_nowait((delivery.stream_seq, event))
        except asyncio.QueueFull:
            overflow.set()

    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
    await response.prepare(request)
    subscription = await bus.follow([sj.conversation(session)], resume_after(request), collect)
    try:
        while not overflow.is_set():
            item = await _next(queue, closing)
            if item is None:
                if closing.is_set():
                    break
                await response.write(b": keep-alive\n\n")
                continue
            seq, event = item
            await response.write(b"id: %d\ndata: %s\n\n" % (seq, _json.encode(event)))
            if isinstance(event, ev.SessionEnded):
                break
    except ConnectionResetError:
        pass  # the page went away
    finally:
        with contextlib.suppress(Exception):
            await subscription.unsubscribe()
    return response


Item = tuple[int, ev.Event]


async def _next(queue: asyncio.Queue[Item], closing: asyncio.Event) -> Item | None:
    """The next event, or None after ``KEEPALIVE_S`` of quiet or when the gateway is closing."""
    get = asyncio.ensure_future(queue.get())
    stop = asyncio.ensure_future(closing.wait())
    try:
        done, _ = await asyncio.wait({get, stop}, timeout=KEEPALIVE_S, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (get, stop):
            task.cancel()
        await asyncio.gather(get, stop, return_exceptions=True)
    return get.result() if get in done else None
