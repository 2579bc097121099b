"""The real ``git``, run as a developer would run it, for tests that build repositories."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

REAL_GIT = shutil.which("git")
"""The machine's git, or None when it is not installed (such tests skip)."""


def git(*args: str, cwd: Path) -> str:
    """The real git as a developer: its own identity, the machine's configuration shut
    out. Returns its stdout; a failure raises."""
    assert REAL_GIT is not None
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(cwd),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": "/dev/null",
        "GIT_AUTHOR_NAME": "Developer",
        "GIT_AUTHOR_EMAIL": "dev@example.com",
        "GIT_COMMITTER_NAME": "Developer",
        "GIT_COMMITTER_EMAIL": "dev@example.com",
        "LC_ALL": "C",
    }
    done = subprocess.run(
        [REAL_GIT, *args], cwd=cwd, env=env, check=True, capture_output=True, text=True
    )
    return done.stdout
