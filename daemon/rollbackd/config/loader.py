"""Reading the config file and the rule files it names, and reporting every problem in them.

``load()`` gives a :class:`LoadedConfig` or raises :class:`ConfigError` carrying all the
problems of all the files, so one run of ``rollbackd check`` shows them all.
"""

from __future__ import annotations

import glob
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from rollbackd.checks import CHECK_TYPES
from rollbackd.config.rules import RuleFile
from rollbackd.config.settings import Config
from rollbackd.config.strict import did_you_mean
from rollbackd.executors import EXECUTOR_TYPES
from rollbackd.notify import NOTIFIER_TYPES

_TAGS = frozenset((*CHECK_TYPES, *EXECUTOR_TYPES, *NOTIFIER_TYPES))
_TOML_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")
_AT_END = " (at end of document)"
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_FRIENDLY = {
    "missing": "required key is missing",
    "extra_forbidden": "unknown key",
}


@dataclass(frozen=True)
class Problem:
    """One thing wrong in one file, placed by line (TOML syntax) or field path (schema)."""

    file: str
    message: str
    line: int | None = None
    column: int | None = None
    field: str | None = None

    def __str__(self) -> str:
        if self.line is not None:
            return f"{self.file}:{self.line}:{self.column or 1}: {self.message}"
        if self.field:
            return f"{self.file}: {self.field}: {self.message}"
        return f"{self.file}: {self.message}"


class ConfigError(Exception):
    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


@dataclass(frozen=True)
class Service:
    """One rule file, loaded."""

    path: Path
    rules: RuleFile

    @property
    def name(self) -> str:
        return self.rules.service.name


@dataclass(frozen=True)
class LoadedConfig:
    path: Path
    config: Config
    services: dict[str, Service] = field(default_factory=dict)

    @property
    def state_dir(self) -> Path:
        """``[daemon] state_dir``, relative to the config file's directory."""
        state_dir = Path(self.config.daemon.state_dir)
        if not state_dir.is_absolute():
            state_dir = self.path.resolve().parent / state_dir
        return state_dir


def field_path(loc: tuple[int | str, ...]) -> str:
    """``('check', 1, 'latency', 'above')`` -> ``check[2].above`` (indexes count from 1,
    as people count ``[[check]]`` tables; union tags are left out)."""
    text = ""
    previous: int | str | None = None
    for part in loc:
        if isinstance(part, int):
            text += f"[{part + 1}]"
        elif isinstance(previous, int) and part in _TAGS:
            pass  # the discriminator tag pydantic adds after a union item's index
        else:
            # A key that is not a bare TOML key (empty, dotted, with spaces or control
            # characters) is shown quoted, as it would be written in the file.
            name = part if _BARE_KEY.fullmatch(part) else json.dumps(part, ensure_ascii=False)
            text += f".{name}" if text else name
        previous = part
    return text


