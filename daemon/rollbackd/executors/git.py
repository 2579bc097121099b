"""``git``: GitOps. Write ``to_version`` into the manifest that names the version (or
revert the release commit), commit with the rollback id and reason, and push, so the
desired state agrees with what runs and the GitOps controller does not undo the rollback."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Literal, Self
from urllib.parse import urlsplit

from pydantic import Field, model_validator

from rollbackd.executors.base import Executor, ExecutorSpec, RollbackContext, StepResult
from rollbackd.executors.placeholders import substitute
from rollbackd.executors.process import DEFAULT_TAIL_BYTES, ProcessResult, base_environment
from rollbackd.executors.steps import (
    Explain,
    ProgramSteps,
    gist,
    refuse_unsafe,
    shorten,
)


class GitExecutor(ExecutorSpec):
    type: Literal["git"]
    repository: str = Field(min_length=1, description="URL or path of the deployment repository")
    branch: str = "main"
    action: Literal["write", "revert"] = "write"
    file: str | None = Field(default=None, description="the manifest, relative to the repository")
    match: str | None = Field(
        default=None,
        description="a regular expression with one group around the version, "
        r"'image: registry/checkout:(\S+)'",
    )
    author_name: str = "rollbackd"
    author_email: str = "rollbackd@localhost"
    message: str = "rollback {service} {from_version} -> {to_version} ({rollback_id}): {reason}"

    @model_validator(mode="after")
    def _write_needs_file_and_match(self) -> Self:
        if self.action == "write":
            if not (self.file and self.match):
                raise ValueError("action 'write' needs 'file' and 'match'")
            try:
                pattern = re.compile(self.match)
            except re.error as exc:
                raise ValueError(f"'match' is not a regular expression: {exc}") from None
            if pattern.groups != 1:
                raise ValueError(
                    f"'match' must have exactly one group around the version, has {pattern.groups}"
                )
        if self.file and (self.file.startswith("/") or ".." in self.file.split("/")):
            raise ValueError("'file' must be a path inside the repository")
        return self

    def templates(self) -> list[str]:
        return [self.message]

    def needs_target(self) -> bool:
        return self.action == "write"

    def runner(self) -> GitRun:
        return GitRun(self)


CLONE_DEPTH = 50
"""How much history the clone has: the release commit a ``revert`` looks for must be among
the branch's last CLONE_DEPTH commits."""

GIT_CONFIG = (
    # Hooks are code from wherever the clone's configuration points; a rollback must not run
    # them (nor stop because a pre-commit linter dislikes the change).
    "-c",
    "core.hooksPath=/dev/null",
    # A signing key is not something the daemon has; signing would prompt or fail.
    "-c",
    "commit.gpgsign=false",
    # Like a hook, a program the configuration names and git runs.
    "-c",
    "core.fsmonitor=false",
)
"""Options before every ``git`` subcommand, whatever the machine's git configuration says."""

GIT_ENVIRONMENT_KEYS = (
    "SSH_AUTH_SOCK",
    "GIT_SSH",
    "GIT_SSH_COMMAND",
    "GIT_SSL_CAINFO",
    "GIT_SSL_CAPATH",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "NO_PROXY",
    "no_proxy",
)
"""The daemon's variables ``git`` gets on top of ``PATH``, ``HOME`` and ``LANG``: how to reach
and authenticate to the remote. ``HOME`` stays, so ``~/.ssh`` and the credential helpers of
``~/.gitconfig`` work; identity, hooks and signing are overridden by :data:`GIT_CONFIG`."""

_PUSH_RACE_MARKERS = (
    "[rejected]",  # "(fetch first)", "(non-fast-forward)": the branch moved since the clone
    "failed to update ref",  # the remote lost a race with another push
    "cannot lock ref",
)


# A version counts only where it is not part of a longer one: "2.0.0" is not named by
# "12.0.0", "v2.0.0", "2.0.0-rc1" or "2.0.0.1", but is by "checkout:2.0.0", "checkout-2.0.0"
# and "2.0.0.".
def _version_pattern(version: str) -> re.Pattern[str]:
    return re.compile(rf"(?<![A-Za-z0-9_.]){re.escape(version)}(?!\.?[A-Za-z0-9_+\-])")


def _redactor(repository: str) -> Callable[[str], str]:
    """Hides the user and password of an ``https://user:token@host/...`` repository in
    whatever is reported: the audit record must not hold the token."""
    parts = urlsplit(repository)
    userinfo = parts.netloc.rpartition("@")[0] if parts.scheme in ("http", "https") else ""
    if not userinfo:
        return lambda text: text
    secret = f"//{userinfo}@"
    return lambda text: text.replace(secret, "//***@")


