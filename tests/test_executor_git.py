"""The git (GitOps) executor against a real bare repository as the remote.

The runner's ``git`` is a recording wrapper around the real one (first on ``PATH``), so the
tests see the exact argv and can run another clone's push right before the runner's own.
The tests' own git commands use the real git with the machine's configuration shut out.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from rollbackd.executors.base import RollbackContext
from rollbackd.executors.git import GitExecutor, GitRun
from support.real_git import REAL_GIT, git
from support.recording_tools import RecordingTool, RecordingToolFactory, recording_tool

__all__ = ["recording_tool"]  # the fixture, imported for pytest

pytestmark = pytest.mark.skipif(REAL_GIT is None, reason="git is not installed")

MANIFEST = "deploy/checkout.yaml"
MATCH = r"image: registry\.example/checkout:(\S+)"
PREFIX = [
    *("-c", "core.hooksPath=/dev/null", "-c", "commit.gpgsign=false"),
    *("-c", "core.fsmonitor=false", "-c", "user.name=rollbackd"),
    *("-c", "user.email=rollbackd@localhost"),
]
ROLLBACK = RollbackContext(
    service="checkout",
    from_version="2.0.0",
    to_version="1.0.0",
    reason="error-rate 31% > 5% for 1m",
    rollback_id="rb-20261128-0001",
)


def manifest(version: str, replicas: int = 3) -> str:
    return (
        "apiVersion: apps/v1\n"
        "kind: Deployment\n"
        "spec:\n"
        f"  replicas: {replicas}\n"
        "  template:\n"
        "    spec:\n"
        "      containers:\n"
        "        - name: app\n"
        f"          image: registry.example/checkout:{version}\n"
    )


class Remote:
    """A bare repository (the remote) and a developer's clone of it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True)
        self.bare = root / "remote.git"
        self.url = self.bare.as_uri()  # file://, so the clone is shallow as in production
        git("init", "--quiet", "--bare", "--initial-branch=main", str(self.bare), cwd=root)
        self.work = self.clone("developer")

    def clone(self, name: str) -> Path:
        target = self.root / name
        git("clone", "--quiet", self.url, str(target), cwd=self.root)
        git("checkout", "--quiet", "-B", "main", cwd=target)
        return target

    def commit(self, files: dict[str, str], message: str, clone: Path | None = None) -> str:
        """Commit ``files`` in ``clone`` (the developer's by default) and push them."""
        work = clone or self.work
        for name, text in files.items():
            path = work / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        git("add", "--all", cwd=work)
        git("commit", "--quiet", "-m", message, cwd=work)
        git("push", "--quiet", "origin", "HEAD:main", cwd=work)
        return self.head()

    def head(self, branch: str = "main") -> str:
        return git("rev-parse", branch, cwd=self.bare).strip()

    def show(self, rev: str, path: str = MANIFEST) -> str:
        return git("show", f"{rev}:{path}", cwd=self.bare)

    def message(self, rev: str = "main") -> str:
        return git("log", "-1", "--format=%B", rev, cwd=self.bare)

    def field(self, fmt: str, rev: str = "main") -> str:
        return git("log", "-1", f"--format={fmt}", rev, cwd=self.bare).strip()

    def hook(self, name: str, script: str) -> None:
        path = self.bare / "hooks" / name
        path.write_text(script)
        path.chmod(0o755)


@pytest.fixture
def remote(tmp_path: Path) -> Remote:
    """Released 1.0.0, something unrelated, released 2.0.0, then scaled up (same file)."""
    repo = Remote(tmp_path / "git")
    repo.commit({MANIFEST: manifest("1.0.0"), "README.md": "deploy repo\n"}, "checkout 1.0.0")
    repo.commit({"deploy/other.yaml": "image: registry.example/other:7.1.0\n"}, "other 7.1.0")
    repo.commit({MANIFEST: manifest("2.0.0")}, "release checkout 2.0.0")
    repo.commit({MANIFEST: manifest("2.0.0", replicas=5)}, "scale checkout to 5")
    return repo


@pytest.fixture
def git_tool(recording_tool: RecordingToolFactory) -> RecordingTool:
    return recording_tool("git", pass_through=True)


def spec(remote: Remote, **fields: Any) -> GitExecutor:
    values: dict[str, Any] = {
        "type": "git",
        "repository": remote.url,
        "file": MANIFEST,
        "match": MATCH,
    }
    values.update(fields)
    return GitExecutor.model_validate(values)


