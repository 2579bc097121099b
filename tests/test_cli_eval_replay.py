"""`rollbackd eval` and `rollbackd replay`, run as a user runs them, against the real
Prometheus holding the known dataset."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from support import dataset
from support.configs import write_config
from support.prometheus import PrometheusServer

pytestmark = pytest.mark.prometheus

ROOT = Path(__file__).resolve().parent.parent


def rollbackd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rollbackd", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def example_config(tmp_path: Path, backfilled_prometheus: PrometheusServer) -> Path:
    """The shipped example rule files, pointed at the test's Prometheus."""
    rules = {p.stem: p.read_text() for p in (ROOT / "rules").glob("*.toml")}
    return write_config(tmp_path, backfilled_prometheus.url, rules)


def test_eval_prints_a_table_per_check(example_config: Path) -> None:
    result = rollbackd(
        "eval", "-c", str(example_config), "--at", str(dataset.EVAL_TIME), "checkout"
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("checkout: version 2.0.0 at ")
    lines = {line.split()[0]: line for line in out.splitlines()[1:] if line.strip()}
    assert lines["CHECK"].split()[:7] == [
        "CHECK",
        "SERIES",
        "VALUE",
        "THRESHOLD",
        "BASELINE",
        "VERDICT",
        "WHY",
    ]
    assert "BREACH" in lines["error-rate"]
    assert "error ratio 30.00% above 5.00%" in lines["error-rate"]
    assert '{version="2.0.0"}' in lines["error-rate"]
    assert "p99 latency 3.75s above 1s" in lines["p99"]
    assert "failing probes 1 above 0" in lines["probe"]


def test_eval_json_and_no_data_in_words(example_config: Path) -> None:
    result = rollbackd("eval", "-c", str(example_config), "--at", str(dataset.EVAL_TIME), "--json")
    assert result.returncode == 0, result.stderr
    passes = {p["service"]: p for p in json.loads(result.stdout)}
    assert set(passes) == {"checkout", "payments", "inventory", "billing", "search", "orders"}
    assert passes["payments"]["canary"] is True
    # A compare check: eval finds when 4.2.0 went live in version_query's history.
    orders = {c["check"]: c for c in passes["orders"]["checks"]}
    errors = orders["errors-vs-baseline"]
    assert (errors["verdict"], errors["evidence"]["decision"]) == ("breach", "worse")
    assert errors["evidence"]["test"] == "history"
    assert errors["reason"].startswith("error ratio 3.00% vs 1.00% baseline")
    assert orders["slow-vs-baseline"]["verdict"] == "ok"
    # No history on a fresh start: the stable track is the other version running.
    payments = {c["check"]: c for c in passes["payments"]["checks"]}
    assert payments["error-rate"]["baseline"]["source"] == "stable track, version 1.4.0"
    assert payments["error-rate"]["verdict"] == "breach"
    search = passes["search"]["checks"][0]
    assert (search["check"], search["verdict"]) == ("availability-slo", "ok")
    billing = {c["check"]: c for c in passes["billing"]["checks"]}
    assert billing["queue-backlog"]["value"] == dataset.BILLING_QUEUE_DEPTH

    # Far past the data: nothing to judge, said so, never OK and never BREACH.
    late = rollbackd(
        "eval", "-c", str(example_config), "--at", str(dataset.END + 3600), "--json", "inventory"
    )
    [inventory] = json.loads(late.stdout)
    assert {c["verdict"] for c in inventory["checks"]} == {"no_data"}
    assert inventory["checks"][0]["reason"] == "the query returned no series"


def test_eval_unknown_service(example_config: Path) -> None:
    result = rollbackd("eval", "-c", str(example_config), "nope")
    assert result.returncode != 0
    assert "unknown service 'nope'" in result.stderr


def test_replay_shows_when_it_would_fire_and_roll_back(example_config: Path) -> None:
    deploy = dataset.CHECKOUT_DEPLOY_TIME
    result = rollbackd(
        "replay",
        "-c",
        str(example_config),
        "--from",
        str(deploy - 300),
        "--to",
        str(deploy + 600),
        "checkout",
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "checkout  version  1.0.0 -> 2.0.0" in out
    assert "checkout/error-rate  FIRED" in out
    assert "WOULD_ROLL_BACK  would roll back checkout 2.0.0 -> 1.0.0" in out
    assert out.rstrip().endswith("1 rollback(s) would have run")
    # Fired no earlier than the release, and the rollback came at the first firing.
    events = json.loads(
        rollbackd(
            "replay",
            "-c",
            str(example_config),
            "--from",
            str(deploy - 300),
            "--to",
            str(deploy + 600),
            "--json",
            "checkout",
        ).stdout
    )
    fired = [e for e in events if e["kind"] == "fired"]
    rollbacks = [e for e in events if e["kind"] == "would_roll_back"]
    assert fired and all(e["at"] >= deploy for e in fired)
    assert len(rollbacks) == 1
    assert rollbacks[0]["at"] == min(e["at"] for e in fired)


def test_replay_of_a_healthy_period(example_config: Path) -> None:
    result = rollbackd(
        "replay",
        "-c",
        str(example_config),
        "--from",
        str(dataset.START + 3600),
        "--to",
        str(dataset.START + 4200),
        "inventory",
    )
    assert result.returncode == 0, result.stderr
    assert "0 rollback(s) would have run" in result.stdout


def test_replay_rejects_a_bad_time(example_config: Path) -> None:
    result = rollbackd("replay", "-c", str(example_config), "--from", "yesterday")
    assert result.returncode == 1
    assert "invalid time 'yesterday'" in result.stderr