def _pushed_into_a_race(result: ProcessResult) -> bool:
    return any(marker in result.stderr_tail for marker in _PUSH_RACE_MARKERS)


def _push_gist(result: ProcessResult) -> str:
    """Git's status line of the refused ref (`` ! [rejected] HEAD -> main (fetch first)``):
    the lines after it only say that something failed."""
    refused = [line.strip() for line in result.stderr_tail.splitlines() if line.startswith(" ! ")]
    return shorten(refused[-1]) if refused else gist(result)


class _Refused(Exception):
    """The step cannot go on, for the reason given; nothing was pushed."""


class GitRun(Executor[GitExecutor]):
    """GitOps: change the deployment repository so that it names the version rolled back to.

    In a fresh temporary clone (``git clone --depth 50 --branch BRANCH -- REPOSITORY DIR``,
    removed afterwards):

    * ``write``: in ``file`` (which must resolve to a file inside the clone, symlinks
      followed), replace the first group of every match of ``match`` (``re.MULTILINE``) with
      ``to_version``, ``git add``, ``git commit -m MESSAGE``. A file that already names only
      ``to_version`` there is success without a commit ("already at ..."); no match is a
      failure.
    * ``revert``: if ``from_version`` is no longer named (in ``file``, else anywhere in the
      branch), succeed without a commit. Otherwise revert the most recent commit (merges and
      the clone's oldest commit excluded) whose diff adds ``from_version`` more often than it
      removes it: candidates from ``git log -S FROM_VERSION`` (pickaxe: commits that change how
      often the text occurs), judged by their patch, where the version counts only where it is
      not part of a longer one. Commit messages are not searched: the commit of an earlier
      rollback names the version too. ``git revert --no-edit``, then
      ``git commit --amend -m MESSAGE`` with "This reverts commit SHA." appended.

    Then ``git push origin HEAD:refs/heads/BRANCH``. If the push is rejected because the branch
    moved meanwhile, ``git fetch origin BRANCH`` and ``git rebase FETCH_HEAD`` once and push
    again once; a conflict or a second rejection is a failure.

    Every git command gets :data:`GIT_CONFIG` and ``-c user.name/user.email`` from the spec,
    and an environment with ``GIT_TERMINAL_PROMPT=0``, ``LC_ALL=C`` (so rejections can be
    recognised), ``GIT_AUTHOR_*``/``GIT_COMMITTER_*`` from the spec and
    :data:`GIT_ENVIRONMENT_KEYS`. MESSAGE is the spec's ``message`` with placeholders
    substituted (the rollback id and reason, typically).
    """

    def describe(self) -> str:
        return f"git {self.spec.action} {self.spec.file or self.spec.repository}"

    def environment(self) -> dict[str, str]:
        env = base_environment()
        for key in GIT_ENVIRONMENT_KEYS:
            value = os.environ.get(key)
            if value is not None:
                env[key] = value
        env.update(
            {
                "LC_ALL": "C",
                "GIT_TERMINAL_PROMPT": "0",
                "GIT_AUTHOR_NAME": self.spec.author_name,
                "GIT_AUTHOR_EMAIL": self.spec.author_email,
                "GIT_COMMITTER_NAME": self.spec.author_name,
                "GIT_COMMITTER_EMAIL": self.spec.author_email,
            }
        )
        return env

    def git(self, *args: str) -> list[str]:
        spec = self.spec
        return [
            "git",
            *GIT_CONFIG,
            "-c",
            f"user.name={spec.author_name}",
            "-c",
            f"user.email={spec.author_email}",
            *args,
        ]

    async def run(self, context: RollbackContext) -> StepResult:
        refused = refuse_unsafe(context)
        if refused:
            return refused
        spec = self.spec
        if spec.action == "write" and not context.to_version:
            return StepResult(
                ok=False, summary="git write: no target version (to_version is unknown)"
            )
        if spec.action == "revert" and not context.from_version:
            return StepResult(
                ok=False,
                summary="git revert: the version to revert (from_version) is unknown",
            )
        steps = ProgramSteps(
            spec.timeout.total_seconds(),
            self.environment(),
            redact=_redactor(spec.repository),
        )
        try:
            workdir = Path(tempfile.mkdtemp(prefix="rollbackd-git-"))
        except OSError as exc:
            return StepResult(ok=False, summary=f"git {spec.action}: no temporary clone: {exc}")
        try:
            return await self._run_in(workdir, steps, context)
        except _Refused as exc:
            return steps.failure(f"git {spec.action} on {spec.branch}: {exc}")
        finally:
            # Shielded: even a second cancellation must not leave the clone behind.
            await asyncio.shield(asyncio.to_thread(shutil.rmtree, workdir, True))

    async def _run_in(
        self, workdir: Path, steps: ProgramSteps, context: RollbackContext
    ) -> StepResult:
        spec = self.spec
        repo = workdir / "repo"
        clone = await steps.run(
            self.git(
                "clone",
                "--depth",
                str(CLONE_DEPTH),
                "--branch",
                spec.branch,
                "--",
                spec.repository,
                str(repo),
            ),
            label=f"git clone {spec.repository}",
        )
        if not clone.ok:
            raise _Refused(steps.last_failure())
        if spec.action == "write":
            assert context.to_version is not None
            return await self._write(repo, steps, context, context.to_version)
        assert context.from_version is not None
        return await self._revert(workdir, repo, steps, context, context.from_version)

    def _file(self, repo: Path) -> tuple[Path, str]:
        """The spec's file, resolved, and its path relative to the clone."""
        assert self.spec.file is not None
        root = repo.resolve()
        target = (root / self.spec.file).resolve()
        # The spec refuses "/" and "..", but a symlink in the repository may still point out.
        if not target.is_relative_to(root) or target == root:
            raise _Refused(f"{self.spec.file} resolves outside the repository; refused")
        relative = target.relative_to(root)
        if relative.parts[0] == ".git":
            raise _Refused(f"{self.spec.file} is inside .git; refused")
        if not target.is_file():
            raise _Refused(f"{self.spec.file}: no such file on {self.spec.branch}")
        return target, relative.as_posix()

    async def _checked(
        self,
        steps: ProgramSteps,
        argv: list[str],
        label: str,
        cwd: Path,
        explain: Explain = gist,
    ) -> str:
        result = await steps.run(argv, label=label, cwd=str(cwd), explain=explain)
        if not result.ok:
            raise _Refused(steps.last_failure())
        return result.stdout_tail

    async def _write(
        self, repo: Path, steps: ProgramSteps, context: RollbackContext, version: str
    ) -> StepResult:
        spec = self.spec
        assert spec.match is not None
        target, relative = self._file(repo)
        try:
            text = target.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise _Refused(f"cannot read {relative}: {exc}") from None
        spans = [
            match.span(1)
            for match in re.finditer(spec.match, text, re.MULTILINE)
            if match.start(1) != -1
        ]
        if not spans:
            raise _Refused(f"nothing in {relative} matches {spec.match!r}; nothing was changed")
        previous = list(
            dict.fromkeys(text[start:end] for start, end in spans if text[start:end] != version)
        )
        if not previous:
            return steps.result(
                ok=True,
                summary=f"git write: {relative} on {spec.branch} already at {version}; "
                "nothing to commit",
            )
        pieces: list[str] = []
        position = 0
        for start, end in spans:
            pieces += [text[position:start], version]
            position = end
        pieces.append(text[position:])
        try:
            # Bytes, not text mode: line endings stay as they were.
            target.write_bytes("".join(pieces).encode("utf-8"))
        except OSError as exc:
            raise _Refused(f"cannot write {relative}: {exc}") from None
        message = substitute(spec.message, context.placeholders())
        await self._checked(steps, self.git("add", "--", relative), "git add", repo)
        await self._checked(steps, self.git("commit", "-m", message), "git commit", repo)
        pushed = await self._push(steps, repo)
        return steps.result(
            ok=True,
            summary=f"git write: {relative} {', '.join(previous)} -> {version} "
            f"({len(spans)} match{'es' if len(spans) != 1 else ''}), {pushed}",
        )

    async def _revert(
        self,
        workdir: Path,
        repo: Path,
        steps: ProgramSteps,
        context: RollbackContext,
        version: str,
    ) -> StepResult:
        spec = self.spec
        paths: list[str] = []
        if spec.file:
            paths = ["--", self._file(repo)[1]]
        where = f"{paths[1]} on {spec.branch}" if paths else spec.branch
        if not await self._still_named(steps, repo, version, paths):
            return steps.result(
                ok=True,
                summary=f"git revert: {version} is no longer named in {where}; nothing to revert",
            )
        history = workdir / "history.patch"
        await self._checked(
            steps,
            self.git(
                "log",
                "--no-merges",
                "-S",
                version,
                "--format=%x00%H %P",
                "-p",
                "--unified=0",
                "--no-ext-diff",
                "--no-textconv",
                "--no-color",
                "--no-show-signature",
                # To a file: stdout keeps only a tail, and a patch may be longer.
                f"--output={history}",
                "HEAD",
                *paths,
            ),
            "git log",
            repo,
        )
        try:
            patches = history.read_bytes().decode("utf-8", errors="replace")
        except OSError as exc:
            raise _Refused(f"cannot read the history git log wrote: {exc}") from None
        commit = _introducing_commit(patches, version)
        if commit is None:
            raise _Refused(
                f"no commit among the last {CLONE_DEPTH} of {where} adds {version}; "
                "nothing was reverted"
            )
        await self._checked(
            steps, self.git("revert", "--no-edit", commit), f"git revert {commit[:12]}", repo
        )
        message = substitute(spec.message, context.placeholders())
        await self._checked(
            steps,
            self.git("commit", "--amend", "-m", f"{message}\n\nThis reverts commit {commit}."),
            "git commit --amend",
            repo,
        )
        pushed = await self._push(steps, repo)
        return steps.result(
            ok=True,
            summary=f"git revert: reverted {commit[:12]} (it introduced {version} in {where}), "
            f"{pushed}",
        )

    async def _still_named(
        self, steps: ProgramSteps, repo: Path, version: str, paths: list[str]
    ) -> bool:
        grep = await steps.run(
            self.git("grep", "-l", "-z", "-F", "-e", version, *paths),
            label="git grep",
            cwd=str(repo),
        )
        if grep.returncode == 1 and grep.error is None and not grep.timed_out:
            return False
        if not grep.ok:
            raise _Refused(steps.last_failure())
        names = grep.stdout_tail.split("\0")
        if len(grep.stdout_tail.encode()) >= DEFAULT_TAIL_BYTES:
            # Only a tail of the names: the first may be cut, the rest are not all there.
            return True
        pattern = _version_pattern(version)
        root = repo.resolve()
        for name in filter(None, names):
            path = root / name
            # What git grep read: the file itself, never where a symlink points.
            if path.is_symlink() or not path.is_file():
                continue
            if pattern.search(path.read_bytes().decode("utf-8", errors="replace")):
                return True
        return False

    async def _push(self, steps: ProgramSteps, repo: Path) -> str:
        """Push HEAD; once, rebase onto a branch that moved meanwhile and push again. The
        summary's end: ``pushed 1a2b3c4d5e6f to main``."""
        branch = self.spec.branch
        push = self.git("push", "origin", f"HEAD:refs/heads/{branch}")
        first = await steps.run(push, label="git push", cwd=str(repo), explain=_push_gist)
        note = ""
        if not first.ok:
            if not _pushed_into_a_race(first):
                raise _Refused(steps.last_failure())
            await self._checked(steps, self.git("fetch", "origin", branch), "git fetch", repo)
            await self._checked(
                steps, self.git("rebase", "FETCH_HEAD"), f"git rebase onto the moved {branch}", repo
            )
            await self._checked(steps, push, "git push (after rebase)", repo, _push_gist)
            note = f" after rebasing onto the moved {branch}"
        head = await self._checked(steps, self.git("rev-parse", "HEAD"), "git rev-parse", repo)
        return f"pushed {head.strip()[:12]} to {branch}{note}"


def _introducing_commit(patches: str, version: str) -> str | None:
    """The first commit in ``git log -p --format=%x00%H %P`` output whose patch adds
    ``version`` more often than it removes it; commits without a parent (the root, or the
    clone's shallow boundary, whose "patch" adds every file) never count."""
    pattern = _version_pattern(version)
    for chunk in patches.split("\0")[1:]:
        header, _, patch = chunk.partition("\n")
        sha, *parents = header.split()
        if not parents:
            continue
        balance = 0
        in_hunk = False
        for line in patch.splitlines():
            if line.startswith("diff --git "):
                in_hunk = False
            elif line.startswith("@@"):
                in_hunk = True
            elif in_hunk and line[:1] == "+":
                balance += len(pattern.findall(line[1:]))
            elif in_hunk and line[:1] == "-":
                balance -= len(pattern.findall(line[1:]))
        if balance > 0:
            return sha
    return None
