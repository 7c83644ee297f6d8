"""``voicebus proto``: regenerate proto/asyncapi.json from the code, or check that it has not drifted."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the command."""
    parser.add_argument("--check", action="store_true", help="exit 1 if the checked-in document is stale")


def main(args: argparse.Namespace) -> int:
    """Write or check the document."""
    from proto import docgen

    text = docgen.render()
    if args.check:
        if docgen.DOCUMENT.read_text() != text:
            print(f"{docgen.DOCUMENT} is stale: run `just proto`", file=sys.stderr)
            return 1
        return 0
    docgen.DOCUMENT.write_text(text)
    print(f"wrote {docgen.DOCUMENT}")
    return 0
