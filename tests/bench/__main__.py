"""``just bench [scenario ...] [--runs N]``: run benchmark scenarios, report medians with ranges."""

from __future__ import annotations

import argparse

from services.tools.stack import NatsServer
from tests.bench import hop, report

SCENARIOS = ("hop",)


def main() -> None:
    parser = argparse.ArgumentParser(prog="just bench")
    parser.add_argument("scenarios", nargs="*", default=list(SCENARIOS), choices=[*SCENARIOS, []])
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


if __name__ == "__main__":
    main()
