"""Fault injection: hostile outside input never reaches a shell or a path, end to end.

Outside input enters the daemon two ways, and both are driven here through the real entry
points, with every executor type configured to use every placeholder wherever it takes one:

* Alertmanager's webhook: labels and annotations become the rollback's reason (one line,
  at most ``REASON_LIMIT`` characters), which reaches executors as ``{reason}`` and
  ``ROLLBACKD_REASON``; labels never name the service, the executor or a version.
* Versions: CI's ``POST /api/v1/releases`` and the labels of ``version_query``'s answer in a
  real Prometheus. A version that is not a plain version string is refused before any
  executor could see it, and each executor refuses one handed to it all the same.

Hostile values carry a canary (``touch CANARY-<hex>``, ``../../../../tmp/escape-<hex>``): no
file of that name may appear anywhere, and nothing may be created outside the directories
the rules name. The recording fakes of ``kubectl``/``helm``/``git`` (git passed through to the
real one) and a real local HTTP server show what each executor was given, element by element.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest

from rollbackd.api.models import VERSION_PATTERN as API_VERSION_PATTERN
from rollbackd.core.alert_text import REASON_LIMIT
from rollbackd.core.model import RollbackState, VersionSource
from rollbackd.core.version_names import VERSION_PATTERN, is_valid_version
from rollbackd.executors import EXECUTOR_TYPES
from rollbackd.runtime.pipeline import Trigger
from support.configs import write_config
from support.daemon_process import RECORD, DaemonProcess, InProcessDaemon, executions
from support.fake_service import FakeService
from support.hostile_http import Recorded, RecordingServer, Reply, always
from support.prometheus import PrometheusServer, ScrapeTarget
from support.real_git import REAL_GIT, git
from support.recording_tools import RecordingTool, RecordingToolFactory, recording_tool

__all__ = ["recording_tool"]  # the fixture, imported for pytest

pytestmark = [pytest.mark.faults]

HEX = uuid.uuid4().hex[:12]
"""In the name of every file a hostile value would create: searched for afterwards."""
CANARY = f"CANARY-{HEX}"
ESCAPE = f"../../../../tmp/escape-{HEX}"
PLACEHOLDER = re.compile(r"\{(service|from_version|to_version|reason|rollback_id|canary)\}")
ALL_PLACEHOLDERS = "{service}|{from_version}|{to_version}|{reason}|{rollback_id}|{canary}"
NOT_IN_A_REASON = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff]")
"""Control characters, what splitlines() takes for a line break, zero-width and
bidirectional characters."""
DEFAULT_MAX_BODY = 1_048_576
"""``[server].max_body``'s default (config.ServerSection)."""
HUGE = 200_000
GOOD, BAD = "1.0.0", "2.0.0"


def expand(template: str, values: Mapping[str, str]) -> str:
    """The test's own single-pass substitution: a value is never looked at again."""
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


# -- the hostile alerts ---------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One hostile alert; each goes to its own service, so each gets its own rollback."""

    name: str
    labels: dict[str, str]
    annotations: dict[str, str]
    exact_reason: str | None = None
    """The reason expected verbatim (text that one_line leaves alone), else None."""
    kept: tuple[str, ...] = ()
    """Fragments the reason must still carry, unexpanded and unsplit."""

    @property
    def service(self) -> str:
        return f"svc-{self.name}"

    @property
    def alertname(self) -> str:
        return f"Hostile{self.name.title()}"


SHELL = (
    f"$(touch {CANARY}) `touch {CANARY}` ; touch {CANARY} # | touch {CANARY} "
    f"&& touch {CANARY} || touch {CANARY} > {CANARY} & touch {CANARY}"
)
QUOTING = (
    """"}, "x": "y", "reason": "evil", "a": {"b": "' \\" \\\\ '"' """
    "{to_version} {service} {reason} {rollback_id} {canary} {from_version} "
    "%s %n %(x)s ${HOME} $IFS &x=1&reason=2#frag ?q=1 /../.. </script> -- --force"
)
LINES = (
    f"first\n touch {CANARY}\r\nX-Injected: yes\r\n\r\nsecond\x00nul\x01\x07\x08"
    "\x1b[31mred\x1b[0m\x7f\tTAB\x0b\x0c\x1c\x1f\x85\u2028\u2029end"
)
UNICODE = (
    "回滚 ✓ 🚀 café e\u0301 \u202eevil\u202c \u200bzero\u200dwidth ﷽ Ω≈ç√ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ١٢٣ ＄（touch）"
)


