"""`authproxy run | check | demo`. Exit codes: 0 clean stop, 2 bad config or usage, 1 else.

A config mistake never shows a traceback: it prints the list of problems.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from proxy import __version__
from proxy.config import Config, load_config, resolve_config_path
from proxy.errors import ConfigError
from proxy.logs import configure_logging

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="authproxy", description="A local authenticating reverse proxy."
    )
    parser.add_argument("--version", action="version", version=f"authproxy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the proxy")
    run.add_argument(
        "-c", "--config", help="config file (default: $AUTHPROXY_CONFIG, ./config.yaml)"
    )
    run.add_argument("--host", help="listen address (overrides listen.host)")
    run.add_argument("--port", type=int, help="listen port (overrides listen.port)")
    run.add_argument("--log-format", choices=["json", "console"], help="log format")
    run.add_argument(
        "--workers", type=int, help="serving processes behind one socket (overrides workers)"
    )

    check = commands.add_parser("check", help="validate the config without touching the network")
    check.add_argument(
        "-c", "--config", help="config file (default: $AUTHPROXY_CONFIG, ./config.yaml)"
    )

    demo = commands.add_parser("demo", help="run the proxy in front of built-in fake APIs")
    demo.add_argument("--port", type=int, default=8080, help="proxy port (default 8080)")
    demo.add_argument("--host", default="127.0.0.1", help="proxy address (default 127.0.0.1)")
    demo.add_argument("--lifetime", type=float, default=30.0, help="fake token lifetime, seconds")
    return parser


def _print_problems(path: str, exc: ConfigError) -> None:
    print(f"{path}: {len(exc.problems)} problem(s)", file=sys.stderr)
    for problem in exc.problems:
        print(f"  {problem}", file=sys.stderr)


def _load(args: argparse.Namespace, overrides: dict[str, Any]) -> tuple[str, Config]:
    path = resolve_config_path(args.config)
    return path, load_config(path, overrides=overrides)


def _check(args: argparse.Namespace) -> int:
    try:
        path, config = _load(args, {})
    except ConfigError as exc:
        _print_problems(resolve_config_path(args.config), exc)
        return EXIT_USAGE
    for name, upstream in config.upstreams.items():
        egress = config.egress_for(name).proxy_for_url(upstream.url)
        via = f" via egress proxy {egress.address}" if egress is not None else ""
        print(f"{config.prefix_of(name)} -> {upstream.url} ({upstream.auth.type}){via}")
    for warning in config.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{path}: ok, {len(config.upstreams)} route(s)", file=sys.stderr)
    return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    from proxy.server import run, serve, tune_allocator

    overrides = {
        "listen.host": args.host,
        "listen.port": args.port,
        "log.format": args.log_format,
        "workers": args.workers,
    }
    try:
        _, config = _load(args, overrides)
    except ConfigError as exc:
        _print_problems(resolve_config_path(args.config), exc)
        return EXIT_USAGE
    from proxy.reload import ConfigSource

    configure_logging(config.log.level, config.log.format, config.secrets)
    tune_allocator()
    source = ConfigSource(resolve_config_path(args.config), overrides)
    if config.workers > 1:
        from proxy.supervisor import supervise

        return supervise(config, source)
    run(serve(config, source=source), config.event_loop)
    return EXIT_OK


def _demo(args: argparse.Namespace) -> int:
    from proxy.demo import run_demo
    from proxy.server import run, tune_allocator

    tune_allocator()
    run(run_demo(host=args.host, port=args.port, lifetime=args.lifetime))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handlers = {"run": _run, "check": _check, "demo": _demo}
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:
        return EXIT_OK
    except OSError as exc:
        print(f"authproxy: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_ERROR
