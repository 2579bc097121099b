"""Writing a config file and rule files for a test, pointed at a test's Prometheus."""

from __future__ import annotations

from pathlib import Path

from rollbackd.loader import LoadedConfig, load


def write_config(
    directory: Path,
    prometheus_url: str,
    rules: dict[str, str],
    *,
    extra: str = "",
    timeout: str = "5s",
) -> Path:
    """``rules`` maps a file name (without .toml) to its text. Returns the config path."""
    (directory / "rules").mkdir(parents=True, exist_ok=True)
    for name, text in rules.items():
        (directory / "rules" / f"{name}.toml").write_text(text)
    config = directory / "config.toml"
    config.write_text(
        f"""
[daemon]
state_dir = "state"
rule_files = ["rules/*.toml"]
log_format = "console"

[prometheus]
url = "{prometheus_url}"
timeout = "{timeout}"

[server]
listen = "127.0.0.1:0"
token_env = "ROLLBACKD_TEST_TOKEN"
{extra}
"""
    )
    return config


def load_config(
    directory: Path, prometheus_url: str, rules: dict[str, str], **kwargs: str
) -> LoadedConfig:
    return load(write_config(directory, prometheus_url, rules, **kwargs))


ROLLBACK = """
[[rollback]]
type = "command"
argv = ["/bin/true", "{to_version}"]
"""


def service(name: str, checks: str, *, header: str = "") -> str:
    """A rule file for ``name`` with a no-op rollback executor and the given checks."""
    return f'[service]\nname = "{name}"\n{header}\n{ROLLBACK}\n{checks}'
