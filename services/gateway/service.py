"""``voicebus gateway``: the browser edge's HTTP front, a stateless process (run as many as needed).

It holds an edge connection to the bus, serves the API and the page on VB_GATEWAY_PORT, and health and
metrics on VB_HTTP_PORT like every service. SIGTERM stops taking requests and closes event streams;
calls in progress are not affected (their media flows between the browser and ingress/egress).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
import sys

from aiohttp import web

from proto import subjects as sj
from services.gateway.app import Gateway
from services.gateway.config import GatewayConfig
from services.livekit.config import LiveKitConfig
from services.runtime import health, log
from services.runtime.bus import Bus
from services.runtime.config import ConfigError, RuntimeConfig, load

logger = logging.getLogger("voicebus.gateway")


async def serve(cfg: GatewayConfig, runtime: RuntimeConfig) -> int:
    """Serve until SIGTERM/SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    replica = runtime.replica_id()
    bus: Bus | None = None

    def ready() -> tuple[bool, str]:
        if stop.is_set():
            return False, "stopping"
        if bus is None or not bus.nc.is_connected:
            return False, "not connected to nats"
        return True, "ok"

    probes = health.HealthServer(runtime.http_host, runtime.http_port, ready)
    await probes.start()
    bus = await Bus.connect(runtime, sj.EDGE, replica)
    gateway = Gateway(bus, cfg)
    runner = web.AppRunner(gateway.app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, cfg.host, cfg.port).start()
    port = runner.addresses[0][1]
    if gateway.keys.open and not _loopback(cfg.host):
        logger.warning("no VB_GATEWAY_API_KEYS: anyone who reaches %s:%d may open sessions", cfg.host, port)
    logger.info("gateway %s ready on %s:%d", replica, cfg.host, port, extra={"port": port})
    await stop.wait()
    await runner.cleanup()
    await probes.stop()
    await bus.close()
    return 0


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def main() -> int:
    """Run one gateway replica."""
    try:
        runtime = load(RuntimeConfig)
        cfg = load(GatewayConfig, livekit=load(LiveKitConfig))
    except ConfigError as e:
        print(f"gateway: {e}", file=sys.stderr)
        return 2
    log.setup(runtime.log_level, redact_pii=runtime.redact_pii)
    return asyncio.run(serve(cfg, runtime))
