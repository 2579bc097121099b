"""Hostile input for the config and rule loader (issue "Fault injection"): whatever a config
or rule file holds, ``validate`` never raises; it either loads, and what it loaded is sane,
or it reports problems that each name the file, and the line and column (TOML syntax) or
the field (schema). ``rollbackd check`` on such files exits 1 with messages, never a
traceback.

Two kinds of input: arbitrary text and bytes, and structure-aware documents: the example
rule files and config, parsed with tomllib, mutated (keys dropped or added, values of the
wrong type or at the edges: negative, zero, huge, NaN, inf, bad durations, bad matchers,
unknown placeholders, ...) and written back as TOML by the small serializer below.
"""

from __future__ import annotations

import copy
import json
import math
import re
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from datetime import date, datetime, time, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from rollbackd.checks.latency import LatencyCheck
from rollbackd.config.loader import LoadedConfig, Problem, display_path, field_path, validate
from rollbackd.config.rules import RuleFile
from rollbackd.config.settings import Config
from rollbackd.core.durations import format_duration

pytestmark = [pytest.mark.faults]

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_RULES = sorted((ROOT / "rules").glob("*.toml"))
EXAMPLE_CONFIG = ROOT / "config.example.toml"
VALID_RULES = (ROOT / "rules" / "web-service.toml").read_text()
CONFIG = '[daemon]\nrule_files = ["rules/*.toml"]\n'

_BASE = settings(
    deadline=None,
    derandomize=True,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
    ],
)


def fuzz(examples: int) -> settings:
    """Bounded and the same on every run: CI must not meet a new example by chance."""
    return settings(_BASE, max_examples=examples)


# Problems about a whole file rather than one of its keys: the cross-key rules of a rule
# file and of the config, and a parser limit that has no position.
WHOLE_FILE = re.compile(
    r"^(check names must be unique in a service"
    r"|a service whose checks or alerts may roll it back needs at least one \[\[rollback\]\]"
    r"|a service needs at least one \[\[check\]\] or \[\[alert\]\]"
    r"|notifier names must be unique"
    r"|cannot read: )"
)


# -- a tiny TOML writer -----------------------------------------------------------------------


