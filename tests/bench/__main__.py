"""``just bench [scenario ...] [--runs N]``: run benchmark scenarios, report medians with ranges."""

from __future__ import annotations

import argparse

from services.tools.stack import NatsServer
from tests.bench import bargein, hop, report, turn

SCENARIOS = ("hop", "turn", "barge-in", "local")


def main() -> None:
    parser = argparse.ArgumentParser(prog="just bench")
    parser.add_argument("scenarios", nargs="*", choices=[*SCENARIOS, []])
    parser.add_argument("--runs", type=int, default=3)
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


if __name__ == "__main__":
    main()