def subcommands(tool: RecordingTool) -> list[str]:
    return [argv[len(PREFIX)] for argv in tool.calls]


def clone_dir(tool: RecordingTool) -> Path:
    clone = tool.calls[0]
    assert clone[len(PREFIX)] == "clone"
    return Path(clone[-1])


# --- write ------------------------------------------------------------------------------


async def test_write_commits_and_pushes_the_version(
    remote: Remote, git_tool: RecordingTool
) -> None:
    before = remote.head()
    result = await spec(remote).runner().run(ROLLBACK)
    assert result.ok, result.summary

    head = remote.head()
    assert head != before
    assert remote.field("%P") == before
    assert remote.show("main") == manifest("1.0.0", replicas=5)
    message = remote.message()
    assert "rb-20261128-0001" in message
    assert "error-rate 31% > 5% for 1m" in message
    assert message.startswith("rollback checkout 2.0.0 -> 1.0.0 (rb-20261128-0001)")
    assert remote.field("%an <%ae>|%cn <%ce>") == (
        "rollbackd <rollbackd@localhost>|rollbackd <rollbackd@localhost>"
    )
    assert result.summary == (
        f"git write: {MANIFEST} 2.0.0 -> 1.0.0 (1 match), pushed {head[:12]} to main"
    )


async def test_write_exact_argv(remote: Remote, git_tool: RecordingTool) -> None:
    result = await spec(remote).runner().run(ROLLBACK)
    assert result.ok, result.summary
    clone = clone_dir(git_tool)
    message = "rollback checkout 2.0.0 -> 1.0.0 (rb-20261128-0001): error-rate 31% > 5% for 1m"
    assert git_tool.calls == [
        [*PREFIX, "clone", "--depth", "50", "--branch", "main", "--", remote.url, str(clone)],
        [*PREFIX, "add", "--", MANIFEST],
        [*PREFIX, "commit", "-m", message],
        [*PREFIX, "push", "origin", "HEAD:refs/heads/main"],
        [*PREFIX, "rev-parse", "HEAD"],
    ]
    assert [call.cwd for call in git_tool.records[1:]] == [str(clone)] * 4
    # The audit record: every argv, in order.
    flat: list[str] = []
    for argv in git_tool.calls:
        flat += [*(["&&"] if flat else []), "git", *argv]
    assert result.command == tuple(flat)


async def test_write_cleans_up_its_clone(remote: Remote, git_tool: RecordingTool) -> None:
    await spec(remote).runner().run(ROLLBACK)
    workdir = clone_dir(git_tool).parent
    assert workdir.name.startswith("rollbackd-git-")
    assert not workdir.exists()