def _string(text: str) -> str:
    out = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_string(k)} = {_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML for {value!r}")


def to_toml(document: dict[str, Any]) -> str:
    """Every top-level key as ``key = value``; tables and arrays of tables inline."""
    return "".join(f"{_string(key)} = {_value(value)}\n" for key, value in document.items())


def _same(a: Any, b: Any) -> bool:
    """Equality where NaN equals NaN."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def test_the_toml_writer_round_trips_the_examples() -> None:
    for path in [*EXAMPLE_RULES, EXAMPLE_CONFIG]:
        document = tomllib.loads(path.read_text())
        assert _same(tomllib.loads(to_toml(document)), document), path


# -- hostile values and mutations -------------------------------------------------------------

EDGE_VALUES: list[Any] = [
    0,
    -1,
    1,
    2**63 - 1,
    -(2**63),
    0.0,
    -0.0,
    1e-300,
    1e308,
    -1e308,
    math.nan,
    math.inf,
    -math.inf,
    True,
    False,
    "",
    " ",
    "\t\n",
    "5x",
    "-1s",
    "0s",
    "0ms",
    "1.5",
    "99999999999d",
    "9" * 400 + "s",
    "0.0000001s",
    "0.0001ms",
    "0.5ms",
    "900000000d",
    "1h-",
    "1e3s",
    "1h 30m",
    "nan%",
    "inf%",
    "-20%",
    "0%",
    "1e400%",
    "99.9%",
    "150%",
    'code=~"5.."',
    'code=~"("',
    'a="b',
    '=~"x"',
    "a=b",
    '{service="x"}',
    'service="x",,',
    "sum(",
    "rate(x[5m]",
    "up == bool 0",
    ")))",
    "{unknown}",
    "{to_version",
    "{{to_version}}",
    "{service}{from_version}{reason}",
    "{ service }",
    "\x00",
    "\x7f",
    "é",
    "💥",
    "\u202e",
    "a\nb",
    "x" * 300,
    "http://",
    "https://example.com/{rollback_id}",
    "ftp://example.com",
    "/bin/true",
    "../../etc/passwd",
    "error_rate",
    "latency",
    "probe",
    "burn_rate",
    "query",
    "command",
    "http",
    "kubernetes",
    "helm",
    "argo_rollouts",
    "symlink",
    "git",
    "slack",
    "webhook",
    "pagerduty",
    "grafana",
    "email",
    "error-rate",
    [],
    {},
    [1, "a"],
    ["", ""],
    [{}],
    {"a": 1},
    {"type": "command"},
    datetime(2030, 1, 2, 3, 4, 5),
    date(2030, 1, 2),
    time(3, 4, 5),
]

UNKNOWN_KEYS = [
    "intervall",
    "abvoe",
    "Name",
    "type ",
    "",
    " ",
    "for_",
    "from_addr",
    "model_config",
    "model_fields",
    "__class__",
    "__dict__",
    "_env_file",
    "_env_prefix",
    "_case_sensitive",
    "_secrets_dir",
    "_cli_parse_args",
    "_env_nested_delimiter",
    "password",
    "token",
    "bearer_token",
    "url",
    "a.b",
    "check[1]",
    "ü",
    "💥",
    "\x00",
    "new\nline",
]

_non_null = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
)
_scalars = st.one_of(st.none(), _non_null)  # None: an item left out (TOML has no null)


def _plain(value: Any) -> Any:
    """TOML has no null: a None inside a list or table is left out."""
    if isinstance(value, list):
        return [_plain(v) for v in value if v is not None]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if v is not None}
    return value


HOSTILE = st.one_of(
    st.sampled_from(EDGE_VALUES),
    _non_null,
    st.lists(_scalars, max_size=4).map(_plain),
    st.dictionaries(st.text(max_size=8), _scalars, max_size=3).map(_plain),
).map(copy.deepcopy)

_DURATION_TEXT = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h|d|w))+")
DURATIONS = st.from_regex(r"\A(\d{1,12}(\.\d{1,9})?(ms|s|m|h|d|w)){1,3}\Z")


def like(value: Any) -> st.SearchStrategy[Any]:
    """A value of the same kind as ``value``, anywhere in its range: the mutations that may
    still load, to test what a loaded model holds."""
    if isinstance(value, bool):
        return st.booleans()
    if isinstance(value, int):
        return st.one_of(st.integers(-(2**63), 2**63 - 1), st.integers(-2, 2000))
    if isinstance(value, float):
        edges = [0.0, -0.0, 1e-300, 1e308, math.nan, math.inf, -math.inf]
        return st.one_of(st.sampled_from(edges), st.floats(), st.floats(0, 1))
    if isinstance(value, str) and _DURATION_TEXT.fullmatch(value):
        return DURATIONS
    if isinstance(value, str) and value.endswith("%"):
        return st.one_of(st.floats().map(lambda f: f"{f}%"), st.integers().map(lambda i: f"{i}%"))
    if isinstance(value, str):
        return st.text(max_size=40)
    return HOSTILE


Path_ = tuple[str | int, ...]


def _paths(node: Any, prefix: Path_ = ()) -> Iterator[Path_]:
    """Every key and list item of a document, depth first."""
    items: Any = node.items() if isinstance(node, dict) else enumerate(node)
    for key, value in items:
        yield (*prefix, key)
        if isinstance(value, dict | list):
            yield from _paths(value, (*prefix, key))


def _containers(node: Any, prefix: Path_ = ()) -> Iterator[Path_]:
    """Every table (where a key can be added) and array (where an item can be)."""
    yield prefix
    items: Any = node.items() if isinstance(node, dict) else enumerate(node)
    for key, value in items:
        if isinstance(value, dict | list):
            yield from _containers(value, (*prefix, key))


def _at(document: Any, path: Path_) -> Any:
    for part in path:
        document = document[part]
    return document


@st.composite
def mutated(draw: st.DrawFn, bases: list[dict[str, Any]]) -> dict[str, Any]:
    """A base document with 1-4 mutations, each at a random place."""
    document = copy.deepcopy(draw(st.sampled_from(bases)))
    for _ in range(draw(st.sampled_from([1, 1, 1, 2, 3, 4]))):
        kind = draw(st.sampled_from(["drop", "replace", "retype", "retype", "add", "duplicate"]))
        if kind in ("drop", "replace", "retype"):
            paths = list(_paths(document))
            if kind == "retype":  # a leaf: a string, number or boolean
                paths = [p for p in paths if not isinstance(_at(document, p), dict | list)]
            if not paths:
                continue
            path = draw(st.sampled_from(paths))
            parent = _at(document, path[:-1])
            if kind == "drop":
                del parent[path[-1]]
            elif kind == "retype":
                parent[path[-1]] = draw(like(parent[path[-1]]))
            else:
                parent[path[-1]] = draw(HOSTILE)
        elif kind == "add":
            container = _at(document, draw(st.sampled_from(list(_containers(document)))))
            value = draw(HOSTILE)
            if isinstance(container, dict):
                key = draw(st.one_of(st.sampled_from(UNKNOWN_KEYS), st.text(max_size=10)))
                container[key] = value
            else:
                container.append(value)
        else:  # an item of an array appears twice: duplicate names, tiers, executors
            arrays = [p for p in _containers(document) if isinstance(_at(document, p), list)]
            arrays = [p for p in arrays if _at(document, p)]
            if arrays:
                array = _at(document, draw(st.sampled_from(arrays)))
                array.append(copy.deepcopy(draw(st.sampled_from(array))))
    return document


# -- what must hold ---------------------------------------------------------------------------


class Workspace:
    """A config file and one rule file in a directory, rewritten for every example."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        (directory / "rules").mkdir(parents=True, exist_ok=True)
        self.config = directory / "config.toml"
        self.rules = directory / "rules" / "fuzzed.toml"
        self.config.write_text(CONFIG)
        self.rules.write_text(VALID_RULES)

    def validate(
        self, *, config: str | bytes = CONFIG, rules: str | bytes = VALID_RULES
    ) -> tuple[LoadedConfig | None, list[Problem]]:
        for path, content in ((self.config, config), (self.rules, rules)):
            if isinstance(content, str):
                path.write_text(content, encoding="utf-8")
            else:
                path.write_bytes(content)
        return validate(self.config)


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path)


