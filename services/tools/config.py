"""``voicebus config``: the table of every VB_* setting, generated from the settings classes."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from pathlib import Path

import services


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the command."""
    parser.add_argument("--check", metavar="FILE", help="exit 1 if FILE does not hold the current table")
    parser.add_argument("--write", metavar="FILE", help="write the table into FILE between the markers")


BEGIN, END = "<!-- config:begin -->", "<!-- config:end -->"


def table() -> str:
    """Import every module of the services (so every settings class registers), render the table."""
    for info in pkgutil.walk_packages(services.__path__, prefix="services."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
    from services.runtime.config import markdown_table

    return markdown_table()


def _splice(document: str, body: str) -> str:
    head, _, rest = document.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return f"{head}{BEGIN}\n{body}{END}{tail}"


def main(args: argparse.Namespace) -> int:
    """Print, write or check the table."""
    body = table()
    if args.check:
        current = Path(args.check).read_text()
        if _splice(current, body) != current:
            print(f"{args.check} is stale: run `just docs`", file=sys.stderr)
            return 1
        return 0
    if args.write:
        path = Path(args.write)
        path.write_text(_splice(path.read_text(), body))
        return 0
    print(body, end="")
    return 0
