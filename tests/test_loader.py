"""Loading the config and rule files: strict keys with hints, every problem at once,
environment overrides, globs relative to the config file."""

from pathlib import Path

import pytest

from rollbackd.config.loader import ConfigError, Problem, field_path, load, validate
from rollbackd.core.model import Mode

ROOT = Path(__file__).resolve().parent.parent

GOOD_RULES = """
[service]
name = "{name}"

[[rollback]]
type = "command"
argv = ["/bin/true", "{{to_version}}"]

[[check]]
name = "errors"
type = "error_rate"
errors = 'code=~"5.."'
above = 0.05
"""


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    write(tmp_path, "config.toml", '[daemon]\nrule_files = ["rules/*.toml"]\n')
    (tmp_path / "rules").mkdir()
    return tmp_path


def problems_of(config: Path) -> list[Problem]:
    loaded, problems = validate(config)
    assert loaded is None
    return problems


def test_example_config_loads() -> None:
    loaded = load(ROOT / "config.example.toml")
    assert loaded.config.daemon.mode is Mode.AUTO
    assert set(loaded.services) == {
        "checkout",
        "payments",
        "inventory",
        "billing",
        "search",
        "orders",
    }


def test_rule_globs_are_relative_to_the_config_file(
    config_dir: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(config_dir, "rules/a.toml", GOOD_RULES.format(name="a"))
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    assert list(load(config_dir / "config.toml").services) == ["a"]


def test_misspelt_key_gets_a_hint_and_the_field_path(config_dir: Path) -> None:
    write(config_dir, "rules/a.toml", GOOD_RULES.format(name="a").replace("above", "abvoe"))
    problems = problems_of(config_dir / "config.toml")
    texts = [str(p) for p in problems]
    assert "rules/a.toml: check[1].abvoe: unknown key (did you mean 'above'?)" in [
        t.split(str(config_dir) + "/")[-1] for t in texts
    ]


def test_toml_syntax_error_names_file_line_and_column(config_dir: Path) -> None:
    write(config_dir, "rules/a.toml", '[service]\nname = "a"\n\n[[check]]\nname = broken\n')
    [problem] = problems_of(config_dir / "config.toml")
    assert problem.file.endswith("rules/a.toml")
    assert (problem.line, problem.column) == (5, 8)
    assert str(problem).endswith("rules/a.toml:5:8: Invalid value")


def test_every_problem_in_every_file_in_one_run(config_dir: Path) -> None:
    write(config_dir, "config.toml", '[daemon]\nmode = "yolo"\nrule_files = ["rules/*.toml"]\n')
    write(config_dir, "rules/a.toml", "[service\n")
    write(
        config_dir,
        "rules/b.toml",
        GOOD_RULES.format(name="b").replace("above = 0.05", "above = 5\ninterval = 10"),
    )
    problems = problems_of(config_dir / "config.toml")
    by_file = {(Path(p.file).name, p.field) for p in problems}
    assert ("config.toml", "daemon.mode") in by_file
    assert ("a.toml", None) in by_file
    assert ("b.toml", "check[1].above") in by_file
    assert ("b.toml", "check[1].interval") in by_file


def test_unknown_check_type_is_hinted(config_dir: Path) -> None:
    write(
        config_dir,
        "rules/a.toml",
        GOOD_RULES.format(name="a").replace('"error_rate"', '"error-rate"'),
    )
    [problem] = problems_of(config_dir / "config.toml")
    assert problem.field == "check[1].type"
    assert "unknown type 'error-rate' (did you mean 'error_rate'?)" in problem.message


def test_missing_required_key(config_dir: Path) -> None:
    write(config_dir, "rules/a.toml", GOOD_RULES.format(name="a").replace("above = 0.05\n", ""))
    [problem] = problems_of(config_dir / "config.toml")
    assert (problem.field, problem.message) == ("check[1].above", "required key is missing")


def test_inline_secret_is_refused_with_where_to_put_it(config_dir: Path) -> None:
    write(
        config_dir,
        "config.toml",
        'rule_files = []\n[daemon]\nrule_files = ["rules/*.toml"]\n'
        '[[notify]]\nname = "ops"\ntype = "slack"\nurl = "https://hooks.example/x"\n',
    )
    write(config_dir, "rules/a.toml", GOOD_RULES.format(name="a"))
    fields = {p.field: p.message for p in problems_of(config_dir / "config.toml")}
    assert fields["rule_files"] == "unknown key"
    assert "url_file" in fields["notify[1].url"]


def test_unknown_placeholder_in_executor(config_dir: Path) -> None:
    write(config_dir, "rules/a.toml", GOOD_RULES.format(name="a").replace("to_version", "version"))
    [problem] = problems_of(config_dir / "config.toml")
    assert problem.field == "rollback[1]"
    assert "unknown placeholder {version}" in problem.message


def test_glob_that_matches_nothing_is_a_problem(config_dir: Path) -> None:
    [problem] = problems_of(config_dir / "config.toml")
    assert problem.field == "daemon.rule_files[1]"
    assert "matches no rule file" in problem.message


def test_duplicate_service_names_across_files(config_dir: Path) -> None:
    write(config_dir, "rules/a.toml", GOOD_RULES.format(name="same"))
    write(config_dir, "rules/b.toml", GOOD_RULES.format(name="same"))
    [problem] = problems_of(config_dir / "config.toml")
    assert problem.file.endswith("b.toml")
    assert "already defined in" in problem.message


def test_environment_overrides_the_file(config_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(
        config_dir,
        "config.toml",
        '[daemon]\nrule_files = ["rules/*.toml"]\n[prometheus]\ntimeout = "3s"\n',
    )
    write(config_dir, "rules/a.toml", GOOD_RULES.format(name="a"))
    monkeypatch.setenv("ROLLBACKD_PROMETHEUS__URL", "http://127.0.0.1:19090/")
    monkeypatch.setenv("ROLLBACKD_DAEMON__MODE", "dry-run")
    loaded = load(config_dir / "config.toml")
    assert loaded.config.prometheus.url == "http://127.0.0.1:19090"
    assert loaded.config.prometheus.timeout.total_seconds() == 3
    assert loaded.config.daemon.mode is Mode.DRY_RUN


def test_bad_environment_override_is_reported(
    config_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(config_dir, "rules/a.toml", GOOD_RULES.format(name="a"))
    monkeypatch.setenv("ROLLBACKD_GUARDS__COOLDOWN", "soon")
    with pytest.raises(ConfigError) as caught:
        load(config_dir / "config.toml")
    [problem] = caught.value.problems
    assert problem.field == "guards.cooldown"


def test_rule_file_without_rollback_executor(config_dir: Path) -> None:
    text = GOOD_RULES.format(name="a").replace(
        '[[rollback]]\ntype = "command"\nargv = ["/bin/true", "{to_version}"]\n', ""
    )
    write(config_dir, "rules/a.toml", text)
    [problem] = problems_of(config_dir / "config.toml")
    assert "needs at least one [[rollback]]" in problem.message


@pytest.mark.parametrize(
    ("loc", "text"),
    [
        (("check", 1, "latency", "above"), "check[2].above"),
        (("check", 0, "query", "query"), "check[1].query"),
        (("canary", "abort", 0, "command", "argv", 2), "canary.abort[1].argv[3]"),
        (("service", "name"), "service.name"),
        ((), ""),
    ],
)
def test_field_paths(loc: tuple[int | str, ...], text: str) -> None:
    assert field_path(loc) == text


def test_alert_matcher_with_a_broken_regex(config_dir: Path) -> None:
    text = (
        GOOD_RULES.format(name="a") + '[[alert]]\nalertname = "X"\nmatchers = [\'team=~"(pay"\']\n'
    )
    write(config_dir, "rules/a.toml", text)
    [problem] = problems_of(config_dir / "config.toml")
    assert problem.field == "alert[1].matchers"
    assert "invalid regular expression" in problem.message