def assert_placed(problem: Problem, file: Path, top_keys: set[str] | None = None) -> None:
    """The problem names ``file`` and either a position (TOML syntax), a field (the schema),
    or is one of the few problems about the whole file."""
    assert problem.file == display_path(file), problem
    assert problem.message.strip(), problem
    assert "Traceback" not in problem.message
    text = str(problem)
    assert text.startswith(problem.file)
    if problem.line is not None:
        assert problem.line >= 1 and (problem.column or 1) >= 1, problem
        assert problem.field is None
    elif problem.field:
        if top_keys is not None:  # the field is in the file, or one the schema knows
            assert any(problem.field.startswith(field_path((k,))) for k in top_keys), problem
    else:
        assert WHOLE_FILE.match(problem.message), f"neither position nor field: {problem}"


def _walk(value: Any, where: str = "") -> Iterator[tuple[str, Any]]:
    yield where, value
    if isinstance(value, BaseModel):
        for name in type(value).model_fields:
            yield from _walk(getattr(value, name), f"{where}.{name}")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from _walk(item, f"{where}[{index}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _walk(item, f"{where}.{key}")


def assert_sane(model: BaseModel) -> None:
    """Every duration positive, whole enough for PromQL and not absurd; every number
    finite (a histogram's buckets may end at +Inf)."""
    for where, value in _walk(model):
        if isinstance(value, timedelta):
            assert timedelta(milliseconds=1) <= value <= timedelta(days=36500), (where, value)
            assert format_duration(value) != "0s", (where, value)
        elif isinstance(value, float) and not where.endswith("]"):
            assert math.isfinite(value), (where, value)
        elif isinstance(value, LatencyCheck) and value.buckets:
            assert not any(math.isnan(b) for b in value.buckets), (where, value.buckets)


def assert_rule_file_sane(rules: RuleFile) -> None:
    assert_sane(rules)
    if rules.canary is not None:
        assert rules.canary.active_query.strip()
    # What `rollbackd check` prints of a loaded file: the detection time and the PromQL.
    for check in rules.check:
        detection = check.detection_time()
        assert detection.total > timedelta(0)
        assert str(detection)
        queries = check.queries(rules.version_scope)
        assert queries and all(q.expr.strip() for q in queries)
        assert "[0s]" not in " ".join(q.expr for q in queries)
    # The model written out (durations as text) reads back as the same model.
    dumped = rules.model_dump(mode="json", by_alias=True)
    again = RuleFile.model_validate(dumped)
    assert again.model_dump(mode="json", by_alias=True) == dumped


# -- arbitrary text and bytes -----------------------------------------------------------------


@fuzz(300)
@given(text=st.text(max_size=400))
def test_any_text_as_a_rule_file(workspace: Workspace, text: str) -> None:
    note(f"rule file: {text!r}")
    loaded, problems = workspace.validate(rules=text)
    if loaded is None:
        assert problems
        for problem in problems:
            assert_placed(problem, workspace.rules)
    else:
        assert problems == []
        assert_rule_file_sane(loaded.services[next(iter(loaded.services))].rules)


# Bytes that look a little like TOML, so the parser gets past the first line now and then.
_TOML_BYTES = st.lists(
    st.one_of(
        st.binary(max_size=8),
        st.sampled_from(
            [
                *(b"[service]\n", b'name = "a"\n', b"[[check]]\n", b"= ", b'"', b"'"),
                *(b"[", b"]", b"{", b"}", b"\n", b"\r\n", b"\xff", b"\xc3", b"\xed\xa0\x80"),
                *(b"\x00", b"#"),
            ]
        ),
    ),
    max_size=30,
).map(b"".join)


@fuzz(300)
@given(content=st.one_of(st.binary(max_size=200), _TOML_BYTES))
def test_any_bytes_as_a_rule_file(workspace: Workspace, content: bytes) -> None:
    note(f"rule file: {content!r}")
    loaded, problems = workspace.validate(rules=content)
    if loaded is None:
        assert problems
        for problem in problems:
            assert_placed(problem, workspace.rules)


@fuzz(200)
@given(content=st.one_of(st.text(max_size=300), st.binary(max_size=200), _TOML_BYTES))
def test_any_text_or_bytes_as_the_config_file(workspace: Workspace, content: str | bytes) -> None:
    note(f"config file: {content!r}")
    loaded, problems = workspace.validate(config=content)
    if loaded is None:
        assert problems
        files = {display_path(workspace.config), display_path(workspace.rules)}
        for problem in problems:
            assert problem.file in files, problem
            if problem.file == display_path(workspace.config):
                assert_placed(problem, workspace.config)
            else:  # a pattern from the fuzzed config matched the rule file, or did not
                assert_placed(problem, workspace.rules)
    else:
        assert_sane(loaded.config)


# -- structure-aware: the real schema, mutated ------------------------------------------------

RULE_BASES = [tomllib.loads(path.read_text()) for path in EXAMPLE_RULES]
CONFIG_BASES = [
    tomllib.loads(EXAMPLE_CONFIG.read_text()),
    tomllib.loads(
        '[daemon]\nmode = "approve"\nrule_files = ["rules/*.toml"]\nstop_grace = "10s"\n'
        '[prometheus]\nurl = "https://prom.example:9090/"\ntimeout = "5s"\n'
        'headers = { "X-Scope-OrgID" = "ops" }\n'
        '[prometheus.basic_auth]\nusername = "u"\npassword_env = "P"\n'
        '[server]\nlisten = "[::1]:9095"\ntoken_env = "T"\nmax_body = 65536\n'
        'public_url = "https://rollbackd.example"\n'
        "[[notify]]\n"
        'name = "hook"\ntype = "webhook"\nurl = "https://hook.example/x"\n'
        'signing_secret_env = "S"\nevents = ["rollback.*"]\n'
        "[[notify]]\n"
        'name = "mail"\ntype = "email"\nsmtp_host = "smtp.example"\nfrom = "r@example.com"\n'
        'to = ["ops@example.com"]\nusername = "r"\npassword_file = "/p"\n'
        "[[notify]]\n"
        'name = "grafana"\ntype = "grafana"\nurl = "https://grafana.example"\n'
        'token_file = "/t"\n'
    ),
]


def test_the_bases_load(workspace: Workspace) -> None:
    for base in RULE_BASES:
        loaded, problems = workspace.validate(rules=to_toml(base))
        assert problems == [] and loaded is not None
        assert_rule_file_sane(next(iter(loaded.services.values())).rules)
    for base in CONFIG_BASES:
        loaded, problems = workspace.validate(config=to_toml(base))
        assert problems == [] and loaded is not None


def _written(document: dict[str, Any]) -> str:
    text = to_toml(document)
    assert _same(tomllib.loads(text), document)  # the writer, checked on every example
    return text


@fuzz(800)
@given(document=mutated(RULE_BASES))
def test_mutated_rule_files(workspace: Workspace, document: dict[str, Any]) -> None:
    note(f"rule file: {to_toml(document)}")
    loaded, problems = workspace.validate(rules=_written(document))
    event("refused" if loaded is None else "loaded")
    if loaded is None:
        assert problems
        keys = {*document, *RuleFile.known_keys()}
        for problem in problems:
            assert problem.line is None, problem  # the writer writes valid TOML
            assert_placed(problem, workspace.rules, keys)
    else:
        assert problems == []
        [service] = loaded.services.values()
        assert_rule_file_sane(service.rules)


def _local_globs(document: dict[str, Any]) -> dict[str, Any]:
    """Rule-file globs stay inside the workspace: a fuzzed "/dev/*" must not make the test
    read devices."""
    daemon = document.get("daemon")
    if isinstance(daemon, dict) and isinstance(daemon.get("rule_files"), list):
        daemon["rule_files"] = [
            "./" + p.replace("..", "_").lstrip("/") if isinstance(p, str) else p
            for p in daemon["rule_files"]
        ]
    return document


def assert_config_problems(
    problems: list[Problem], workspace: Workspace, document: dict[str, Any]
) -> None:
    """A fuzzed config's own problems are placed in it; its fuzzed globs may also match
    other paths in the workspace (the config itself, the rules directory), whose problems
    name those paths."""
    keys = {*document, *Config.known_keys(), *RuleFile.known_keys()}
    for problem in problems:
        assert problem.line is None, problem  # the writer writes valid TOML
        if problem.file == display_path(workspace.config):
            assert_placed(problem, workspace.config, keys)
        else:
            assert Path(problem.file).resolve().is_relative_to(workspace.directory.resolve())
            assert_placed(problem, Path(problem.file))


NUMBER_EDGES: list[Any] = [0, -1, 2**63 - 1, 0.0, -0.0, 1e-300, 1e308, -1e308]
NUMBER_EDGES += [math.nan, math.inf, -math.inf, "1", True]
DURATION_EDGES = ["", "5x", "-1s", "0s", "0.0001ms", "0.5ms", "1.5ms", "36500d", "36501d"]
DURATION_EDGES += ["99999999999d", "9" * 400 + "s", "\uff15m", "1h30m", 15, 1.5]
TEXT_EDGES = ["", " ", "a\nb", "\x00", "\u202e", "x" * 300, "{unknown}", 'a="', 'x=~"("', 7]


def _edges_for(value: Any) -> list[Any]:
    if isinstance(value, bool):
        return [False, True, 0, "true"]
    if isinstance(value, int | float):
        return NUMBER_EDGES
    if isinstance(value, str) and _DURATION_TEXT.fullmatch(value):
        return DURATION_EDGES
    if isinstance(value, str):
        return TEXT_EDGES
    return []


@pytest.mark.parametrize("kind", ["rules", "config"])
def test_every_leaf_of_every_example_at_its_edges(workspace: Workspace, kind: str) -> None:
    """Not random: each scalar of each example file, set to each edge value of its kind,
    alone. The random mutations above seldom leave all but one value intact."""
    tried = 0
    for base in RULE_BASES if kind == "rules" else CONFIG_BASES:
        for path in _paths(base):
            for edge in _edges_for(_at(base, path)):
                document = copy.deepcopy(base)
                _at(document, path[:-1])[path[-1]] = edge
                if kind == "rules":
                    known = RuleFile.known_keys()
                    loaded, problems = workspace.validate(rules=to_toml(document))
                else:
                    loaded, problems = workspace.validate(config=to_toml(_local_globs(document)))
                tried += 1
                if loaded is None:
                    assert problems, (path, edge)
                    if kind == "rules":
                        for problem in problems:
                            assert_placed(problem, workspace.rules, {*document, *known})
                    else:
                        assert_config_problems(problems, workspace, document)
                else:
                    assert_sane(loaded.config)
                    for service in loaded.services.values():
                        assert_rule_file_sane(service.rules)
    assert tried > 200


@fuzz(500)
@given(document=mutated(CONFIG_BASES).map(_local_globs))
def test_mutated_config_files(workspace: Workspace, document: dict[str, Any]) -> None:
    note(f"config file: {to_toml(document)}")
    loaded, problems = workspace.validate(config=_written(document))
    event("refused" if loaded is None else "loaded")
    if loaded is None:
        assert problems
        assert_config_problems(problems, workspace, document)
    else:
        assert_sane(loaded.config)
        for service in loaded.services.values():
            assert_rule_file_sane(service.rules)


# -- found by the fuzzing above: plain regression tests ---------------------------------------


def _only_problem(workspace: Workspace, **files: str | bytes) -> Problem:
    loaded, problems = workspace.validate(**files)  # type: ignore[arg-type]
    assert loaded is None
    [problem] = problems
    return problem


@pytest.mark.parametrize(
    ("content", "line", "column"),
    [
        (b'[service]\nname = "\xff"\n', 2, 9),
        (b"\xed\xa0\x80", 1, 1),  # an encoded surrogate is not UTF-8 either
        (b"# caf\xc3", 1, 6),
    ],
)
def test_a_rule_file_that_is_not_utf8_is_a_problem_with_its_position(
    workspace: Workspace, content: bytes, line: int, column: int
) -> None:
    problem = _only_problem(workspace, rules=content)
    assert (problem.file, problem.line, problem.column) == (
        display_path(workspace.rules),
        line,
        column,
    )
    assert "UTF-8" in problem.message


def test_a_config_file_that_is_not_utf8_is_a_problem(workspace: Workspace) -> None:
    problem = _only_problem(workspace, config=b"[daemon]\n\x80")
    assert (problem.file, problem.line, problem.column) == (display_path(workspace.config), 2, 1)


@pytest.mark.parametrize(
    ("text", "line", "column"),
    [
        ("a = [", 1, 6),
        ('[service]\nname = "a', 2, 10),
        ("a = 1\nb = [1,\n", 3, 1),
    ],
)
def test_a_syntax_error_at_the_end_of_the_file_has_a_position(
    workspace: Workspace, text: str, line: int, column: int
) -> None:
    problem = _only_problem(workspace, rules=text)
    assert (problem.line, problem.column) == (line, column)
    assert "end of document" not in problem.message


@pytest.mark.parametrize("nested", ["[" * 2000 + "]" * 2000, "{a = " * 2000 + "1" + "}" * 2000])
def test_deeply_nested_toml_is_a_problem_not_a_crash(workspace: Workspace, nested: str) -> None:
    problem = _only_problem(workspace, rules=f"[service]\nname = {nested}\n")
    assert problem.file == display_path(workspace.rules)
    assert "nested too deeply" in problem.message


@pytest.mark.parametrize(
    ("duration", "message"),
    [
        ("99999999999d", "at most"),
        ("9" * 400 + "s", "at most"),
        ("900000000d", "at most"),
        ("0.0000001s", "at least 1ms"),
        ("0.5ms", "at least 1ms"),
        ("\u09eam", "invalid duration"),  # Bengali four, which looks like an 8
        ("\uff15m", "invalid duration"),  # a fullwidth 5
    ],
)
def test_durations_out_of_range_are_problems(
    workspace: Workspace, duration: str, message: str
) -> None:
    rules = VALID_RULES.replace('bake_time = "10m"', f'bake_time = "{duration}"')
    problem = _only_problem(workspace, rules=rules)
    assert problem.field == "service.bake_time"
    assert message in problem.message


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        ("above = 0.05", "above = nan", "check[1].above"),
        ("min_rate = 1.0", "min_rate = inf", "check[1].min_rate"),
        ('above = "1s"', "above = inf", "check[2].above"),
        ('max_increase = "20%"', 'max_increase = "nan%"', "check[2].max_increase"),
        ("above = 0\n", "above = inf\n", "check[3].above"),
    ],
)
def test_thresholds_must_be_finite(workspace: Workspace, old: str, new: str, field: str) -> None:
    assert old in VALID_RULES
    problem = _only_problem(workspace, rules=VALID_RULES.replace(old, new, 1))
    assert problem.field == field


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        (
            "query = 'sum(billing_queue_depth{service=\"billing\"})'",
            'query = "  "',
            "check[2].query",
        ),
        (
            'active_query = \'sum(rollout_info{namespace="payments", name="payments", '
            'phase="Progressing"}) > 0\'',
            'active_query = "\\t"',
            "canary.active_query",
        ),
    ],
)
def test_blank_promql_is_a_problem(workspace: Workspace, old: str, new: str, field: str) -> None:
    text = next(p.read_text() for p in EXAMPLE_RULES if old in p.read_text())
    problem = _only_problem(workspace, rules=text.replace(old, new))
    assert (problem.field, problem.message) == (field, "must be a PromQL expression, not blank")


