"""Command line: serve | config show | dlq stats|verify|replay|cat | healthcheck."""

from __future__ import annotations

import argparse
import sys
import urllib.request
from collections.abc import Sequence
from typing import Any

import orjson

from estat_ingest import __version__
from estat_ingest.config import ConfigError, Settings


def _load(overrides: dict[str, Any] | None = None) -> Settings:
    try:
        return Settings.from_env(None, **(overrides or {}))
    except ConfigError as err:
        print(f"estat-ingest: configuration error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_serve(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {}
    if args.workers is not None:
        overrides["workers"] = args.workers
    settings = _load(overrides)
    from estat_ingest import log

    log.setup(settings.log_level, settings.log_format, service="estat-ingest", instance=settings.instance_id)
    if settings.workers > 1:
        from estat_ingest.workers import run_workers

        return run_workers(settings)
    import logging

    from estat_ingest.app import serve

    logging.getLogger("estat_ingest").info("starting", extra={"version": __version__,
                                                              "config": settings.describe()})
    from estat_ingest.runtime import run

    return run(serve(settings))


def cmd_config_show(args: argparse.Namespace) -> int:
    settings = _load()
    sys.stdout.write(orjson.dumps(settings.describe(), option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


def cmd_healthcheck(args: argparse.Namespace) -> int:
    try:
        with urllib.request.urlopen(args.url, timeout=args.timeout) as resp:
            return 0 if resp.status == 200 else 1
    except OSError:
        return 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="estat-ingest", description="HTTP event ingest server")
    p.add_argument("--version", action="version", version=f"estat-ingest {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the server (configuration from the environment)")
    s.add_argument("--workers", type=int, default=None, help="processes sharing the port (SO_REUSEPORT)")
    s.set_defaults(func=cmd_serve)

    c = sub.add_parser("config", help="configuration")
    csub = c.add_subparsers(dest="config_command", required=True)
    cs = csub.add_parser("show", help="print the effective configuration (secrets masked)")
    cs.set_defaults(func=cmd_config_show)

    h = sub.add_parser("healthcheck", help="exit 0 if /health answers 200 (for container health checks)")
    h.add_argument("--url", default="http://127.0.0.1:8080/health")
    h.add_argument("--timeout", type=float, default=2.0)
    h.set_defaults(func=cmd_healthcheck)

    from estat_ingest.dlq.cli import add_parser as add_dlq

    add_dlq(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
