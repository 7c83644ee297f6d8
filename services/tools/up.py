"""``voicebus up``: the whole system on this machine, each stage its own process, until Ctrl-C.

Uses the NATS server named by VB_NATS_URL when it is set; otherwise starts a local nats-server with
JetStream (data under out/nats) on the port given by --nats-port. Starts the gateway too (unless
--no-gateway): its page, on 127.0.0.1 unless VB_GATEWAY_HOST says otherwise, is where you talk to the
agent.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
from pathlib import Path

from proto.events import STAGES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the command."""
    parser.add_argument("--replicas", type=int, default=1, help="replicas of each stage (default 1)")
    parser.add_argument("--nats-port", type=int, default=4222, help="port of the local nats-server it starts")
    parser.add_argument("--stages", default=",".join(STAGES), help="stages to run, comma-separated")
    parser.add_argument(
        "--port", type=int, default=8080, help="port of the gateway's page and API (default 8080)"
    )
    parser.add_argument("--no-gateway", action="store_true", help="run the stages only, no browser edge")


def main(args: argparse.Namespace) -> int:
    """Start everything, print where it is, wait for a signal, stop everything."""
    from services.tools.stack import NatsServer, Stack

    nats = None
    url = os.environ.get("VB_NATS_URL", "")
    if not url:
        os.makedirs("out/nats", exist_ok=True)
        nats = NatsServer(port=args.nats_port, store_dir="out/nats")
        nats.start()
        url = nats.url
    stack = Stack(nats_url=url, log_dir=Path("out/logs"))
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stack.start([s for s in args.stages.split(",") if s], replicas=args.replicas)
        if not args.no_gateway:
            host = os.environ.get("VB_GATEWAY_HOST", "127.0.0.1")
            gateway = stack.spawn("gateway", env={"VB_GATEWAY_HOST": host, "VB_GATEWAY_PORT": str(args.port)})
            stack.wait_ready([gateway])
        print(f"voicebus is up on {url}")
        for p in stack.processes:
            metrics_url = f"http://127.0.0.1:{p.http_port}/metrics"
            print(f"  {p.replica:<14} pid {p.proc.pid:<7} {metrics_url}  log {p.log_path}")
        if not args.no_gateway:
            print(f"\nTalk to the agent: http://127.0.0.1:{args.port}/\n")
        print("Ctrl-C stops it.")
        while not stop.wait(0.5):
            if dead := [p for p in stack.processes if not p.alive]:
                print(f"{', '.join(p.replica for p in dead)} exited; stopping")
                return 1
        return 0
    finally:
        stack.stop()
        if nats is not None:
            nats.stop()
