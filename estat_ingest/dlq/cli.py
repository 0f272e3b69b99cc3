"""`estat-ingest dlq stats|verify|replay|cat` (operator commands)."""

from __future__ import annotations

import argparse
import sys


def _todo(args: argparse.Namespace) -> int:
    print("estat-ingest dlq: not available in this build yet", file=sys.stderr)
    return 2


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    d = sub.add_parser("dlq", help="inspect, verify and replay DLQ directories")
    dsub = d.add_subparsers(dest="dlq_command", required=True)
    for name in ("stats", "verify", "replay", "cat"):
        x = dsub.add_parser(name)
        x.add_argument("path")
        x.set_defaults(func=_todo)
