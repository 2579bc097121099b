"""The ``rollbackd`` command line: the parser; the commands live in
``config_commands.py`` (no daemon needed) and ``operator_commands.py`` (through the API)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from rollbackd import __version__
from rollbackd.cli.config_commands import (
    DEFAULT_CONFIG,
    cmd_check,
    cmd_eval,
    cmd_replay,
    cmd_run,
)
from rollbackd.cli.operator_commands import (
    cmd_approve,
    cmd_history,
    cmd_pause,
    cmd_reject,
    cmd_release,
    cmd_resume,
    cmd_rollback,
    cmd_status,
    operator_command,
)


def _add_operator_commands(commands: Any) -> None:
    common = _finding_the_daemon()
    _add_read_commands(commands, common)
    _add_write_commands(commands, common)


def _finding_the_daemon() -> argparse.ArgumentParser:
    """The options every operator command shares: where the daemon is, how to answer."""
    common = argparse.ArgumentParser(add_help=False)
    found = common.add_argument_group("finding the daemon")
    found.add_argument(
        "-c",
        "--config",
        default=None,
        help=f"the daemon's config: its [server].listen and token (default {DEFAULT_CONFIG})",
    )
    found.add_argument("--url", help="the daemon's URL, e.g. http://127.0.0.1:9095")
    found.add_argument("--token-file", help="a file holding the API token")
    found.add_argument(
        "--timeout", type=float, default=30.0, help="seconds to wait for an answer (30)"
    )
    common.add_argument("--json", action="store_true", help="machine-readable output")
    return common


def _add_read_commands(commands: Any, common: argparse.ArgumentParser) -> None:
    status = commands.add_parser(
        "status",
        parents=[common],
        help="the running daemon: services, versions, check states, rollbacks in flight",
    )
    status.set_defaults(handler=operator_command(cmd_status))

    history = commands.add_parser("history", parents=[common], help="rollbacks, the latest first")
    history.add_argument("--service", help="only this service")
    history.add_argument(
        "--state",
        choices=[
            "pending",
            "running",
            "verifying",
            "succeeded",
            "failed",
            "rejected",
            "expired",
            "interrupted",
            "dry_run",
        ],
        help="only rollbacks in this state",
    )
    history.add_argument("--limit", type=int, default=50, help="at most this many (50)")
    history.set_defaults(handler=operator_command(cmd_history))


def _add_write_commands(commands: Any, common: argparse.ArgumentParser) -> None:
    rollback = commands.add_parser(
        "rollback",
        parents=[common],
        help="a manual rollback, through the same pipeline (guards, executors, verification)",
    )
    rollback.add_argument("service")
    rollback.add_argument(
        "--to", metavar="VERSION", help="the version to put back (default: last known good)"
    )
    rollback.add_argument("--reason", required=True, help="why, for the audit record")
    rollback.set_defaults(handler=operator_command(cmd_rollback))

    approve = commands.add_parser(
        "approve", parents=[common], help="run a rollback that waits for approval"
    )
    approve.add_argument("id", type=int)
    approve.set_defaults(handler=operator_command(cmd_approve))

    reject = commands.add_parser(
        "reject", parents=[common], help="refuse a rollback that waits for approval"
    )
    reject.add_argument("id", type=int)
    reject.add_argument("--reason", help="why, for the audit record")
    reject.set_defaults(handler=operator_command(cmd_reject))

    for name, helptext, handler in (
        ("pause", "stop automatic rollbacks (checks keep running)", cmd_pause),
        ("resume", "restart automatic rollbacks (and thaw a frozen service)", cmd_resume),
    ):
        switch = commands.add_parser(name, parents=[common], help=helptext)
        which = switch.add_mutually_exclusive_group(required=True)
        which.add_argument("service", nargs="?", help="one service")
        which.add_argument("--all", action="store_true", help="every service")
        switch.set_defaults(handler=operator_command(handler))

    release = commands.add_parser(
        "release",
        parents=[common],
        help="record a release (from CI), for a service whose version is not discovered",
    )
    release.add_argument("service")
    release.add_argument("version")
    release.add_argument(
        "--meta", action="append", default=[], metavar="KEY=VALUE", help="e.g. commit=abc123"
    )
    release.set_defaults(handler=operator_command(cmd_release))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rollbackd",
        description="Watch services in Prometheus after each release; roll bad releases back.",
    )
    parser.add_argument("--version", action="version", version=f"rollbackd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = commands.add_parser(
        "check",
        help="validate the config and every rule file, without network",
        description="Validate the config and every rule file it names, without network. "
        "Exit 0 when valid (and print each check's worst-case detection time), else exit 1 "
        "with one line per problem.",
    )
    check.add_argument("-c", "--config", default=DEFAULT_CONFIG, help="config file")
    check.add_argument("--json", action="store_true", help="machine-readable output")
    check.add_argument(
        "--show-queries", action="store_true", help="print the PromQL each check runs"
    )
    check.set_defaults(handler=cmd_check)

    run = commands.add_parser("run", help="the daemon, in the foreground")
    run.add_argument("-c", "--config", default=DEFAULT_CONFIG, help="config file")
    run.set_defaults(handler=cmd_run)

    evaluate = commands.add_parser(
        "eval",
        help="one evaluation pass against Prometheus now; never rolls back",
        description="Evaluate every check once against Prometheus now and print a table "
        "per service: value, threshold, baseline, verdict and why. Never rolls back.",
    )
    evaluate.add_argument("-c", "--config", default=DEFAULT_CONFIG, help="config file")
    evaluate.add_argument("service", nargs="*", help="only these services")
    evaluate.add_argument("--json", action="store_true", help="machine-readable output")
    evaluate.add_argument(
        "--at", default="now", metavar="TIME", help="evaluate as of this time (default now)"
    )
    evaluate.add_argument(
        "--since",
        metavar="TIME",
        help="when the running version went live, for compare checks (default: read from "
        "version_query's history over the day before)",
    )
    evaluate.set_defaults(handler=cmd_eval)

    rerun = commands.add_parser(
        "replay",
        help="run the rules over past Prometheus data",
        description="Run the rules over past Prometheus data and print when each check "
        "would have fired and which rollbacks would have run. Times: RFC 3339, unix "
        "seconds, 'now' or 'now-1h'.",
    )
    rerun.add_argument("-c", "--config", default=DEFAULT_CONFIG, help="config file")
    rerun.add_argument("--from", required=True, metavar="TIME", help="start")
    rerun.add_argument("--to", default="now", metavar="TIME", help="end (default now)")
    rerun.add_argument("service", nargs="*", help="only these services")
    rerun.add_argument("--json", action="store_true", help="machine-readable output")
    rerun.set_defaults(handler=cmd_replay)

    _add_operator_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.handler(args)
    return result
