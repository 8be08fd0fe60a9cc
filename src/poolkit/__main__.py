"""poolkit on the command line: `poolkit demo`, or `python -m poolkit demo`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from . import _demo
from ._version import __version__

Command = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="poolkit",
        description="poolkit: a pooled, load-balanced gRPC client channel for Python.",
    )
    parser.add_argument("--version", action="version", version=f"poolkit {__version__}")
    commands = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND", required=True)

    demo = commands.add_parser(
        "demo",
        help="load local echo servers through one poolkit channel, then contrast a channel per request",
        description=(
            "Start local echo servers on loopback, send calls to them through one poolkit channel from "
            "several threads (or, with --aio, one poolkit.aio channel from asyncio tasks) with live progress, "
            "its connections bound to loopback source addresses 127.0.0.2, 127.0.0.3, ... (--sources), "
            "and summarise where the calls went, per endpoint and per source address. "
            "A third of the way in, one server is killed; two thirds in, "
            "it is restarted on the same port, and the summary shows how the pool routed around it. Then make "
            "a few hundred calls the naive way, a fresh grpc channel per request, and compare the two. "
            "Exits 1 if a pooled call failed while every server was up (or, with --no-fault, at all), "
            "or the server could not be restarted."
        ),
    )
    _demo.add_arguments(demo)
    demo.set_defaults(run=_demo.command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run: Command = args.run
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