def _message(error: Any) -> tuple[tuple[int | str, ...], str]:
    loc = tuple(error["loc"])
    kind = error["type"]
    message = str(error["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    ctx = error.get("ctx") or {}
    if kind == "union_tag_invalid":
        expected = [t.strip(" '") for t in str(ctx.get("expected_tags", "")).split(",")]
        tag = str(ctx.get("tag", ""))
        message = f"unknown type {tag!r}{did_you_mean(tag, expected)}; types: {', '.join(expected)}"
        loc = (*loc, "type")
    elif kind == "union_tag_not_found":
        message = "required key 'type' is missing"
        loc = (*loc, "type")
    else:
        message = _FRIENDLY.get(kind, message)
    return loc, message


def schema_problems(file: str, exc: ValidationError) -> list[Problem]:
    problems = []
    for error in exc.errors():
        loc, message = _message(error)
        problems.append(Problem(file, message, field=field_path(loc) or None))
    return problems


def _position(text: str, offset: int) -> tuple[int, int]:
    """Line and column (from 1) of ``offset`` in ``text``."""
    line = text.count("\n", 0, offset) + 1
    return line, offset - (text.rfind("\n", 0, offset) + 1) + 1


def read_toml(path: Path, shown: str) -> tuple[dict[str, Any] | None, list[Problem]]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        return None, [Problem(shown, f"cannot read: {exc.strerror}")]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        # tomllib would let this escape; the position is where the bad byte is.
        before = raw[: exc.start].decode("utf-8")
        line, column = _position(before, len(before))
        return None, [
            Problem(
                shown,
                f"not UTF-8 text: byte {raw[exc.start]:#04x} cannot be read",
                line=line,
                column=column,
            )
        ]
    try:
        return tomllib.loads(text), []
    except RecursionError:
        return None, [Problem(shown, "cannot read: arrays or inline tables nested too deeply")]
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        position = _TOML_POSITION.search(message)
        if position:
            return None, [
                Problem(
                    shown,
                    message[: position.start()],
                    line=int(position.group(1)),
                    column=int(position.group(2)),
                )
            ]
        if message.endswith(_AT_END):
            line, column = _position(text, len(text))
            return None, [Problem(shown, message.removesuffix(_AT_END), line=line, column=column)]
        return None, [Problem(shown, message)]


def display_path(path: Path) -> str:
    """The path as the user should read it: relative to the working directory when inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def rule_file_paths(config_path: Path, patterns: list[str]) -> tuple[list[Path], list[Problem]]:
    base = config_path.resolve().parent
    found: list[Path] = []
    problems: list[Problem] = []
    for index, pattern in enumerate(patterns):
        full = pattern if Path(pattern).is_absolute() else str(base / pattern)
        # glob.glob, not Path.glob: patterns may be absolute and hold wildcards anywhere.
        matches = sorted(Path(m) for m in glob.glob(full))  # noqa: PTH207
        if not matches:
            problems.append(
                Problem(
                    display_path(config_path),
                    f"{pattern!r} matches no rule file (relative to {display_path(base) or '.'})",
                    field=f"daemon.rule_files[{index + 1}]",
                )
            )
        found.extend(m for m in matches if m not in found)
    return found, problems


def load_rule_file(path: Path) -> tuple[RuleFile | None, list[Problem]]:
    shown = display_path(path)
    data, problems = read_toml(path, shown)
    if data is None:
        return None, problems
    try:
        return RuleFile.model_validate(data), []
    except ValidationError as exc:
        return None, schema_problems(shown, exc)


def _raw_rule_patterns(data: dict[str, Any] | None) -> list[str]:
    """The rule-file globs, read from the raw file so a broken config still gets its rule
    files checked."""
    default = ["rules/*.toml"]
    daemon = (data or {}).get("daemon")
    if not isinstance(daemon, dict):
        return default
    patterns = daemon.get("rule_files", default)
    if isinstance(patterns, list) and all(isinstance(p, str) for p in patterns):
        return patterns
    return default


def _cross_file_problems(services: list[Service]) -> list[Problem]:
    problems: list[Problem] = []
    seen: dict[str, Service] = {}
    alerts: dict[tuple[str, tuple[str, ...]], Service] = {}
    for service in services:
        earlier = seen.get(service.name)
        if earlier is not None:
            problems.append(
                Problem(
                    display_path(service.path),
                    f"service {service.name!r} is already defined in {display_path(earlier.path)}",
                    field="service.name",
                )
            )
        seen.setdefault(service.name, service)
        for index, mapping in enumerate(service.rules.alert):
            key = (mapping.alertname, tuple(sorted(mapping.matchers)))
            other = alerts.get(key)
            if other is not None and other is not service:
                problems.append(
                    Problem(
                        display_path(service.path),
                        f"alert {mapping.alertname!r} with the same matchers already maps to "
                        f"service {other.name!r} ({display_path(other.path)}): an alert must name "
                        "one service",
                        field=f"alert[{index + 1}]",
                    )
                )
            alerts.setdefault(key, service)
    return problems


def validate(config_path: Path) -> tuple[LoadedConfig | None, list[Problem]]:
    """Load everything; return what loaded and every problem found on the way."""
    shown = display_path(config_path)
    data, problems = read_toml(config_path, shown)
    config: Config | None = None
    if data is not None:
        try:
            config = Config.from_toml_data(data)
        except ValidationError as exc:
            problems.extend(schema_problems(shown, exc))
    if data is None and not config_path.exists():
        return None, problems
    patterns = config.daemon.rule_files if config else _raw_rule_patterns(data)
    paths, glob_problems = rule_file_paths(config_path, patterns)
    problems.extend(glob_problems)
    services: list[Service] = []
    for path in paths:
        rules, rule_problems = load_rule_file(path)
        problems.extend(rule_problems)
        if rules is not None:
            services.append(Service(path, rules))
    problems.extend(_cross_file_problems(services))
    if config is None or problems:
        return None, problems
    return LoadedConfig(config_path, config, {s.name: s for s in services}), []


def load(config_path: Path) -> LoadedConfig:
    loaded, problems = validate(config_path)
    if loaded is None:
        raise ConfigError(problems)
    return loaded
