"""``just bench [scenario ...] [--runs N]``: run benchmark scenarios, report medians with ranges."""

from __future__ import annotations

import argparse

from services.tools.stack import NatsServer
from tests.bench import bargein, concurrency, failover, hop, report, turn

SCENARIOS = ("hop", "turn", "barge-in", "local", "failover", "concurrency")


def main() -> None:
    parser = argparse.ArgumentParser(prog="just bench")
    parser.add_argument("scenarios", nargs="*", choices=[*SCENARIOS, []])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sessions", type=int, nargs="*", help="loads of the concurrency scenario")
    args = parser.parse_args()
    for scenario in args.scenarios or SCENARIOS:
        if scenario == "hop":
            nats = NatsServer()
            nats.start()
            try:
                runs = [hop.run_once(nats.url, i) for i in range(args.runs)]
            finally:
                nats.stop()
            print(report.write("hop", runs, hop.UNITS))
        elif scenario == "turn":
            print(report.write("turn", turn.run_turn(args.runs), turn.UNITS))
        elif scenario == "barge-in":
            for speed in (1.0, 4.0):
                name = f"barge-in-{speed:g}x"
                print(report.write(name, bargein.run_bargein(args.runs, speed), bargein.UNITS))
        elif scenario == "local":
            print(report.write("local", turn.run_local(args.runs), turn.UNITS))
        elif scenario == "failover":
            print(report.write("failover", failover.run_failover(args.runs), failover.UNITS, failover.NOTE))
        elif scenario == "concurrency":
            loads = tuple(args.sessions) if args.sessions else concurrency.LOADS
            print(
                report.write("concurrency", concurrency.run_concurrency(args.runs, loads), concurrency.UNITS)
            )


if __name__ == "__main__":
    main()
