"""Writing a config file and rule files for a test, pointed at a test's Prometheus."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rollbackd.config.loader import LoadedConfig, load

DEPLOY = str(Path(__file__).parent / "deploy.py")


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


def checkout_rules(
    control: str,
    log: Path,
    *flags: str,
    verify_window: str = "2s",
    version_timeout: str = "10s",
) -> str:
    """The rule file of ``checkout`` as a fake service (support/fake_service.py) serves
    it: its version from ``app_build_info``, an error-rate check judged every second, and a
    rollback through support/deploy.py against the service's ``control`` URL, each run
    logged to ``log``; ``flags`` go to deploy.py (``--hang``, ``--hang-after``, ...)."""
    argv = [sys.executable, DEPLOY, control, "{to_version}", "--log", str(log), *flags]
    return f"""
[service]
name = "checkout"
version_query = 'max by (version) (app_build_info{{service="checkout"}})'
version_label = "version"
bake_time = "2s"

[[rollback]]
type = "command"
argv = {json.dumps(argv)}
timeout = "10m"

[verify]
window = "{verify_window}"
version_timeout = "{version_timeout}"

[[check]]
name = "errors"
type = "error_rate"
selector = 'service="checkout"'
errors = 'code=~"5.."'
above = 0.1
window = "10s"
breaches = 2
interval = "1s"
"""
