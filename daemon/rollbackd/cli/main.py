"""The ``rollbackd`` command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rollbackd import __version__
from rollbackd.cli.client import ClientError, DaemonClient, find_daemon
from rollbackd.cli.evaluation import evaluate_once
from rollbackd.cli.replay import replay
from rollbackd.cli.timeparse import format_time, parse_time
from rollbackd.config.loader import LoadedConfig, Problem, Service, display_path, validate
from rollbackd.config.settings import LogFormat
from rollbackd.prometheus import PrometheusClient, PrometheusError
from rollbackd.runtime.logs import configure as configure_logs

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


def _table(rows: list[list[str]], indent: str = "  ") -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        indent + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def cmd_run(args: argparse.Namespace) -> int:
    from rollbackd.runtime.daemon import run

    return run(Path(args.config))


def cmd_eval(args: argparse.Namespace) -> int:
    loaded = _load_or_report(args.config)
    if loaded is None:
        return 1
    services = _selected(loaded, args.service)
    try:
        at = parse_time(args.at)
    except ValueError as exc:
        print(f"rollbackd eval: {exc}", file=sys.stderr)
        return 1
    configure_logs(LogFormat.CONSOLE, "error")
    passes = asyncio.run(evaluate_once(loaded, services, at))
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
                    str(m.threshold) if m.threshold else "tiers",
                    f"{m.baseline.value:.4g}" if m.baseline else "-",
                    m.verdict.value.upper(),
                    m.reason,
                ]
            )
        print(_table(rows))
        print()
    return 0


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


def _requester() -> str:
    """Who asks, for the audit record: the login name (the token is shared)."""
    name = os.environ.get("USER") or os.environ.get("LOGNAME") or ""
    if not name:
        with contextlib.suppress(Exception):
            name = getpass.getuser()
    # Only what the API accepts as a name: printable, one line.
    return "".join(c for c in name if c.isprintable())[:128] or "unknown"


def _ago(at: float | None, now: float) -> str:
    if at is None:
        return "-"
    seconds = max(now - at, 0.0)
    if seconds < 120:
        span = f"{seconds:.0f}s"
    elif seconds < 7200:
        span = f"{seconds / 60:.0f}m"
    elif seconds < 172800:
        span = f"{seconds / 3600:.0f}h"
    else:
        span = f"{seconds / 86400:.0f}d"
    return f"{format_time(at)} ({span} ago)"


def _cut(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def _change(rollback: dict[str, Any]) -> str:
    return f"{rollback.get('from_version') or '?'} -> {rollback.get('to_version') or '?'}"


def _source(rollback: dict[str, Any]) -> str:
    source = str(rollback.get("source", ""))
    by = (rollback.get("trigger") or {}).get("requested_by")
    return f"{source} ({by})" if source == "manual" and by else source


def _rollback_rows(rollbacks: list[dict[str, Any]]) -> list[list[str]]:
    rows = [["ID", "CREATED", "SERVICE", "CHANGE", "STATE", "SOURCE", "REASON", "OUTCOME"]]
    for r in rollbacks:
        rows.append(
            [
                str(r["id"]),
                format_time(r["created_at"]),
                str(r["service"]),
                _change(r),
                str(r["state"]),
                _source(r),
                _cut(str(r.get("reason", "")), 48),
                _cut(str(r.get("outcome", "")), 48) or "-",
            ]
        )
    return rows


def _print_status(status: dict[str, Any], url: str) -> None:
    now = time.time()
    automation = "PAUSED for every service" if status["paused_all"] else "on"
    print(f"rollbackd {status['version']} at {url}: mode {status['mode']}")
    print(f"automatic rollbacks: {automation}")
    services = status["services"]
    if services:
        rows = [["SERVICE", "VERSION", "SINCE", "LAST GOOD", "AUTOMATION", "CHECKS"]]
        for s in services:
            if s["frozen"]:
                state = "FROZEN"
            elif s["paused"]:
                state = "paused"
            else:
                state = "on"
            checks = ", ".join(
                f"{c['name']} {'BLIND' if c['blind'] else c['phase'].upper()}"
                if c["blind"] or c["phase"] != "ok"
                else f"{c['name']} ok"
                for c in s["checks"]
            )
            if not checks:
                checks = f"alerts only ({len(s['alerts'])})"
            rows.append(
                [
                    s["name"],
                    s["current_version"] or "-",
                    _ago(s["current_since"], now),
                    s["last_known_good"] or "-",
                    state,
                    checks,
                ]
            )
        print()
        print(_table(rows, indent=""))
        for s in services:
            if s["frozen"]:
                print(f"  {s['name']} is frozen: {s['frozen_reason'] or 'no reason recorded'}")
                print(f"    after a look: rollbackd resume {s['name']}")
            if s["canary_active"]:
                print(f"  {s['name']}: a canary is in progress")
            bake = s.get("bake")  # absent from an older daemon's answer
            if bake:
                print(f"  {s['name']}: {bake['summary']}")
    in_flight = status["in_flight"]
    print()
    if not in_flight:
        print("no rollback in flight")
        return
    print("in flight:")
    print(_table(_rollback_rows(in_flight)))
    for r in in_flight:
        if r["state"] == "pending":
            print(f"  rollback {r['id']} waits for approval: rollbackd approve {r['id']}")


def _operator(handler: Callable[[argparse.Namespace, DaemonClient], int]) -> Callable[..., int]:
    """Wrap a command: find the daemon, call it, turn a ClientError into one line, exit 1."""

    def run(args: argparse.Namespace) -> int:
        try:
            target = find_daemon(
                None if args.config is None else Path(args.config),
                url=args.url,
                token_file=args.token_file,
                default_config=Path(DEFAULT_CONFIG),
            )
            with DaemonClient(target.url, target.token, timeout=args.timeout) as client:
                return handler(args, client)
        except ClientError as exc:
            print(f"rollbackd {args.command}: {exc}", file=sys.stderr)
            return 1

    return run


def _dump(document: Any) -> None:
    print(json.dumps(document, indent=2, sort_keys=True))


def cmd_status(args: argparse.Namespace, client: DaemonClient) -> int:
    status = client.status()
    if args.json:
        _dump(status)
    else:
        _print_status(status, client.url)
    return 0


def cmd_history(args: argparse.Namespace, client: DaemonClient) -> int:
    history = client.history(args.service, args.limit, args.state)
    if args.json:
        _dump(history)
        return 0
    rollbacks = history["rollbacks"]
    if not rollbacks:
        print("no rollbacks" + (f" of {args.service}" if args.service else ""))
        return 0
    print(_table(_rollback_rows(rollbacks), indent=""))
    return 0


def cmd_rollback(args: argparse.Namespace, client: DaemonClient) -> int:
    answer = client.rollback(args.service, args.reason, to_version=args.to, by=_requester())
    if args.json:
        _dump(answer)
        return 1 if answer["outcome"] == "refused" else 0
    outcome = answer["outcome"]
    rollback = answer.get("rollback") or {}
    rid = answer.get("rollback_id")
    if outcome == "refused":
        print(f"rollbackd rollback: refused: {answer['reason']}", file=sys.stderr)
        for guard in answer["guards"]:
            if not guard["passed"]:
                print(f"  {guard['guard']}: {guard['reason']}", file=sys.stderr)
        return 1
    if outcome == "executing":
        print(f"rollback {rid} of {args.service} started: {_change(rollback)}")
        print(f"  follow it: rollbackd history --service {args.service}")
    elif outcome == "pending_approval":
        print(f"rollback {rid} of {args.service} ({_change(rollback)}) waits for approval:")
        print(f"  rollbackd approve {rid}")
    elif outcome == "dry_run":
        print(f"dry-run: rollback {rid} of {args.service} recorded, not executed")
    elif outcome == "joined":
        print(f"joined rollback {rid} of {args.service} ({rollback.get('state', '?')}): ", end="")
        print(answer["reason"])
    else:
        print(f"{outcome}: {answer['reason']}")
    return 0


def cmd_approve(args: argparse.Namespace, client: DaemonClient) -> int:
    rollback = client.approve(args.id, _requester())
    if args.json:
        _dump(rollback)
    else:
        print(
            f"rollback {rollback['id']} of {rollback['service']} approved by "
            f"{rollback['decided_by']}: {rollback['state']} ({_change(rollback)})"
        )
    return 0


def cmd_reject(args: argparse.Namespace, client: DaemonClient) -> int:
    rollback = client.reject(args.id, _requester(), args.reason or "")
    if args.json:
        _dump(rollback)
    else:
        print(
            f"rollback {rollback['id']} of {rollback['service']} rejected by "
            f"{rollback['decided_by']}: it will not run"
        )
    return 0


def _automation(args: argparse.Namespace, client: DaemonClient, pause: bool) -> int:
    scope = "*" if args.all else args.service
    answer = client.pause(scope, _requester()) if pause else client.resume(scope, _requester())
    if args.json:
        _dump(answer)
        return 0
    which = "every service" if scope == "*" else scope
    if pause:
        print(f"automatic rollbacks of {which} paused; checks keep running and reporting")
        return 0
    print(f"automatic rollbacks of {which} resumed")
    if answer["thawed"]:
        print(f"  {scope} was frozen: thawed")
    if answer["paused"]:
        print(f"  note: {which} is still paused by 'pause --all': rollbackd resume --all")
    return 0


def cmd_pause(args: argparse.Namespace, client: DaemonClient) -> int:
    return _automation(args, client, pause=True)


def cmd_resume(args: argparse.Namespace, client: DaemonClient) -> int:
    return _automation(args, client, pause=False)


def _meta(pairs: list[str]) -> dict[str, str]:
    meta: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ClientError(f"--meta {pair!r}: expected key=value")
        meta[key] = value
    return meta


def cmd_release(args: argparse.Namespace, client: DaemonClient) -> int:
    answer = client.release(args.service, args.version, _meta(args.meta))
    if args.json:
        _dump(answer)
        return 0
    if answer["changed"]:
        was = f" (was {answer['previous']})" if answer["previous"] else ""
        print(f"{answer['service']}: release {answer['version']} recorded{was}")
    else:
        print(f"{answer['service']}: {answer['version']} is already the current version")
    if answer["bad"]:
        print(f"  warning: {answer['version']} was rolled back before", file=sys.stderr)
    return 0


def _add_operator_commands(commands: Any) -> None:
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

    status = commands.add_parser(
        "status",
        parents=[common],
        help="the running daemon: services, versions, check states, rollbacks in flight",
    )
    status.set_defaults(handler=_operator(cmd_status))

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
    history.set_defaults(handler=_operator(cmd_history))

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
    rollback.set_defaults(handler=_operator(cmd_rollback))

    approve = commands.add_parser(
        "approve", parents=[common], help="run a rollback that waits for approval"
    )
    approve.add_argument("id", type=int)
    approve.set_defaults(handler=_operator(cmd_approve))

    reject = commands.add_parser(
        "reject", parents=[common], help="refuse a rollback that waits for approval"
    )
    reject.add_argument("id", type=int)
    reject.add_argument("--reason", help="why, for the audit record")
    reject.set_defaults(handler=_operator(cmd_reject))

    for name, helptext, handler in (
        ("pause", "stop automatic rollbacks (checks keep running)", cmd_pause),
        ("resume", "restart automatic rollbacks (and thaw a frozen service)", cmd_resume),
    ):
        switch = commands.add_parser(name, parents=[common], help=helptext)
        which = switch.add_mutually_exclusive_group(required=True)
        which.add_argument("service", nargs="?", help="one service")
        which.add_argument("--all", action="store_true", help="every service")
        switch.set_defaults(handler=_operator(handler))

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
    release.set_defaults(handler=_operator(cmd_release))


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
