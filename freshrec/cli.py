"""The ``freshrec`` command."""

from __future__ import annotations

import argparse
import sys


def cmd_setup(args: argparse.Namespace) -> int:
    from streaming.jars import ensure_jars

    for path in ensure_jars():
        print(f"ok  {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="freshrec", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("setup", help="fetch the Kafka connector jars for Flink").set_defaults(func=cmd_setup)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
