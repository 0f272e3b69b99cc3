"""Command line: serve | validate | config show | dlq stats|verify|replay|cat | healthcheck.

What an operator sees when something is wrong is one line per problem on stderr, never a
traceback: every bad variable (exit 2), then, for `serve`, every directory it cannot write and an
address it cannot bind (exit 1), all checked before anything starts. A variable that looks like a
misspelling of one of ours gets a warning line. No secret is printed (config.py masks them in
errors and `config show`; log.py redacts them from every log line).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
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
    sock = metrics_sock = None
    try:
        sock = preflight.bind(settings, reuse_port=settings.workers > 1)
    except preflight.StartupError as err:
        problems.append(str(err))
    try:
        metrics_sock = preflight.bind_metrics(settings)
    except preflight.StartupError as err:
        problems.append(str(err))
    if problems:
        for s in (sock, metrics_sock):
            if s is not None:
                s.close()
        _say("cannot start: ", problems)
        return EXIT_STARTUP
    assert sock is not None

    from estat_ingest import log

    log.setup(settings.log_level, settings.log_format, redact=settings.secret_values(),
              service="estat-ingest", instance=settings.instance_id)
    if settings.workers > 1:
        from estat_ingest.workers import run_workers

        return run_workers(settings, holder=sock, metrics_sock=metrics_sock)

    from estat_ingest.app import serve
    from estat_ingest.runtime import run

    logging.getLogger("estat_ingest").info("starting", extra={"version": __version__,
                                                              "config": settings.describe()})
    return run(serve(settings, sock=sock, metrics_sock=metrics_sock, settle_gc=True))


def cmd_validate(args: argparse.Namespace) -> int:
    """The configuration (every bad variable), the directories it names (the start-up probe) and,
    with --check-sinks, each sink tried with the real credentials: one line per problem; `ok` lines
    and 0 when there is none."""
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
    sink_problems: list[str] = []
    sink_ok: list[str] = []
    if args.check_sinks and not config_problems:  # a sink built from bad values would test nothing
        # the file sink's directory has its line already when the start-up probe refused it
        skip_sinks = {"file"} if any(p.startswith("FILE_SINK_DIR=") for p in machine_problems) else set()
        sink_ok, sink_problems = check_sinks(settings, skip=skip_sinks)
    _say("configuration error: ", config_problems)
    _say("cannot start: ", machine_problems)
    _say("", sink_problems)
    if args.check_sinks and config_problems:
        _say("note: ", ["sinks not checked: fix the configuration first"])
    _warn_misspelt()
    if config_problems:
        return EXIT_CONFIG
    for line in sink_ok:  # also when another sink or a directory has a problem: each sink has its say
        print(f"ok: {line}")
    if machine_problems or sink_problems:
        return EXIT_STARTUP
    dirs = ", ".join(f"{name}={path}" for name, path in preflight.directories(settings))
    print(f"ok: configuration valid, sinks {','.join(settings.sinks)}; writable: {dirs}")
    return 0


def check_sinks(settings: Settings, skip: set[str] | None = None) -> tuple[list[str], list[str]]:
    """`validate --check-sinks`: each configured sink built as `serve` builds it and probed with the
    real credentials (`Sink.probe`). (ok lines, problem lines), each `sink <name>: …`, secrets
    redacted whatever a destination answered."""
    import asyncio

    from estat_ingest.log import Redactor
    from estat_ingest.sinks import build_sink
    from estat_ingest.sinks.base import Probe

    redact = Redactor(settings.secret_values())

    async def one(name: str) -> Probe:
        sink = build_sink(name, settings)
        # every request of a probe is bounded by the sink's own timeout; this bounds the whole
        bound = max(10.0, 6 * sink.spec.timeout_s)
        try:
            async with asyncio.timeout(bound):
                await sink.start()
                return await sink.probe()
        except TimeoutError:
            return Probe("", (f"no answer within {bound:g}s",))
        except Exception as err:  # a client that cannot even be built: one line, not a traceback
            return Probe("", (f"cannot start the sink: {type(err).__name__}: {err}",))
        finally:
            with contextlib.suppress(Exception):
                await sink.aclose()

    async def all_sinks() -> list[tuple[str, Probe]]:
        return [(name, await one(name)) for name in settings.sinks if name not in (skip or set())]

    # the sinks' own log lines (a node marked down, botocore's notes) are not for this output: the
    # probe's lines say it all, and logging is not set up (no redaction) in this command
    logging.disable(logging.CRITICAL)
    try:
        probed = asyncio.run(all_sinks())
    finally:
        logging.disable(logging.NOTSET)
    ok, problems = [], []
    for name, probe in probed:
        if probe.problems:
            problems += [redact(f"sink {name}: {line}") for line in probe.problems]
        else:
            ok.append(redact(f"sink {name}: {probe.checked}"))
    return ok, problems


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
    v.add_argument("--check-sinks", action="store_true",
                   help="also try each sink with the real credentials: an S3 test object written and deleted, "
                        "OpenSearch authentication and the target index, the file sink's directory")
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


EXIT_SIGPIPE = 128 + 13  # the reader went away (`dlq cat DIR | head`): what cat and zcat exit with


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
        sys.stdout.flush()
    except BrokenPipeError:
        # quietly, like cat: no traceback, and no second error when Python flushes stdout at exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_SIGPIPE
    return code


if __name__ == "__main__":
    raise SystemExit(main())