def test_histogram_buckets_may_still_end_at_infinity(workspace: Workspace) -> None:
    rules = VALID_RULES.replace("2.5, 5]", "2.5, 5, inf]")
    loaded, problems = workspace.validate(rules=rules)
    assert problems == [] and loaded is not None


@pytest.mark.parametrize(
    "key",
    ["_env_file", "_env_prefix", "_case_sensitive", "_secrets_dir", "_cli_parse_args"],
)
def test_settings_options_in_the_config_file_are_unknown_keys(
    workspace: Workspace, key: str
) -> None:
    # BaseSettings takes these as its own options: from the file, "_env_file" would make
    # the loader read any file as dotenv, and "_env_prefix = 5" raised TypeError.
    config = f'{key} = 5\n[daemon]\nrule_files = ["rules/*.toml"]\nmode = "yolo"\n'
    loaded, problems = workspace.validate(config=config)
    assert loaded is None
    fields = {p.field: p.message for p in problems}
    assert fields[key].startswith("unknown key")
    assert "daemon.mode" in fields  # the rest of the file is still checked


# -- the command line, on a few of the hostile files ------------------------------------------

HOSTILE_FILES: dict[str, Callable[[], bytes]] = {
    "not-utf8.toml": lambda: b'[service]\nname = "\xff"\n',
    "nested.toml": lambda: b"[service]\nname = " + b"[" * 3000 + b"]" * 3000 + b"\n",
    "unfinished.toml": lambda: b"[service]\nname = [",
    "huge-duration.toml": lambda: VALID_RULES.replace('"10m"', '"99999999999d"').encode(),
    "nan.toml": lambda: VALID_RULES.replace("above = 0.05", "above = nan").encode(),
}


def _check(directory: Path, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rollbackd", "check", "-c", "config.toml", *options],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_rollbackd_check_on_hostile_files_reports_and_exits_1(tmp_path: Path) -> None:
    (tmp_path / "rules").mkdir()
    (tmp_path / "config.toml").write_bytes(
        b'_env_prefix = 5\n[daemon]\nrule_files = ["rules/*.toml"]\n'
    )
    for name, content in HOSTILE_FILES.items():
        (tmp_path / "rules" / name).write_bytes(content())

    result = _check(tmp_path)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    for name in HOSTILE_FILES:
        assert any(line.startswith(f"rules/{name}:") for line in lines), (name, lines)
    assert "config.toml: _env_prefix: unknown key" in lines
    assert lines[-1] == f"{len(HOSTILE_FILES) + 1} problem(s) in {len(HOSTILE_FILES) + 1} file(s)"

    as_json = _check(tmp_path, "--json")
    assert as_json.returncode == 1
    assert "Traceback" not in as_json.stderr
    document = json.loads(as_json.stdout)
    assert document["ok"] is False
    assert len(document["problems"]) == len(HOSTILE_FILES) + 1
