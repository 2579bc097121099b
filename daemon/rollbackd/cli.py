"""The ``rollbackd`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rollbackd import __version__
from rollbackd.loader import LoadedConfig, Problem, display_path, validate

DEFAULT_CONFIG = "/etc/rollbackd/config.toml"


def _problem_json(problem: Problem) -> dict[str, Any]:
    return {
        "file": problem.file,
        "line": problem.line,
        "column": problem.column,
        "field": problem.field,
        "message": problem.message,
        "text": str(problem),
    }


def _summary_json(loaded: LoadedConfig) -> dict[str, Any]:
    services = []
    for service in loaded.services.values():
        checks = []
        for check in service.rules.check:
            detection = check.detection_time()
            checks.append(
                {
                    "name": check.name,
                    "type": check.type,
                    "action": check.action.value,
                    "interval_seconds": check.interval.total_seconds(),
                    "worst_case_detection_seconds": detection.total.total_seconds(),
                    "worst_case_detection": str(detection),
                    "queries": [
                        {"role": q.role, "expr": q.expr}
                        for q in check.queries(service.rules.version_scope)
                    ],
                }
            )
        services.append(
            {"name": service.name, "file": display_path(service.path), "checks": checks}
        )
    return {"ok": True, "config": str(loaded.path), "problems": [], "services": services}


def _print_summary(loaded: LoadedConfig, show_queries: bool) -> None:
    checks = sum(len(s.rules.check) for s in loaded.services.values())
    print(
        f"{display_path(loaded.path)}: OK: {len(loaded.services)} service(s), {checks} check(s), "
        f"mode {loaded.config.daemon.mode.value}"
    )
    for service in loaded.services.values():
        scope = service.rules.version_scope
        scoped = f", judged per {scope!r}" if scope else ""
        print(f"\n{service.name} ({display_path(service.path)}{scoped})")
        width = max((len(c.name) for c in service.rules.check), default=0)
        for check in service.rules.check:
            action = "" if check.action.value == "rollback" else f"  [{check.action.value} only]"
            print(
                f"  {check.name:<{width}}  {check.type:<10}  worst-case detection "
                f"{check.detection_time()}{action}"
            )
            if show_queries:
                for query in check.queries(scope):
                    print(f"      {query.role}: {query.expr}")
        for mapping in service.rules.alert:
            matchers = f" {{{', '.join(mapping.matchers)}}}" if mapping.matchers else ""
            print(f"  alert {mapping.alertname}{matchers}")


def cmd_check(args: argparse.Namespace) -> int:
    loaded, problems = validate(Path(args.config))
    if args.json:
        if loaded is None:
            document = {
                "ok": False,
                "config": args.config,
                "problems": [_problem_json(p) for p in problems],
            }
        else:
            document = _summary_json(loaded)
        print(json.dumps(document, indent=2))
        return 0 if loaded is not None else 1
    if loaded is None:
        for problem in problems:
            print(problem, file=sys.stderr)
        files = len({p.file for p in problems})
        print(f"{len(problems)} problem(s) in {files} file(s)", file=sys.stderr)
        return 1
    _print_summary(loaded, args.show_queries)
    return 0


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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.handler(args)
    return result
