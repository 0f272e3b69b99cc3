"""Command line: serve | validate | config show | dlq stats|verify|replay|cat | healthcheck.

What an operator sees when something is wrong is one line per problem on stderr, never a
traceback: every bad variable (exit 2), then, for `serve`, every directory it cannot write and an
address it cannot bind (exit 1), all checked before anything starts. A variable that looks like a
misspelling of one of ours gets a warning line. No secret is printed (config.py masks them in
errors and `config show`; log.py redacts them from every log line).
"""

from __future__ import annotations

import argparse
import logging
import sys
import urllib.request
from collections.abc import Sequence
from typing import Any

import orjson

from estat_ingest import __version__
from estat_ingest.config import VARIABLES, ConfigError, Settings, misspelt_variables

EXIT_CONFIG = 2  # a bad variable
EXIT_STARTUP = 1  # the machine refuses: a directory, the address


def _say(prefix: str, lines: Sequence[str]) -> None:
    for line in lines:
        print(f"estat-ingest: {prefix}{line}", file=sys.stderr)


def _warn_misspelt() -> None:
    _say("warning: ", misspelt_variables())


def _load(overrides: dict[str, Any] | None = None) -> Settings:
    """The configuration, or every bad variable on stderr and exit 2."""
    try:
        settings = Settings.from_env(None, **(overrides or {}))
    except ConfigError as err:
        _say("configuration error: ", err.problems)
        _warn_misspelt()
        raise SystemExit(EXIT_CONFIG) from None
    _warn_misspelt()
    return settings


def cmd_serve(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {}
    if args.workers is not None:
        overrides["workers"] = args.workers
    settings = _load(overrides)

    # the machine, before anything starts: directories, then the address (kept: serve uses it)
    from estat_ingest import preflight

    problems = preflight.directory_problems(settings)
    sock = None
    try:
        sock = preflight.bind(settings, reuse_port=settings.workers > 1)
    except preflight.StartupError as err:
        problems.append(str(err))
    if problems:
        if sock is not None:
            sock.close()
        _say("cannot start: ", problems)
        return EXIT_STARTUP
    assert sock is not None

    from estat_ingest import log

    log.setup(settings.log_level, settings.log_format, redact=settings.secret_values(),
              service="estat-ingest", instance=settings.instance_id)
    if settings.workers > 1:
        from estat_ingest.workers import run_workers

        return run_workers(settings, holder=sock)

    from estat_ingest.app import serve
    from estat_ingest.runtime import run

    logging.getLogger("estat_ingest").info("starting", extra={"version": __version__,
                                                              "config": settings.describe()})
    return run(serve(settings, sock=sock))


def cmd_validate(args: argparse.Namespace) -> int:
    """The configuration (every bad variable) and the directories it names (the start-up probe),
    one line per problem; `ok` and 0 when there is none."""
    from estat_ingest import preflight

    try:
        settings = Settings.from_env()
        config_problems: list[str] = []
        skip: frozenset[str] = frozenset()
    except ConfigError as err:
        if err.settings is None:
            raise
        # go on with what parsed: the bad variables are at their defaults, so skip the
        # directories that depend on one of them (FILE_SINK_DIR is probed with the file sink only,
        # SPOOL_DIR with ACK_MODE=durable only)
        settings, config_problems = err.settings, err.problems
        depends = {"SINKS": "FILE_SINK_DIR", "ACK_MODE": "SPOOL_DIR"}
        skip = err.failed | {d for var, d in depends.items() if var in err.failed}
    machine_problems = preflight.directory_problems(settings, skip=skip)
    # Sink probes (a request to each configured sink with its real credentials) would run here,
    # after the configuration and the directories, once the sink seam offers a probe.
    _say("configuration error: ", config_problems)
    _say("cannot start: ", machine_problems)
    _warn_misspelt()
    if config_problems:
        return EXIT_CONFIG
    if machine_problems:
        return EXIT_STARTUP
    dirs = ", ".join(f"{name}={path}" for name, path in preflight.directories(settings))
    print(f"ok: configuration valid, sinks {','.join(settings.sinks)}; writable: {dirs}")
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    settings = _load()
    if args.json:
        sys.stdout.write(orjson.dumps(settings.describe_sources(), option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    width = max(len(v.name) for v in VARIABLES) + 24
    for name, item in settings.describe_sources().items():
        sys.stdout.write(f"{name}={item['value']}".ljust(width) + f"  # {item['source']}\n")
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

    v = sub.add_parser("validate", help="check the configuration and its directories; exit 0 if all is well")
    v.set_defaults(func=cmd_validate)

    c = sub.add_parser("config", help="configuration")
    csub = c.add_subparsers(dest="config_command", required=True)
    cs = csub.add_parser("show", help="print every variable: its value and where it came from (secrets masked)")
    cs.add_argument("--json", action="store_true",
                    help='one JSON object: {"NAME": {"value": ..., "source": "env|default"}}')
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
