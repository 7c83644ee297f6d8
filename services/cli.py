"""The ``voicebus`` command: run a stage, bring up the whole system, and the tools around it."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from proto.events import STAGES


def _run_stage(stage: str) -> Callable[[argparse.Namespace], int]:
    def run(_: argparse.Namespace) -> int:
        module = importlib.import_module(f"services.{stage}.service")
        return int(module.main())

    return run


def _tool(module: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        return int(importlib.import_module(f"services.tools.{module}").main(args))

    return run


def build_parser() -> argparse.ArgumentParser:
    """All subcommands; each tool adds its own arguments in ``services.tools.<tool>.add_arguments``."""
    parser = argparse.ArgumentParser(prog="voicebus", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for stage in STAGES:
        p = sub.add_parser(stage, help=f"run one {stage} replica (configured by VB_* environment variables)")
        p.set_defaults(func=_run_stage(stage))
    p = sub.add_parser("gateway", help="run one gateway replica: sessions, WHIP/WHEP and the web page")
    p.set_defaults(func=_run_stage("gateway"))
    tools = {
        "up": "start NATS (unless VB_NATS_URL is set), every stage and the gateway, until Ctrl-C",
        "proto": "regenerate the contract document proto/asyncapi.json (--check: fail if it drifted)",
        "config": "print the table of every VB_* setting (--check FILE: fail if FILE drifted)",
        "demo": "a spoken conversation through the five services, offline; per-turn latency table",
        "trace": "draw a turn's trace as a waterfall in the terminal",
        "record": "export a recorded session from JetStream to a file",
        "replay": "feed a recording through the running services and compare the outcome",
        "natsconf": "the nats-server configuration with one permissioned user per service",
    }
    for name, help_text in tools.items():
        p = sub.add_parser(name, help=help_text)
        module = importlib.import_module(f"services.tools.{name}")
        module.add_arguments(p)
        p.set_defaults(func=_tool(name))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and run the command; returns the exit code."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
