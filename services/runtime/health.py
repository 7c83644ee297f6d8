"""The HTTP side of every service: /healthz (liveness), /readyz (readiness), /metrics (Prometheus).

Liveness fails when the event loop stops turning (a blocked loop is a dead service); readiness fails
until the service is connected and holding its lease, and again once it starts draining, so Kubernetes
stops routing to it. Services add their own routes (WHIP/WHEP, tokens) to the same app.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

LOOP_STALL_S = 5.0


class HealthServer:
    """An aiohttp app with the probe routes; ``ready`` is a callable the service owns."""

    def __init__(self, host: str, port: int, ready: Callable[[], tuple[bool, str]]) -> None:
        self.app = web.Application()
        self.app.router.add_get("/healthz", self._healthz)
        self.app.router.add_get("/readyz", self._readyz)
        self.app.router.add_get("/metrics", self._metrics)
        self._host, self._port, self._ready = host, port, ready
        self._runner: web.AppRunner | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._last_tick = time.monotonic()
        self.port = port

    async def start(self) -> None:
        """Bind the server (port 0 picks a free one, then ``port`` holds it) and start the loop probe."""
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self._host, self._port).start()
        self.port = self._runner.addresses[0][1]
        self._ticker = asyncio.create_task(self._tick(), name="health-tick")

    async def stop(self) -> None:
        """Stop serving."""
        if self._ticker:
            self._ticker.cancel()
            await asyncio.gather(self._ticker, return_exceptions=True)
        if self._runner:
            await self._runner.cleanup()

    async def _tick(self) -> None:
        while True:
            self._last_tick = time.monotonic()
            await asyncio.sleep(0.5)

    async def _healthz(self, _: web.Request) -> web.Response:
        stalled = time.monotonic() - self._last_tick
        if stalled > LOOP_STALL_S:
            return web.json_response({"ok": False, "loop_stalled_s": round(stalled, 1)}, status=503)
        return web.json_response({"ok": True})

    async def _readyz(self, _: web.Request) -> web.Response:
        ok, why = self._ready()
        return web.json_response({"ready": ok, "why": why}, status=200 if ok else 503)

    async def _metrics(self, _: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})
