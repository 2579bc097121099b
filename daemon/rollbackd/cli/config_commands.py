"""The commands that read the config and Prometheus, not the daemon: ``check``, ``run``,
``eval``, ``replay``."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from rollbackd.checks.judge import Measurement
from rollbackd.cli.evaluation import evaluate_once
from rollbackd.cli.replay import replay
from rollbackd.cli.timeparse import format_time, parse_time
from rollbackd.config.loader import LoadedConfig, Problem, Service, display_path, validate
from rollbackd.config.settings import LogFormat
from rollbackd.logs import configure as configure_logs
from rollbackd.prometheus import PrometheusClient, PrometheusError

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
                    # None for a sequential test: it fires when the evidence is in.
                    "worst_case_detection_seconds": (
                        detection.total.total_seconds() if detection.bounded else None
                    ),
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


def _load_or_report(config: str) -> LoadedConfig | None:
    loaded, problems = validate(Path(config))
    for problem in problems:
        print(problem, file=sys.stderr)
    return loaded


def _selected(loaded: LoadedConfig, names: list[str]) -> list[Service]:
    unknown = [n for n in names if n not in loaded.services]
    if unknown:
        raise SystemExit(
            f"unknown service {unknown[0]!r}; services: {', '.join(sorted(loaded.services))}"
        )
    return [s for s in loaded.services.values() if not names or s.name in names]


def table(rows: list[list[str]], indent: str = "  ") -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        indent + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def cmd_run(args: argparse.Namespace) -> int:
    from rollbackd.daemon import run

    return run(Path(args.config))


def cmd_eval(args: argparse.Namespace) -> int:
    loaded = _load_or_report(args.config)
    if loaded is None:
        return 1
    services = _selected(loaded, args.service)
    try:
        at = parse_time(args.at)
        since = None if args.since is None else parse_time(args.since)
    except ValueError as exc:
        print(f"rollbackd eval: {exc}", file=sys.stderr)
        return 1
    configure_logs(LogFormat.CONSOLE, "error")
    passes = asyncio.run(evaluate_once(loaded, services, at, since=since))
    if args.json:
        print(json.dumps([p.as_json() for p in passes], indent=2))
        return 0
    for one in passes:
        canary = ", canary in progress" if one.canary else ""
        print(f"{one.service}: version {one.version or 'unknown'}{canary} at {format_time(at)}")
        rows = [["CHECK", "SERIES", "VALUE", "THRESHOLD", "BASELINE", "VERDICT", "WHY"]]
        for m in one.measurements:
            rows.append(
                [
                    m.check,
                    m.series or "-",
                    "-" if m.value is None else f"{m.value:.4g}",
                    _threshold_text(m),
                    f"{m.baseline.value:.4g}" if m.baseline else "-",
                    m.verdict.value.upper(),
                    m.reason,
                ]
            )
        print(table(rows))
        print()
    return 0


def _threshold_text(m: Measurement) -> str:
    if m.threshold is not None:
        return str(m.threshold)
    if m.evidence is not None:
        return f"evidence {m.evidence.threshold:.0f}:1"
    return "tiers"


def cmd_replay(args: argparse.Namespace) -> int:
    loaded = _load_or_report(args.config)
    if loaded is None:
        return 1
    services = [s.name for s in _selected(loaded, args.service)]
    try:
        start, end = parse_time(getattr(args, "from")), parse_time(args.to)
    except ValueError as exc:
        print(f"rollbackd replay: {exc}", file=sys.stderr)
        return 1
    if end <= start:
        print("rollbackd replay: --to must be after --from", file=sys.stderr)
        return 1
    client = PrometheusClient(loaded.config.prometheus)
    try:
        events = replay(client, loaded, start, end, services)
    except PrometheusError as exc:
        print(f"rollbackd replay: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([e.__dict__ for e in events], indent=2))
        return 0
    print(f"replay {format_time(start)} .. {format_time(end)}")
    if not events:
        print("  nothing would have happened")
    for e in events:
        where = f"{e.service}/{e.check}" if e.check else e.service
        kind = e.kind.upper() if e.kind.startswith("would") or e.kind == "fired" else e.kind
        print(f"  {format_time(e.at)}  {where}  {kind}  {e.text}")
    rollbacks = [e for e in events if e.kind == "would_roll_back"]
    print(f"{len(rollbacks)} rollback(s) would have run")
    return 0


# -- operator commands: they talk to the running daemon ------------------------------------