async def test_write_environment(
    remote: Remote, git_tool: RecordingTool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROLLBACKD_API_TOKEN", "secret")
    monkeypatch.setenv("GIT_SSH_COMMAND", "ssh -i /etc/rollbackd/deploy_key")
    custom = spec(remote, author_name="Rollback Bot", author_email="bot@example.com")
    assert (await custom.runner().run(ROLLBACK)).ok
    env = git_tool.records[-1].env
    assert env["GIT_TERMINAL_PROMPT"] == "0"
    assert env["LC_ALL"] == "C"
    assert env["GIT_SSH_COMMAND"] == "ssh -i /etc/rollbackd/deploy_key"
    assert "ROLLBACKD_API_TOKEN" not in env
    assert env["GIT_AUTHOR_NAME"] == env["GIT_COMMITTER_NAME"] == "Rollback Bot"
    assert env["GIT_AUTHOR_EMAIL"] == env["GIT_COMMITTER_EMAIL"] == "bot@example.com"
    assert remote.field("%an <%ae>|%cn <%ce>") == (
        "Rollback Bot <bot@example.com>|Rollback Bot <bot@example.com>"
    )


async def test_write_every_match_and_keep_line_endings(
    remote: Remote, git_tool: RecordingTool
) -> None:
    text = (
        "image: registry.example/checkout:2.0.0\r\n"
        "sidecar: registry.example/envoy:1.30\r\n"
        "image: registry.example/checkout:1.9.9\r\n"
    )
    remote.commit({"deploy/two.yaml": text}, "two containers")
    result = await spec(remote, file="deploy/two.yaml").runner().run(ROLLBACK)
    assert result.ok, result.summary
    assert "2.0.0, 1.9.9 -> 1.0.0 (2 matches)" in result.summary
    assert REAL_GIT is not None
    stored = subprocess.run(
        [REAL_GIT, "cat-file", "blob", "main:deploy/two.yaml"],
        cwd=remote.bare,
        check=True,
        capture_output=True,
    ).stdout
    assert stored == text.replace("2.0.0", "1.0.0").replace("1.9.9", "1.0.0").encode()


async def test_write_already_at_the_version_commits_nothing(
    remote: Remote, git_tool: RecordingTool
) -> None:
    before = remote.head()
    context = RollbackContext(
        service="checkout", from_version="3.0.0", to_version="2.0.0", reason="r", rollback_id="x"
    )
    result = await spec(remote).runner().run(context)
    assert result.ok, result.summary
    assert result.summary == f"git write: {MANIFEST} on main already at 2.0.0; nothing to commit"
    assert remote.head() == before
    assert subcommands(git_tool) == ["clone"]


async def test_write_nothing_matched_fails_without_pushing(
    remote: Remote, git_tool: RecordingTool
) -> None:
    before = remote.head()
    result = await spec(remote, match=r"image: elsewhere/checkout:(\S+)").runner().run(ROLLBACK)
    assert not result.ok
    assert result.summary == (
        f"git write on main: nothing in {MANIFEST} matches 'image: elsewhere/checkout:(\\\\S+)'; "
        "nothing was changed"
    )
    assert remote.head() == before
    assert subcommands(git_tool) == ["clone"]


async def test_write_missing_file_fails(remote: Remote, git_tool: RecordingTool) -> None:
    result = await spec(remote, file="deploy/missing.yaml").runner().run(ROLLBACK)
    assert not result.ok
    assert result.summary == "git write on main: deploy/missing.yaml: no such file on main"


async def test_write_rebases_once_onto_a_remote_that_moved(
    remote: Remote, git_tool: RecordingTool
) -> None:
    # Another clone commits now and pushes right before the runner's first push.
    other = remote.clone("colleague")
    (other / "README.md").write_text("deploy repo, now with docs\n")
    git("commit", "--quiet", "-am", "docs", cwd=other)
    theirs = git("rev-parse", "HEAD", cwd=other).strip()
    assert REAL_GIT is not None
    git_tool.before_next("push", [REAL_GIT, "-C", str(other), "push", "--quiet", "origin", "main"])

    result = await spec(remote).runner().run(ROLLBACK)
    assert result.ok, result.summary
    assert result.summary.endswith("to main after rebasing onto the moved main")
    assert subcommands(git_tool) == [
        *("clone", "add", "commit", "push", "fetch", "rebase", "push", "rev-parse"),
    ]
    assert git_tool.calls[4][len(PREFIX) :] == ["fetch", "origin", "main"]
    assert git_tool.calls[5][len(PREFIX) :] == ["rebase", "FETCH_HEAD"]
    # Both changes are on the remote: theirs, then the rollback on top.
    assert remote.field("%P") == theirs
    assert remote.show("main") == manifest("1.0.0", replicas=5)
    assert remote.show("main", "README.md") == "deploy repo, now with docs\n"
    assert "rb-20261128-0001" in remote.message()


async def test_write_conflicting_move_fails(remote: Remote, git_tool: RecordingTool) -> None:
    # Meanwhile somebody released 2.0.1: the rollback must not silently overwrite it.
    other = remote.clone("colleague")
    (other / MANIFEST).write_text(manifest("2.0.1", replicas=5))
    git("commit", "--quiet", "-am", "release 2.0.1", cwd=other)
    theirs = git("rev-parse", "HEAD", cwd=other).strip()
    assert REAL_GIT is not None
    git_tool.before_next("push", [REAL_GIT, "-C", str(other), "push", "--quiet", "origin", "main"])

    result = await spec(remote).runner().run(ROLLBACK)
    assert not result.ok
    assert result.summary.startswith("git write on main: git rebase onto the moved main: exit 1")
    assert subcommands(git_tool) == ["clone", "add", "commit", "push", "fetch", "rebase"]
    assert remote.head() == theirs


async def test_write_push_rejected_by_the_remote_fails_without_retry(
    remote: Remote, git_tool: RecordingTool
) -> None:
    before = remote.head()
    remote.hook("pre-receive", "#!/bin/sh\necho 'main is frozen' >&2\nexit 1\n")
    result = await spec(remote).runner().run(ROLLBACK)
    assert not result.ok
    assert result.summary == (
        "git write on main: git push: exit 1: "
        "! [remote rejected] HEAD -> main (pre-receive hook declined)"
    )
    assert "main is frozen" in result.stderr_tail
    assert "pre-receive hook declined" in result.stderr_tail
    assert subcommands(git_tool) == ["clone", "add", "commit", "push"]
    assert remote.head() == before


async def test_write_second_rejection_fails(remote: Remote, git_tool: RecordingTool) -> None:
    # The branch moves before each of the runner's pushes.
    other = remote.clone("colleague")
    assert REAL_GIT is not None
    pushes = []
    for number in (1, 2):
        (other / "README.md").write_text(f"change {number}\n")
        git("commit", "--quiet", "-am", f"change {number}", cwd=other)
        sha = git("rev-parse", "HEAD", cwd=other).strip()
        pushes.append([REAL_GIT, "-C", str(other), "push", "--quiet", "origin", f"{sha}:main"])
    git_tool.before_next("push", pushes[0])
    git_tool.before_next("push", pushes[1])

    result = await spec(remote).runner().run(ROLLBACK)
    assert not result.ok
    assert result.summary == (
        "git write on main: git push (after rebase): exit 1: "
        "! [rejected]        HEAD -> main (fetch first)"
    )
    assert subcommands(git_tool).count("push") == 2
    assert remote.show("main", "README.md") == "change 2\n"


async def test_symlink_escaping_the_repository_is_refused(
    remote: Remote, git_tool: RecordingTool, tmp_path: Path
) -> None:
    outside = tmp_path / "outside.yaml"
    outside.write_text(manifest("2.0.0"))
    link = remote.work / "deploy" / "escape.yaml"
    link.symlink_to(outside)
    remote.commit({}, "a link out")
    before = remote.head()

    result = await spec(remote, file="deploy/escape.yaml").runner().run(ROLLBACK)
    assert not result.ok
    assert result.summary == (
        "git write on main: deploy/escape.yaml resolves outside the repository; refused"
    )
    assert outside.read_text() == manifest("2.0.0")
    assert remote.head() == before
    assert subcommands(git_tool) == ["clone"]


async def test_a_file_inside_git_metadata_is_refused(
    remote: Remote, git_tool: RecordingTool
) -> None:
    result = await spec(remote, file=".git/config", match=r"url = (\S+)").runner().run(ROLLBACK)
    assert not result.ok
    assert result.summary == "git write on main: .git/config is inside .git; refused"


@pytest.mark.parametrize("path", ["../outside.yaml", "/etc/passwd", "deploy/../../x"])
def test_spec_refuses_paths_out_of_the_repository(remote: Remote, path: str) -> None:
    with pytest.raises(ValidationError, match="must be a path inside the repository"):
        spec(remote, file=path)


async def test_no_hook_signing_or_identity_of_the_machine_applies(
    remote: Remote, git_tool: RecordingTool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    hooks = tmp_path / "machine-hooks"
    (tmp_path / "template" / "hooks").mkdir(parents=True)
    hooks.mkdir()
    client_hooks = (
        *("pre-commit", "prepare-commit-msg", "commit-msg", "post-commit", "post-checkout"),
        *("pre-push", "post-merge", "pre-rebase", "post-rewrite", "pre-auto-gc"),
    )
    for directory in (hooks, tmp_path / "template" / "hooks"):
        for name in client_hooks:
            hook = directory / name
            hook.write_text(f"#!/bin/sh\ntouch {markers}/{name}\nexit 1\n")
            hook.chmod(0o755)
    signer = tmp_path / "gpg"
    signer.write_text(f"#!/bin/sh\ntouch {markers}/gpg\nexit 1\n")
    signer.chmod(0o755)
    home = tmp_path / "home"
    home.mkdir()
    (home / ".gitconfig").write_text(
        "[user]\n\tname = Machine Person\n\temail = machine@example.com\n"
        f"[core]\n\thooksPath = {hooks}\n"
        f"[init]\n\ttemplateDir = {tmp_path / 'template'}\n"
        f"[commit]\n\tgpgsign = true\n[gpg]\n\tprogram = {signer}\n"
    )
    monkeypatch.setenv("HOME", str(home))

    for executor, context in (
        (spec(remote), ROLLBACK),
        (
            spec(remote, action="revert"),
            RollbackContext(
                service="checkout",
                from_version="1.0.0",
                to_version="2.0.0",
                reason="roll forward",
                rollback_id="rb-2",
            ),
        ),
    ):
        result = await executor.runner().run(context)
        assert result.ok, result.summary
        assert remote.field("%an|%cn") == "rollbackd|rollbackd"
    assert sorted(path.name for path in markers.iterdir()) == []


# --- revert -----------------------------------------------------------------------------


async def test_revert_reverts_the_release_commit_on_the_remote(
    remote: Remote, git_tool: RecordingTool
) -> None:
    release = git("rev-parse", "main~1", cwd=remote.bare).strip()
    before = remote.head()
    result = await spec(remote, action="revert").runner().run(ROLLBACK)
    assert result.ok, result.summary

    head = remote.head()
    assert remote.field("%P") == before
    # Only the release is undone: the later scale-up stays.
    assert remote.show("main") == manifest("1.0.0", replicas=5)
    message = remote.message()
    assert message.startswith(
        "rollback checkout 2.0.0 -> 1.0.0 (rb-20261128-0001): error-rate 31% > 5% for 1m\n\n"
    )
    assert f"This reverts commit {release}." in message
    assert result.summary == (
        f"git revert: reverted {release[:12]} (it introduced 2.0.0 in {MANIFEST} on main), "
        f"pushed {head[:12]} to main"
    )
    assert subcommands(git_tool) == [
        *("clone", "grep", "log", "revert", "commit", "push", "rev-parse"),
    ]
    clone = clone_dir(git_tool)
    assert git_tool.calls[1:5] == [
        [*PREFIX, "grep", "-l", "-z", "-F", "-e", "2.0.0", "--", MANIFEST],
        [
            *PREFIX,
            *("log", "--no-merges", "-S", "2.0.0", "--format=%x00%H %P", "-p", "--unified=0"),
            *("--no-ext-diff", "--no-textconv", "--no-color", "--no-show-signature"),
            f"--output={clone.parent / 'history.patch'}",
            *("HEAD", "--", MANIFEST),
        ],
        [*PREFIX, "revert", "--no-edit", release],
        [
            *PREFIX,
            *("commit", "--amend", "-m"),
            "rollback checkout 2.0.0 -> 1.0.0 (rb-20261128-0001): error-rate 31% > 5% for 1m"
            f"\n\nThis reverts commit {release}.",
        ],
    ]
    assert not clone.parent.exists()


async def test_revert_without_file_searches_the_whole_branch(
    remote: Remote, git_tool: RecordingTool
) -> None:
    release = git("rev-parse", "main~1", cwd=remote.bare).strip()
    result = await spec(remote, action="revert", file=None, match=None).runner().run(ROLLBACK)
    assert result.ok, result.summary
    assert f"reverted {release[:12]} (it introduced 2.0.0 in main)" in result.summary
    assert remote.show("main") == manifest("1.0.0", replicas=5)


async def test_revert_picks_the_latest_release_not_a_rollback_that_names_it(
    remote: Remote, git_tool: RecordingTool
) -> None:
    # 2.0.0 was rolled back once (a commit whose message and diff name it) and released again.
    remote.commit({MANIFEST: manifest("1.0.0", replicas=5)}, "rollback checkout 2.0.0 -> 1.0.0")
    again = remote.commit({MANIFEST: manifest("2.0.0", replicas=5)}, "release checkout 2.0.0 again")
    remote.commit({"README.md": "mentions 2.0.0 in passing\n"}, "notes on 2.0.0")
    result = await spec(remote, action="revert").runner().run(ROLLBACK)
    assert result.ok, result.summary
    assert f"reverted {again[:12]}" in result.summary
    assert remote.show("main") == manifest("1.0.0", replicas=5)


async def test_revert_when_already_reverted_does_nothing(
    remote: Remote, git_tool: RecordingTool
) -> None:
    remote.commit({MANIFEST: manifest("1.0.0", replicas=5)}, "rolled back by hand")
    before = remote.head()
    result = await spec(remote, action="revert").runner().run(ROLLBACK)
    assert result.ok, result.summary
    assert result.summary == (
        f"git revert: 2.0.0 is no longer named in {MANIFEST} on main; nothing to revert"
    )
    assert remote.head() == before
    assert subcommands(git_tool) == ["clone", "grep"]


async def test_revert_a_longer_version_does_not_count(
    remote: Remote, git_tool: RecordingTool
) -> None:
    # "12.0.0" contains "2.0.0" but is another version: 2.0.0 is no longer named.
    remote.commit({MANIFEST: manifest("12.0.0", replicas=5)}, "release 12.0.0")
    before = remote.head()
    result = await spec(remote, action="revert").runner().run(ROLLBACK)
    assert result.ok, result.summary
    assert "nothing to revert" in result.summary
    assert remote.head() == before


async def test_revert_never_reverts_the_first_commit(
    tmp_path: Path, git_tool: RecordingTool
) -> None:
    # 1.0.0 came with the repository's first commit: reverting that would delete everything.
    repo = Remote(tmp_path / "root-only")
    repo.commit({MANIFEST: manifest("1.0.0")}, "checkout 1.0.0")
    repo.commit({"README.md": "x\n"}, "readme")
    before = repo.head()
    context = RollbackContext(
        service="checkout", from_version="1.0.0", to_version="0.9.0", reason="r", rollback_id="x"
    )
    result = await spec(repo, action="revert").runner().run(context)
    assert not result.ok
    assert result.summary == (
        f"git revert on main: no commit among the last 50 of {MANIFEST} on main adds 1.0.0; "
        "nothing was reverted"
    )
    assert repo.head() == before


async def test_revert_conflict_fails(remote: Remote, git_tool: RecordingTool) -> None:
    # The line the release changed was changed again since: the revert cannot apply.
    pinned = manifest("2.0.0", replicas=5).replace(":2.0.0", ":2.0.0  # pinned")
    remote.commit({MANIFEST: pinned}, "pin")
    before = remote.head()
    result = await spec(remote, action="revert").runner().run(ROLLBACK)
    assert not result.ok
    assert result.summary.startswith("git revert on main: git revert ")
    assert ": exit 1: " in result.summary
    assert remote.head() == before
    assert "push" not in subcommands(git_tool)


# --- everything else --------------------------------------------------------------------


@pytest.mark.parametrize("action", ["write", "revert"])
@pytest.mark.parametrize(
    "versions",
    [
        {"from_version": "2.0.0", "to_version": "1.0.0; rm -rf ~"},
        {"from_version": "--upload-pack=touch /tmp/pwned", "to_version": "1.0.0"},
        {"from_version": "2.0.0", "to_version": "../1.0.0"},
    ],
)
async def test_unsafe_versions_run_nothing(
    remote: Remote, git_tool: RecordingTool, action: str, versions: dict[str, str]
) -> None:
    context = RollbackContext(
        service="checkout",
        from_version=versions["from_version"],
        to_version=versions["to_version"],
        reason="r",
        rollback_id="x",
    )
    result = await spec(remote, action=action).runner().run(context)
    assert not result.ok
    assert result.summary.startswith("refused:")
    assert git_tool.calls == []


async def test_write_needs_a_target_and_revert_a_source(
    remote: Remote, git_tool: RecordingTool
) -> None:
    no_target = RollbackContext(
        service="checkout", from_version="2.0.0", to_version=None, reason="r", rollback_id="x"
    )
    no_source = RollbackContext(
        service="checkout", from_version=None, to_version="1.0.0", reason="r", rollback_id="x"
    )
    assert not (await spec(remote).runner().run(no_target)).ok
    assert not (await spec(remote, action="revert").runner().run(no_source)).ok
    assert git_tool.calls == []
    assert spec(remote).needs_target()
    assert not spec(remote, action="revert").needs_target()


async def test_clone_failure_is_reported(remote: Remote, git_tool: RecordingTool) -> None:
    result = await spec(remote, branch="no-such-branch").runner().run(ROLLBACK)
    assert not result.ok
    assert result.summary.startswith(
        f"git write on no-such-branch: git clone {remote.url}: exit 128: "
    )
    assert "no-such-branch" in result.stderr_tail
    assert subcommands(git_tool) == ["clone"]


async def test_credentials_in_the_repository_url_are_not_reported(
    git_tool: RecordingTool,
) -> None:
    # Port 9 on localhost: refused at once, so git fails after echoing the URL.
    executor = GitExecutor.model_validate(
        {
            "type": "git",
            "repository": "https://deploy:s3cr3t-token@127.0.0.1:9/ops/deploy.git",
            "file": MANIFEST,
            "match": MATCH,
        }
    )
    result = await executor.runner().run(ROLLBACK)
    assert not result.ok
    report = " ".join([result.summary, result.stdout_tail, result.stderr_tail, *result.command])
    assert "s3cr3t-token" not in report
    assert "https://***@127.0.0.1:9/ops/deploy.git" in result.command


def test_runner() -> None:
    executor = GitExecutor.model_validate(
        {"type": "git", "repository": "/srv/deploy.git", "action": "revert"}
    )
    run = executor.runner()
    assert isinstance(run, GitRun)
    assert run.describe() == "git revert /srv/deploy.git"
