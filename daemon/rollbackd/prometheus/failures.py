"""A failed request in words: whether it was a timeout, and its innermost cause."""

from __future__ import annotations

import http.client

import requests
import urllib3.exceptions


def chain(exc: BaseException) -> list[BaseException]:
    """The exception and what it wraps (causes, contexts, urllib3 reasons, args)."""
    seen: list[BaseException] = []
    todo: list[BaseException] = [exc]
    while todo:
        current = todo.pop(0)
        if any(current is s for s in seen):
            continue
        seen.append(current)
        nested = [getattr(current, "reason", None), current.__cause__, current.__context__]
        nested.extend(current.args)
        todo.extend(n for n in nested if isinstance(n, BaseException))
    return seen


def is_timeout(exc: BaseException) -> bool:
    for link in chain(exc):
        if isinstance(link, urllib3.exceptions.NewConnectionError):
            continue  # a subclass of ConnectTimeoutError, for history's sake
        if isinstance(
            link,
            requests.exceptions.Timeout | urllib3.exceptions.TimeoutError | TimeoutError,
        ):
            return True
    return False


def cause_text(exc: BaseException) -> str:
    """The innermost cause in words, without URLs: "Connection refused",
    "Remote end closed connection without response"."""
    for link in reversed(chain(exc)):
        if isinstance(link, OSError) and link.strerror:
            return link.strerror
        if isinstance(link, http.client.HTTPException) and str(link):
            return str(link)
    return type(exc).__name__