def _huge(unit: str) -> str:
    return (unit * (HUGE // len(unit) + 1))[:HUGE]


VARIANTS = (
    Variant(
        "shell",
        # Labels that look like they pick the service, executor or version: only data.
        {"service": "svc-unicode", "version": "6.6.6", "to_version": "6.6.6", "executor": "rm"},
        {"summary": SHELL, "description": "ignored: the summary wins"},
        exact_reason=f"alert HostileShell: {SHELL}",
    ),
    Variant(
        "quoting",
        {},
        {"summary": QUOTING},
        exact_reason=f"alert HostileQuoting: {QUOTING}",
        kept=("{to_version}", "{service}", "{reason}", '"}, "x": "y"', "&x=1&reason=2#frag"),
    ),
    Variant(
        "lines",
        {"severity": "critical\n; touch " + CANARY},
        {"description": LINES},
        kept=(f"first touch {CANARY}", "X-Injected: yes", "end"),
    ),
    Variant(
        "paths",
        # No annotations: the reason is made of the labels.
        {
            "version": ESCAPE,
            "service": f"$(touch {CANARY})",
            "to_version": "{to_version}",
            "from_version": f"; touch {CANARY} #",
            "path": ESCAPE + "/{service}",
        },
        {},
        kept=(f'from_version="; touch {CANARY} #"', f'path="{ESCAPE}/{{service}}"'),
    ),
    Variant(
        "huge",
        {"huge": _huge(f"A; touch {CANARY} "), "version": _huge("../")},
        {"description": _huge(f"\n touch {CANARY} $(x)\r\n")},
    ),
    Variant(
        "unicode",
        {},
        {"summary": UNICODE},
        # Letters, marks and emoji stay; zero-width and bidirectional characters become
        # spaces (they could disguise what a terminal shows).
        exact_reason="alert HostileUnicode: 回滚 ✓ 🚀 café e\u0301 evil zero width ﷽ Ω≈ç√ "
        "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ١٢٣ ＄（touch）",
    ),
)


def alert_json(variant: Variant, number: int) -> dict[str, Any]:
    return {
        "status": "firing",
        "labels": {"alertname": variant.alertname, **variant.labels},
        "annotations": variant.annotations,
        "startsAt": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
        "endsAt": "0001-01-01T00:00:00Z",
        "generatorURL": f"http://prometheus.test/graph?g0.expr=$(touch+{CANARY})",
        "fingerprint": f"{number:016x}",
    }


def webhook(*alerts: dict[str, Any], receiver: str = "rollbackd") -> dict[str, Any]:
    return {
        "version": "4",
        "receiver": receiver,
        "status": "firing",
        "alerts": list(alerts),
        "groupLabels": {},
        "commonLabels": {},
        "commonAnnotations": {},
        "externalURL": "http://alertmanager.test",
        "groupKey": f'{{}}:{{alertname="$(touch {CANARY})"}}',
        "truncatedAlerts": 0,
    }


# -- the places each executor may write to, and what it is given ---------------------------


MANIFEST = "deploy/app.yaml"
MATCH = r"image: registry\.example/app:(\S+)"


@dataclass
class World:
    """A test's directories, peers and tools; ``allowed`` are the only places (relative to
    ``root``) where a run may create anything."""

    root: Path
    tools: RecordingToolFactory
    work: Path = field(init=False)
    logs: Path = field(init=False)
    srv: Path = field(init=False)
    remote: Path = field(init=False)
    clones: Path = field(init=False)
    server: RecordingServer | None = None
    allowed: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.work = self.root / "work"
        self.logs = self.root / "logs"
        self.srv = self.root / "srv"
        self.remote = self.root / "git" / "remote.git"
        self.clones = self.root / "clones"
        for directory in (self.work, self.logs, self.srv, self.clones):
            directory.mkdir(parents=True)
        self.allowed = ["daemon/", "logs/", "recording-bin/"]

    def log(self, service: str) -> Path:
        return self.logs / f"{service}.jsonl"

    def recorder_argv(self, service: str) -> list[str]:
        """record_run.py, then every placeholder alone, inside a word, and side by side."""
        return [
            sys.executable,
            RECORD,
            str(self.log(service)),
            "{service}",
            "{from_version}",
            "{to_version}",
            "{reason}",
            "{rollback_id}",
            "{canary}",
            "pre-{reason}-post",
            "{to_version}{reason}{service}",
        ]

    def http_server(self) -> RecordingServer:
        if self.server is None:
            self.server = RecordingServer(always(Reply(200, b'{"ok": true}')))
            self.server.start()
        return self.server

    def symlink_dirs(self, service: str) -> tuple[Path, Path]:
        versions = self.srv / service / "versions"
        for version in (GOOD, BAD):
            (versions / version).mkdir(parents=True, exist_ok=True)
        link = self.srv / service / "current"
        if not link.is_symlink():
            link.symlink_to(versions / BAD, target_is_directory=True)
        return link, versions

    def git_remote(self, branches: list[str]) -> None:
        if REAL_GIT is None:
            pytest.skip("git is not installed")
        self.remote.parent.mkdir(parents=True, exist_ok=True)
        git("init", "--quiet", "--bare", "--initial-branch=main", str(self.remote), cwd=self.root)
        seed = self.root / "git" / "seed"
        git("clone", "--quiet", self.remote.as_uri(), str(seed), cwd=self.root)
        (seed / "deploy").mkdir()
        (seed / MANIFEST).write_text(f"kind: Deployment\nimage: registry.example/app:{BAD}\n")
        git("add", "--all", cwd=seed)
        git("commit", "--quiet", "-m", f"release {BAD}", cwd=seed)
        for branch in branches:
            git("push", "--quiet", "origin", f"HEAD:refs/heads/{branch}", cwd=seed)
        self.allowed.append("git/remote.git/")

    def executor(self, kind: str, service: str) -> str:
        """A ``[[rollback]]`` of type ``kind`` using every placeholder it accepts wherever
        it accepts templates (rules.py, executors/*.py: ``templates()``)."""
        q = json.dumps
        if kind == "command":
            return f"""
[[rollback]]
type = "command"
argv = {q(self.recorder_argv(service))}
cwd = {q(str(self.work))}
env = {{ ROLLBACKD_TEMPLATED = {q(ALL_PLACEHOLDERS)} }}
timeout = "30s"
"""
        if kind == "http":
            url = (
                f"{self.http_server().url}/rollback/{{service}}/{{to_version}}"
                "?from={from_version}&reason={reason}&id={rollback_id}&canary={canary}"
            )
            body = (
                '{"service": "{service}", "from": "{from_version}", "to": "{to_version}", '
                '"reason": "{reason}", "id": "{rollback_id}", "canary": {canary}, '
                '"both": "{reason}{to_version}"}'
            )
            headers = {
                "X-Reason": "{reason}",
                "X-Rollback": "{service} {from_version} {to_version} {rollback_id} {canary}",
                "Content-Type": "application/json",
            }
            header_text = ", ".join(f"{q(k)} = {q(v)}" for k, v in headers.items())
            return f"""
[[rollback]]
type = "http"
url = {q(url)}
headers = {{ {header_text} }}
body = {q(body)}
timeout = "30s"
"""
        if kind == "kubernetes":
            # `image` is its only template: every placeholder, to see each stay in one word.
            image = "registry.example/{service}:{to_version}@{from_version}/{rollback_id}/"
            image += "{canary}/{reason}"
            return f"""
[[rollback]]
type = "kubernetes"
resource = "deployment/{service}"
namespace = "prod"
action = "set_image"
container = "app"
image = {q(image)}
timeout = "30s"
"""
        if kind == "helm":
            return f"""
[[rollback]]
type = "helm"
release = "{service}"
namespace = "prod"
timeout = "30s"
"""
        if kind == "argo_rollouts":
            return f"""
[[rollback]]
type = "argo_rollouts"
rollout = "{service}"
namespace = "prod"
timeout = "30s"
"""
        if kind == "symlink":
            link, versions = self.symlink_dirs(service)
            self.allowed.append(str(link.relative_to(self.root)))
            return f"""
[[rollback]]
type = "symlink"
link = {q(str(link))}
versions_dir = {q(str(versions))}
restart = {q(self.recorder_argv(service))}
timeout = "30s"
"""
        if kind == "git":
            message = (
                "rollback {service} {from_version} -> {to_version} "
                "({rollback_id}, canary {canary}): {reason}"
            )
            return f"""
[[rollback]]
type = "git"
repository = {q(self.remote.as_uri())}
branch = "{service}"
file = "{MANIFEST}"
match = {q(MATCH)}
message = {q(message)}
timeout = "60s"
"""
        raise AssertionError(f"no executor block for {kind!r}")

    def rules(self, kind: str, service: str, alertname: str) -> str:
        return f"""
[service]
name = "{service}"
rollback_window = "1h"

{self.executor(kind, service)}

[verify]
window = "100ms"

[[alert]]
alertname = "{alertname}"
"""

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()


@pytest.fixture
def world(
    tmp_path: Path,
    recording_tool: RecordingToolFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[World]:
    made = World(tmp_path, recording_tool)
    monkeypatch.chdir(made.work)
    # The git executor's temporary clones go here, so the test sees them removed.
    monkeypatch.setattr(tempfile, "tempdir", str(made.clones))
    yield made
    made.close()


def tools(world: World, kind: str) -> dict[str, RecordingTool]:
    """The recording fakes for ``kind`` (made before the daemon so PATH holds them)."""
    if kind in ("kubernetes", "argo_rollouts"):
        return {"kubectl": world.tools("kubectl")}
    if kind == "helm":
        return {"helm": world.tools("helm")}
    if kind == "git":
        return {"git": world.tools("git", pass_through=True)}
    return {}


def tree(root: Path) -> set[str]:
    """Every path under ``root`` (symlinks not followed), relative."""
    found: set[str] = set()
    for directory, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            found.add(str((Path(directory) / name).relative_to(root)))
    return found


def assert_no_canary(world: World, before: set[str]) -> None:
    """No canary file anywhere it could land, and nothing new outside the allowed places."""
    places = [Path.cwd(), Path(tempfile.gettempdir()), Path("/tmp"), Path.home()]
    places.append(Path(__file__).resolve().parents[1])  # the checkout the tests run from
    for place in places:
        if place.is_dir():
            hits = [p for p in place.iterdir() if HEX in p.name]
            assert hits == [], f"hostile text created {hits}"
    assert not Path(f"/tmp/escape-{HEX}").exists()
    after = tree(world.root)
    assert [p for p in after if HEX in p] == []
    outside = sorted(
        p
        for p in after - before
        if not any(p == a or p.startswith(a) for a in world.allowed)
        and not any(a.startswith(p + "/") for a in world.allowed)
    )
    assert outside == [], f"created outside the configured directories: {outside}"
    assert list(world.work.iterdir()) == []
    assert list(world.clones.iterdir()) == [], "a temporary git clone was left behind"


def assert_reason_is_one_short_line(reason: str, variant: Variant) -> None:
    assert reason.startswith(f"alert {variant.alertname}: ")
    assert len(reason) <= REASON_LIMIT
    assert NOT_IN_A_REASON.search(reason) is None, repr(reason)
    if variant.exact_reason is not None:
        assert reason == variant.exact_reason
    for fragment in variant.kept:
        assert fragment in reason, (fragment, reason)


def check_recorded_run(
    world: World, service: str, values: Mapping[str, str], *, templated_env: bool
) -> None:
    """record_run.py ran once; each value is one argv element, verbatim, as in its env."""
    [run] = executions(world.log(service))
    template = world.recorder_argv(service)[3:]
    assert run["argv"] == [expand(arg, values) for arg in template]
    expected = {f"ROLLBACKD_{k.upper()}": v for k, v in values.items()}
    if templated_env:
        expected["ROLLBACKD_TEMPLATED"] = expand(ALL_PLACEHOLDERS, values)
    assert run["env"] == expected


def check_command(world: World, service: str, values: Mapping[str, str]) -> None:
    check_recorded_run(world, service, values, templated_env=True)


def check_symlink(world: World, service: str, values: Mapping[str, str]) -> None:
    link = world.srv / service / "current"
    assert link.is_symlink()
    assert link.resolve() == (world.srv / service / "versions" / GOOD).resolve()
    assert sorted(p.name for p in link.parent.iterdir()) == ["current", "versions"]
    check_recorded_run(world, service, values, templated_env=False)


def header(request: Recorded, name: str) -> str:
    # http.server reads headers as latin-1; the executor sent UTF-8.
    return request.headers[name].encode("latin-1").decode("utf-8")


def check_http(world: World, service: str, values: Mapping[str, str]) -> None:
    assert world.server is not None
    [request] = [r for r in world.server.requests if r.path.startswith(f"/rollback/{service}/")]
    assert request.method == "POST"
    assert request.path == f"/rollback/{service}/{GOOD}"
    assert request.query == {
        "from": [BAD],
        "reason": [values["reason"]],
        "id": [values["rollback_id"]],
        "canary": ["false"],
    }
    for name, value in request.headers.items():
        assert "\r" not in value and "\n" not in value, (name, value)
    assert "x-injected" not in request.headers
    assert header(request, "x-reason") == values["reason"]
    assert header(request, "x-rollback") == f"{service} {BAD} {GOOD} {values['rollback_id']} false"
    assert json.loads(request.body) == {
        "service": service,
        "from": BAD,
        "to": GOOD,
        "reason": values["reason"],
        "id": values["rollback_id"],
        "canary": False,
        "both": values["reason"] + GOOD,
    }


def tool_calls(tool: RecordingTool, service: str) -> list[list[str]]:
    return [c.argv for c in tool.records if any(service in arg for arg in c.argv)]


def assert_untouched_by_values(tool: RecordingTool, values: Mapping[str, str]) -> None:
    """Tools that take no template get neither the reason nor the ROLLBACKD_* variables."""
    for call in tool.records:
        assert not [k for k in call.env if k.startswith("ROLLBACKD_")]
        for text in (*call.argv, *call.env.values()):
            assert values["reason"] not in text
            assert HEX not in text


def check_kubernetes(world: World, service: str, values: Mapping[str, str]) -> None:
    kubectl = world.tools("kubectl")
    image = f"registry.example/{service}:{GOOD}@{BAD}/{values['rollback_id']}/false/"
    image += values["reason"]
    [set_image, status] = tool_calls(kubectl, service)
    assert set_image == ["-n", "prod", "set", "image", f"deployment/{service}", f"app={image}"]
    assert status[:5] == ["-n", "prod", "rollout", "status", f"deployment/{service}"]
    assert re.fullmatch(r"--timeout=\d+s", status[5]) and len(status) == 6
    for call in kubectl.records:
        assert not [k for k in call.env if k.startswith("ROLLBACKD_")]


def check_helm(world: World, service: str, values: Mapping[str, str]) -> None:
    helm = world.tools("helm")
    assert tool_calls(helm, service) == [
        ["rollback", service, "-n", "prod", "--wait", "--timeout", "27s"]
    ]
    assert_untouched_by_values(helm, values)


def check_argo_rollouts(world: World, service: str, values: Mapping[str, str]) -> None:
    kubectl = world.tools("kubectl")
    assert tool_calls(kubectl, service) == [["argo", "rollouts", "abort", service, "-n", "prod"]]
    assert_untouched_by_values(kubectl, values)


def check_git(world: World, service: str, values: Mapping[str, str]) -> None:
    records = world.tools("git", pass_through=True).records
    [clone] = [c for c in records if "clone" in c.argv and service in c.argv]
    assert clone.argv[-5:-1] == ["--branch", service, "--", world.remote.as_uri()]
    directory = clone.argv[-1]
    ran = [c.argv for c in records if c.cwd == directory]
    # After the 10 words of -c options every git call starts with.
    assert [a[10] for a in ran] == ["add", "commit", "push", "rev-parse"]
    message = expand(
        "rollback {service} {from_version} -> {to_version} "
        "({rollback_id}, canary {canary}): {reason}",
        values,
    )
    [commit] = [a for a in ran if "commit" in a]
    assert commit[-3:] == ["commit", "-m", message]
    assert git("log", "-1", "--format=%B", service, cwd=world.remote).rstrip("\n") == message
    assert git("show", f"{service}:{MANIFEST}", cwd=world.remote) == (
        f"kind: Deployment\nimage: registry.example/app:{GOOD}\n"
    )
    for call in records:
        assert not [k for k in call.env if k.startswith("ROLLBACKD_")]


CHECKS: dict[str, Callable[[World, str, Mapping[str, str]], None]] = {
    "command": check_command,
    "http": check_http,
    "kubernetes": check_kubernetes,
    "helm": check_helm,
    "argo_rollouts": check_argo_rollouts,
    "symlink": check_symlink,
    "git": check_git,
}


def test_every_executor_type_is_covered() -> None:
    assert set(CHECKS) == set(EXECUTOR_TYPES)


def make_daemon(
    world: World, kind: str, variants: tuple[Variant, ...], *, max_body: int = DEFAULT_MAX_BODY
) -> InProcessDaemon:
    if kind == "git":
        world.git_remote([v.service for v in variants])
    tools(world, kind)
    rules = {v.service: world.rules(kind, v.service, v.alertname) for v in variants}
    daemon = InProcessDaemon(world.root / "daemon", rules, max_body=max_body)
    now = time.time()
    for variant in variants:
        daemon.release(variant.service, GOOD, at=now - 100)
        daemon.release(variant.service, BAD, at=now - 10, bake=False)
    return daemon


# -- the tests ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", EXECUTOR_TYPES)
async def test_hostile_alert_text_stays_one_literal_value_in_every_executor(
    world: World, kind: str
) -> None:
    daemon = make_daemon(world, kind, VARIANTS)
    before = tree(world.root)
    payload = webhook(*(alert_json(v, n) for n, v in enumerate(VARIANTS, 1)))
    assert len(json.dumps(payload)) < DEFAULT_MAX_BODY
    try:
        async with daemon.client() as client:
            answer = await client.post("/api/v1/alertmanager", json=payload)
            assert answer.status_code == 200, answer.text
            results = answer.json()["alerts"]
            assert [r["service"] for r in results] == [v.service for v in VARIANTS]
            assert all(r["outcome"].startswith("executing") for r in results), results
            await daemon.pipeline.wait_idle()
            # Alertmanager re-sends a firing group: nothing runs a second time.
            again = await client.post("/api/v1/alertmanager", json=payload)
            assert again.status_code == 200
            assert [r["new"] for r in again.json()["alerts"]] == [False] * len(VARIANTS)
            await daemon.pipeline.wait_idle()

        for variant in VARIANTS:
            [rollback] = daemon.store.rollbacks(service=variant.service)
            # Labels named service/version/to_version changed neither.
            assert (rollback.service, rollback.from_version, rollback.to_version) == (
                variant.service,
                BAD,
                GOOD,
            )
            assert rollback.source == "alert"
            assert rollback.state is RollbackState.SUCCEEDED, rollback.outcome
            steps = daemon.store.steps(rollback.id)
            assert [(s.kind, s.ok) for s in steps] == [("rollback", True), ("verify", True)]
            assert_reason_is_one_short_line(rollback.reason, variant)
            values = {
                "service": variant.service,
                "from_version": BAD,
                "to_version": GOOD,
                "reason": rollback.reason,
                "rollback_id": f"rb-{rollback.id}",
                "canary": "false",
                "fencing_token": "",  # one daemon alone: no lease, no fence
            }
            CHECKS[kind](world, variant.service, values)
        huge = next(v for v in VARIANTS if v.name == "huge")
        [cut] = daemon.store.rollbacks(service=huge.service)
        assert len(cut.reason) == REASON_LIMIT and cut.reason.endswith("...")
        stored = {a.alertname: a for a in daemon.store.alerts()}
        # Kept whole as data (the record, not the reason): 200 KB labels are not cut there.
        assert stored[huge.alertname].labels == {"alertname": huge.alertname, **huge.labels}
    finally:
        daemon.close()
    assert_no_canary(world, before)


FORM_SUMMARY = "p99 up&version=6.6.6&service=payments&reason=+%26 =%3D;touch " + CANARY


async def test_a_form_body_keeps_alert_text_inside_its_own_field(world: World) -> None:
    """A form-encoded body is a body too: alert text must not add or override a field
    (``&version=6.6.6`` would name the version to a first-wins parser)."""
    variant = Variant("form", {}, {"summary": FORM_SUMMARY})
    server = world.http_server()
    rules = f"""
[service]
name = "{variant.service}"
rollback_window = "1h"

[[rollback]]
type = "http"
url = "{server.url}/form"
headers = {{ "Content-Type" = "application/x-www-form-urlencoded" }}
body = "service={{service}}&reason={{reason}}&version={{to_version}}&from={{from_version}}"
timeout = "30s"

[verify]
window = "100ms"

[[alert]]
alertname = "{variant.alertname}"
"""
    daemon = InProcessDaemon(world.root / "daemon", {variant.service: rules})
    now = time.time()
    daemon.release(variant.service, GOOD, at=now - 100)
    daemon.release(variant.service, BAD, at=now - 10, bake=False)
    try:
        async with daemon.client() as client:
            answer = await client.post("/api/v1/alertmanager", json=webhook(alert_json(variant, 1)))
            assert answer.status_code == 200
            await daemon.pipeline.wait_idle()
        [rollback] = daemon.store.rollbacks()
        assert rollback.state is RollbackState.SUCCEEDED, rollback.outcome
        assert rollback.reason == f"alert HostileForm: {FORM_SUMMARY}"
    finally:
        daemon.close()
    [request] = server.requests
    assert parse_qs(request.body.decode("ascii"), keep_blank_values=True, strict_parsing=True) == {
        "service": [variant.service],
        "reason": [rollback.reason],
        "version": [GOOD],
        "from": [BAD],
    }


HOSTILE_VERSIONS = (
    f"$(touch {CANARY})",
    f"`touch {CANARY}`",
    f"1.0.0; touch {CANARY}",
    f"1.0.0 && touch {CANARY}",
    f"1.0.0|touch {CANARY}",
    "1.0.0\n",
    f"1.0.0\r\ntouch {CANARY}",
    "1.0.0\x00",
    ESCAPE,
    "../1.0.0",
    "1.0.0/../../x",
    "/etc/passwd",
    "-rf",
    "--force",
    ".hidden",
    "{to_version}",
    "1.0.0 ",
    "１.0.0",
    "v1\u202e",
    '1.0.0"}, "x": "',
    "a" * 129,
    "",
)


async def test_hostile_versions_from_ci_are_refused_before_anything_runs(world: World) -> None:
    variant = VARIANTS[0]
    daemon = make_daemon(world, "command", (variant,))
    before = tree(world.root)
    service = variant.service
    try:
        async with daemon.client() as client:
            for version in HOSTILE_VERSIONS:
                release = await client.post(
                    "/api/v1/releases", json={"service": service, "version": version}
                )
                assert release.status_code == 422, (version, release.text)
                rollback = await client.post(
                    "/api/v1/rollbacks",
                    json={"service": service, "to_version": version, "reason": "by hand"},
                )
                assert rollback.status_code == 422, (version, rollback.text)
            meta = await client.post(
                "/api/v1/releases",
                json={"service": service, "version": "3.0.0", "meta": {"commit": "a\nb"}},
            )
            assert meta.status_code == 422
            assert daemon.store.rollbacks() == []
            assert {v.version for v in daemon.store.versions(service)} == {GOOD, BAD}
            state = daemon.store.service_state(service)
            assert state is not None and state.current_version == BAD

            # The release in force is still the one rolled back, with valid versions only.
            delivered = await client.post(
                "/api/v1/alertmanager", json=webhook(alert_json(variant, 1))
            )
            assert delivered.status_code == 200
            await daemon.pipeline.wait_idle()
        [rollback_record] = daemon.store.rollbacks()
        assert (rollback_record.from_version, rollback_record.to_version) == (BAD, GOOD)
        [run] = executions(world.log(service))
        assert run["argv"][1:3] == [BAD, GOOD]
    finally:
        daemon.close()
    assert_no_canary(world, before)


@pytest.mark.parametrize("kind", EXECUTOR_TYPES)
@pytest.mark.parametrize("which", ["to_version", "from_version"])
async def test_every_executor_refuses_a_hostile_version_it_is_handed(
    world: World, kind: str, which: str
) -> None:
    """Defence in depth: should a hostile version get past the API and versions.py (an old
    state file, a bug), each executor still refuses it and runs nothing."""
    variant = Variant("direct", {}, {})
    daemon = make_daemon(world, kind, (variant,))
    service = variant.service
    hostile = f"{ESCAPE};touch {CANARY}"
    if which == "from_version":
        # Straight into the store, past VersionTracker's check.
        daemon.store.record_version_change(service, BAD, hostile, time.time(), VersionSource.API)
    before = tree(world.root)
    calls_before = {name: len(tool.records) for name, tool in tools(world, kind).items()}
    try:
        trigger = Trigger(
            service=service,
            source="manual",
            reason=f"by hand $(touch {CANARY})",
            at=time.time(),
            automatic=False,
            to_version=hostile if which == "to_version" else None,
            requested_by="mallory",
        )
        submitted = await daemon.pipeline.submit(trigger)
        assert submitted.rollback is not None, submitted.reason
        await daemon.pipeline.wait_idle()
        rollback = daemon.store.rollback(submitted.rollback.id)
        assert rollback is not None
        assert getattr(rollback, which) == hostile
        assert rollback.state is RollbackState.FAILED
        [step] = daemon.store.steps(rollback.id)
        assert step.ok is False
        assert step.summary.startswith("refused: ") and "not a safe version string" in step.summary
        assert "nothing was" in step.summary
    finally:
        daemon.close()
    assert {name: len(tool.records) for name, tool in tools(world, kind).items()} == calls_before
    assert not world.log(service).exists()
    if world.server is not None:
        assert world.server.requests == []
    if kind == "symlink":
        link = world.srv / service / "current"
        assert link.resolve() == (world.srv / service / "versions" / BAD).resolve()
    if kind == "git":
        assert git("show", f"{service}:{MANIFEST}", cwd=world.remote).endswith(f":{BAD}\n")
    assert_no_canary(world, before)


async def test_a_webhook_over_max_body_or_with_broken_unicode_stores_and_runs_nothing(
    world: World,
) -> None:
    variant = VARIANTS[0]
    daemon = make_daemon(world, "command", (variant,), max_body=64 * 1024)
    try:
        async with daemon.client() as client:
            huge = alert_json(variant, 1)
            huge["labels"]["huge"] = _huge(f"$(touch {CANARY}) ")
            over = await client.post("/api/v1/alertmanager", json=webhook(huge))
            assert over.status_code == 413
            surrogate = alert_json(variant, 2)
            body = json.dumps(webhook(surrogate)).replace("HostileShell", "Hostile\\ud800")
            broken = await client.post(
                "/api/v1/alertmanager",
                content=body.encode(),
                headers={"content-type": "application/json"},
            )
            assert broken.status_code == 422, broken.text
            await daemon.pipeline.wait_idle()
        assert daemon.store.alerts() == []
        assert daemon.store.rollbacks() == []
        assert executions(world.log(variant.service)) == []
    finally:
        daemon.close()


# -- versions from a real Prometheus, through `rollbackd run` --------------------------------

PROMETHEUS_VERSIONS = (
    f"$(touch {CANARY})",
    ESCAPE,
    f"{BAD}\n",
    f"{GOOD}; touch {CANARY}",
    "{to_version}",
)
LOG_LINE = re.compile(r"^(\x1b\[[0-9;]*m)*\d{4}-\d\d-\d\d[T ]\d\d:\d\d")


@pytest.mark.prometheus
def test_hostile_version_labels_from_prometheus_never_reach_an_executor(
    world: World,
    prometheus_factory: Callable[..., PrometheusServer],
    fake_service_factory: Callable[..., FakeService],
) -> None:
    checkout = fake_service_factory("checkout", GOOD)
    # Beside it, exporters whose build info names hostile versions the whole time.
    hostile = [fake_service_factory(f"h{n}", v) for n, v in enumerate(PROMETHEUS_VERSIONS)]

    def deploy(request: Recorded, _number: int) -> Reply:
        checkout.update(version=json.loads(request.body)["version"])
        return Reply(200, b"{}")

    world.server = RecordingServer(deploy)
    world.server.start()
    prometheus = prometheus_factory(targets=[ScrapeTarget(s.address) for s in (checkout, *hostile)])
    prometheus.wait_for(
        "count(app_build_info)",
        lambda r: bool(r) and float(r[0]["value"][1]) == 1 + len(hostile),
    )
    body = '{"version": "{to_version}", "from": "{from_version}", "reason": "{reason}"}'
    rules = f"""
[service]
name = "checkout"
version_query = 'max by (version) (app_build_info)'
bake_time = "1s"
rollback_window = "1h"

[[rollback]]
type = "http"
url = "{world.server.url}/deploy/{{service}}/{{to_version}}?reason={{reason}}"
headers = {{ "X-Reason" = "{{reason}}" }}
body = {json.dumps(body)}
timeout = "20s"

[verify]
window = "1s"
version_timeout = "20s"

[[check]]
name = "alive"
type = "query"
query = "vector(0)"
above = 1
interval = "1s"

[[alert]]
alertname = "HostileLines"
"""
    config = write_config(world.root / "daemon", prometheus.url, {"checkout": rules})
    before = tree(world.root)
    lines = next(v for v in VARIANTS if v.name == "lines")
    with DaemonProcess(config) as daemon, daemon.http() as api:
        daemon.await_rows(
            "SELECT 1 FROM versions WHERE service = 'checkout' AND version = ? "
            "AND baked_at IS NOT NULL",
            GOOD,
            what=f"{GOOD} to bake",
        )
        checkout.update(version=BAD)
        daemon.await_rows(
            "SELECT 1 FROM service_state WHERE service = 'checkout' AND current_version = ?",
            BAD,
            what=f"{BAD} to become current",
        )
        alert = alert_json(lines, 1)
        alert["labels"]["version"] = PROMETHEUS_VERSIONS[0]
        unmatched = alert_json(lines, 2)
        unmatched["labels"]["alertname"] = f"Other\n{CANARY}\r\n"
        answer = api.post(
            "/api/v1/alertmanager",
            json=webhook(alert, unmatched, receiver=f"rollbackd\n touch {CANARY}"),
        )
        assert answer.status_code == 200, answer.text
        [(state, from_version, to_version, reason)] = daemon.await_rows(
            "SELECT state, from_version, to_version, reason FROM rollbacks "
            "WHERE state IN ('succeeded', 'failed')",
            what="the rollback to end",
        )
        assert (state, from_version, to_version) == ("succeeded", BAD, GOOD)
        assert len(reason) <= REASON_LIMIT and NOT_IN_A_REASON.search(reason) is None
        versions = daemon.rows("SELECT version FROM versions WHERE service = 'checkout'")
        assert sorted(v for (v,) in versions) == [GOOD, BAD]
        changes = daemon.rows("SELECT from_version, to_version FROM version_changes")
        assert {v for change in changes for v in change} <= {None, GOOD, BAD}
        assert daemon.rows("SELECT count(*) FROM rollbacks") == [(1,)]
        log = daemon.log.read_text(errors="replace")
    [request] = world.server.requests
    assert request.path == f"/deploy/checkout/{GOOD}"
    assert request.param("reason") == reason
    assert json.loads(request.body) == {"version": GOOD, "from": BAD, "reason": reason}
    assert checkout.version == GOOD
    # Each rejected label is reported on one log line, and no outside text starts a line.
    assert "version label rejected" in log
    for line in log.split("\n"):
        if HEX in line or "touch" in line:
            assert LOG_LINE.match(line), f"a log line was broken: {line!r}"
    assert_no_canary(world, before)


def test_the_api_and_versions_py_refuse_the_same_versions() -> None:
    """The release API's model (api_models) and versions.py (Prometheus labels, and every
    executor's own check) must agree: one pattern, and every hostile version here fails it."""
    assert f"^{VERSION_PATTERN.pattern}$" == API_VERSION_PATTERN
    assert not any(is_valid_version(v) for v in (*HOSTILE_VERSIONS, *PROMETHEUS_VERSIONS))


async def test_a_hostile_version_beside_a_canary_never_names_the_stable_track(
    tmp_path: Path,
) -> None:
    """The stable track of a canary is named from what version_query answers; a label that
    is no valid version must not become it (it would reach check reasons, and {reason}),
    and a broken exporter's bad label is logged once, not every poll."""
    from structlog.testing import capture_logs

    from rollbackd.config.loader import load
    from rollbackd.prometheus import PrometheusClient
    from rollbackd.runtime.engine import Engine
    from rollbackd.store.sqlite import Store
    from support.hostile_http import success

    hostile = "1.0.0\n$(touch CANARY)"

    def prometheus(request: Recorded, _n: int) -> Reply:
        query = request.param("query") or parse_qs(request.body.decode()).get("query", [""])[0]
        if "app_build_info" in query:
            return success(
                [
                    {"metric": {"version": "2.0.0"}, "value": [1000, "1"]},
                    {"metric": {"version": hostile}, "value": [1000, "1"]},
                ]
            )
        return success([{"metric": {}, "value": [1000, "1"]}])  # the canary is active

    rules = """
[service]
name = "web"
version_query = 'max by (version) (app_build_info{service="web"})'
version_label = "version"
[canary]
active_query = 'vector(1)'
abort = [{ type = "command", argv = ["/bin/true"] }]
[[rollback]]
type = "command"
argv = ["/bin/true"]
[[check]]
name = "errors"
type = "error_rate"
errors = 'code="500"'
above = 0.1
"""
    with RecordingServer(prometheus) as server:
        loaded = load(write_config(tmp_path, server.url, {"web": rules}))
        store = Store(tmp_path / "state.db")
        engine = Engine(loaded, PrometheusClient(loaded.config.prometheus), store)
        try:
            service = loaded.services["web"]
            with capture_logs() as logs:
                for at in (1000.0, 1001.0, 1002.0):
                    await engine.observe_service(service, at)
            assert engine.canary_active("web")
            assert engine.versions.current("web") == "2.0.0"
            scope = await engine._scope(service, service.rules.check[0], 1003.0)
            assert scope.stable_version is None
            rejected = [e for e in logs if e["event"] == "version label rejected"]
            assert len(rejected) == 1 and "\n" not in rejected[0]["reason"]
        finally:
            store.close()
            engine.client.close()
