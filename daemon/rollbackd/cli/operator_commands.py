"""The commands that talk to a running daemon through its API: ``status``, ``history``,
``rollback``, ``approve``, ``reject``, ``pause``, ``resume``, ``release``."""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rollbackd.cli.client import ClientError, DaemonClient, find_daemon
from rollbackd.cli.config_commands import DEFAULT_CONFIG, table
from rollbackd.cli.timeparse import format_time


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


def _holding(service: dict[str, Any], member: str | None) -> str:
    """Who holds the service: "held by daemon-b since 2026-12-01T12:01:03Z, epoch 4"."""
    holder = service.get("holder")
    if not holder:
        return "held by no daemon now (another takes it within the lease time)"
    since = service.get("held_since")
    when = f" since {format_time(since)}" if since is not None else ""
    mine = " (this daemon)" if holder == member else ""
    return f"held by {holder}{mine}{when}, epoch {service.get('epoch')}"


def _print_status(status: dict[str, Any], url: str) -> None:
    now = time.time()
    automation = "PAUSED for every service" if status["paused_all"] else "on"
    print(f"rollbackd {status['version']} at {url}: mode {status['mode']}")
    print(f"automatic rollbacks: {automation}")
    member = status.get("member")  # only from a daemon sharing PostgreSQL
    if member:
        print(f"this daemon is member {member}")
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
        print(table(rows, indent=""))
        for s in services:
            for c in s["checks"]:
                if c.get("evidence"):
                    print(f"  {s['name']} {c['name']}: {c['evidence']}")
        for s in services:
            if s["frozen"]:
                print(f"  {s['name']} is frozen: {s['frozen_reason'] or 'no reason recorded'}")
                print(f"    after a look: rollbackd resume {s['name']}")
            if s["canary_active"]:
                print(f"  {s['name']}: a canary is in progress")
            bake = s.get("bake")  # absent from an older daemon's answer
            if bake:
                print(f"  {s['name']}: {bake['summary']}")
            if "holder" in s:  # only on PostgreSQL
                print(f"  {s['name']}: {_holding(s, member)}")
    in_flight = status["in_flight"]
    print()
    if not in_flight:
        print("no rollback in flight")
        return
    print("in flight:")
    print(table(_rollback_rows(in_flight)))
    for r in in_flight:
        if r["state"] == "pending":
            print(f"  rollback {r['id']} waits for approval: rollbackd approve {r['id']}")


def operator_command(
    handler: Callable[[argparse.Namespace, DaemonClient], int],
) -> Callable[..., int]:
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
    print(table(_rollback_rows(rollbacks), indent=""))
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
