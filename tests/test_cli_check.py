"""`rollbackd check`, run as a user runs it: the real console entry point in a subprocess."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def rollbackd(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rollbackd", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_example_config_is_valid_and_detection_times_are_printed() -> None:
    result = rollbackd("check", "-c", "config.example.toml")
    assert result.returncode == 0, result.stderr
    assert "OK: 6 service(s)" in result.stdout
    assert "error-rate  error_rate  worst-case detection 2m15s (interval 15s + for 1m + " in (
        result.stdout
    )


def test_show_queries_prints_promql() -> None:
    result = rollbackd("check", "-c", "config.example.toml", "--show-queries")
    assert result.returncode == 0
    assert (
        "value: histogram_quantile(0.99, sum by (le, version) "
        '(rate(http_request_duration_seconds_bucket{service="checkout"}[1m])))'
    ) in result.stdout


def test_json_when_valid() -> None:
    result = rollbackd("check", "-c", "config.example.toml", "--json")
    document = json.loads(result.stdout)
    assert document["ok"] is True
    checkout = next(s for s in document["services"] if s["name"] == "checkout")
    error_rate = next(c for c in checkout["checks"] if c["name"] == "error-rate")
    assert error_rate["worst_case_detection_seconds"] == 135
    assert [q["role"] for q in error_rate["queries"]] == ["value", "traffic"]


def broken_setup(tmp_path: Path) -> Path:
    (tmp_path / "rules").mkdir()
    (tmp_path / "config.toml").write_text('[daemon]\nrule_files = ["rules/*.toml"]\n')
    (tmp_path / "rules" / "syntax.toml").write_text('[service]\nname = "a"\nbake_time = 10m\n')
    (tmp_path / "rules" / "typo.toml").write_text(
        '[service]\nname = "b"\n[[rollback]]\ntype = "command"\nargv = ["x"]\n'
        '[[check]]\nname = "p"\ntype = "probe"\nintervall = "5s"\n'
    )
    return tmp_path


def test_two_broken_files_are_both_reported_with_exit_1(tmp_path: Path) -> None:
    result = rollbackd("check", "-c", "config.toml", cwd=broken_setup(tmp_path))
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert "rules/syntax.toml:3:15: Expected newline or end of document after a statement" in lines
    assert "rules/typo.toml: check[1].intervall: unknown key (did you mean 'interval'?)" in lines
    assert lines[-1] == "2 problem(s) in 2 file(s)"
    assert result.stdout == ""


def test_json_when_broken(tmp_path: Path) -> None:
    result = rollbackd("check", "-c", "config.toml", "--json", cwd=broken_setup(tmp_path))
    assert result.returncode == 1
    document = json.loads(result.stdout)
    assert document["ok"] is False
    assert {(p["file"], p["line"], p["field"]) for p in document["problems"]} == {
        ("rules/syntax.toml", 3, None),
        ("rules/typo.toml", None, "check[1].intervall"),
    }


def test_missing_config_file(tmp_path: Path) -> None:
    result = rollbackd("check", "-c", str(tmp_path / "nope.toml"))
    assert result.returncode == 1
    assert "nope.toml: cannot read: No such file or directory" in result.stderr


def test_a_compare_check_has_no_worst_case_detection_time() -> None:
    result = rollbackd("check", "-c", "config.example.toml", "--json")
    orders = next(s for s in json.loads(result.stdout)["services"] if s["name"] == "orders")
    errors = next(c for c in orders["checks"] if c["name"] == "errors-vs-baseline")
    assert errors["worst_case_detection_seconds"] is None
    assert errors["worst_case_detection"].startswith("none: fires as soon as the evidence")
    assert [q["role"] for q in errors["queries"]] == [
        "bad",
        "requests",
        "baseline bad",
        "baseline requests",
        "blocks",
        "block count",
        "recent blocks",
        "recent block count",
    ]
