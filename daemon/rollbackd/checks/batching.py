"""Query batching: checks of one shape share one query per interval.

At thousands of services most checks are the same rule with another service's name in it:
``error_rate`` over ``http_requests_total{service="checkout"}``, then over
``{service="search"}``, ... One query per check per interval is then one HTTP request, one
thread hop and one PromQL evaluation per check — the daemon's bottleneck at scale (see
``docs/benchmarks.md``). Batching sends one query instead::

    sum by (service, version) (rate(http_requests_total{service=~"checkout|search|..."}[1m]))

and hands each check exactly the series its own query would have returned: the samples whose
``service`` is the check's value, with that label taken off again. Aggregations keep every
label of their ``by``, and the label holds a single value per check, so the split answer is
the check's own answer, sample for sample; the test ``tests/test_batching.py`` compares both
against a real Prometheus.

Which checks batch: ``error_rate``, ``latency`` and ``probe`` checks with the same interval,
the same service version label, and queries that are identical once one equality matcher of
the selector (``L="value"``) is taken out — the same metric, errors, window, quantile and
other matchers. ``L`` is the grouping label; its values must be plain (letters, digits,
``_ . : / -``) so that they can be listed in a regular expression safely. ``burn_rate`` and
``query`` checks, and checks that share their shape with no other check, run alone, as
before. Thresholds, ``for``, ``min_rate``, ``max_increase`` and the rest are not part of the
query: checks that differ only there still batch, and are judged each by its own rule.

A batch's query is kept below :data:`MAX_QUERY_BYTES` once URL-encoded (proxies in front of
Prometheus refuse long request lines), so a large group becomes several batches.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from urllib.parse import quote_plus

from rollbackd.checks.base import CheckSpec, Query, series
from rollbackd.checks.error_rate import ErrorRateCheck
from rollbackd.checks.latency import LatencyCheck
from rollbackd.checks.probe import ProbeCheck
from rollbackd.config.loader import Service
from rollbackd.core.samples import QueryResult, Sample

MAX_QUERY_BYTES = 6000
"""The longest URL-encoded query a batch sends (nginx's default request line limit is 8 KiB)."""

_MATCHER = re.compile(
    r'\s*(?P<label>[a-zA-Z_][a-zA-Z0-9_]*)\s*(?P<op>=~|!~|!=|=)\s*(?P<value>"(?:[^"\\\n]|\\.)*")\s*'
)
_PLAIN = re.compile(r"[A-Za-z0-9_.:/-]+")
"""Label values batched: no quote, backslash or regex syntax but ``.``, which is escaped."""
_SENTINEL = "\x00batch\x00"
_BATCHABLE = (ErrorRateCheck, LatencyCheck, ProbeCheck)
Batchable = ErrorRateCheck | LatencyCheck | ProbeCheck


@dataclass(frozen=True)
class Member:
    """One check in a batch, and the value of the grouping label that picks its series."""

    service: Service
    check: CheckSpec
    value: str
    own: Mapping[str, str]
    """The check's own query per role: what its measurements name."""

    @property
    def key(self) -> tuple[str, str]:
        return (self.service.name, self.check.name)


@dataclass(frozen=True)
class Batch:
    id: str
    """``batch:<label>:<hash>``: stable while the same checks of the same shape batch together."""
    label: str
    interval: timedelta
    queries: tuple[Query, ...]
    """The batched queries, one per role of the members' own queries."""
    members: tuple[Member, ...]

    def split(
        self, answers: Mapping[str, QueryResult]
    ) -> dict[tuple[str, str], dict[str, QueryResult]]:
        """Each member's answers, by its key: the ones its own queries would have had —
        the samples whose label is the member's value, without that label."""
        by_value: dict[str, dict[str, list[Sample]]] = defaultdict(lambda: defaultdict(list))
        for role, answer in answers.items():
            for sample in answer.samples:
                value = None
                rest = []
                for name, label_value in sample.labels:
                    if name == self.label:
                        value = label_value
                    else:
                        rest.append((name, label_value))
                if value is not None:
                    by_value[value][role].append(
                        Sample(labels=tuple(rest), value=sample.value, timestamp=sample.timestamp)
                    )
        split: dict[tuple[str, str], dict[str, QueryResult]] = {}
        for member in self.members:
            mine = by_value.get(member.value, {})
            split[member.key] = {
                role: QueryResult(
                    expr=member.own[role],
                    result_type=answer.result_type,
                    samples=tuple(mine.get(role, ())),
                    warnings=answer.warnings,
                )
                for role, answer in answers.items()
            }
        return split


@dataclass
class Plan:
    """Every check of a config, either in a batch or alone."""

    batches: dict[str, Batch] = field(default_factory=dict)
    singles: list[tuple[Service, CheckSpec]] = field(default_factory=list)
    batch_of: dict[tuple[str, str], str] = field(default_factory=dict)
    """(service, check) -> the id of its batch."""


@dataclass(frozen=True)
class _Candidate:
    shape: tuple[object, ...]
    label: str
    value: str


def _matchers(selector: str) -> list[tuple[str, str, str, str]] | None:
    """(label, op, quoted value, text) of each matcher, or None if it does not parse."""
    found: list[tuple[str, str, str, str]] = []
    position = 0
    text = selector.strip()
    while position < len(text):
        match = _MATCHER.match(text, position)
        if match is None:
            return None
        found.append((match["label"], match["op"], match["value"], match.group(0).strip()))
        position = match.end()
        if position < len(text):
            if text[position] != ",":
                return None
            position += 1
    return found


def _join(matchers: Sequence[str]) -> str:
    return ", ".join(matchers)


_Templates = dict[tuple[object, ...], tuple[tuple[object, ...], "Batchable"]]


def _candidates(service: Service, check: CheckSpec, templates: _Templates) -> list[_Candidate]:
    """The ways the check could batch: one per plain equality matcher of its selector.
    ``templates`` gets the first check of each shape, with the matcher's value taken out;
    a shape met again is the first one's object, so thousands of checks keep one copy."""
    if not isinstance(check, _BATCHABLE):
        return []
    scope = service.rules.version_scope
    matchers = _matchers(check.selector)
    if not matchers or not _own_query_fits(check, scope):
        return []
    found = []
    for index, (label, op, quoted, _) in enumerate(matchers):
        value = quoted[1:-1]
        if op != "=" or label in ("le", scope) or not _PLAIN.fullmatch(value):
            continue
        texts = [m[3] for m in matchers]
        texts[index] = f'{label}="{_SENTINEL}"'
        template = check.model_copy(update={"selector": _join(texts)})
        shape: tuple[object, ...] = (
            type(check).__name__,
            check.interval,
            scope,
            label,
            tuple((q.role, q.expr) for q in template.queries(scope)),
        )
        known = templates.get(shape)
        if known is None:
            templates[shape] = (shape, template)
        else:
            shape = known[0]
        found.append(_Candidate(shape, label, value))
    return found


def _own_query_fits(check: CheckSpec, scope: str | None) -> bool:
    """The probe query is rebuilt here, grouped by the label; only batch it while the
    check's own query is still the one rebuilt."""
    if isinstance(check, ProbeCheck):
        return [q.expr for q in check.queries(scope)] == [_probe_expr(check, None)]
    return True


def _probe_expr(check: ProbeCheck, by: str | None) -> str:
    inner = f"{series(check.metric, check.selector)} == bool 0"
    return f"sum by ({by}) ({inner})" if by else f"sum({inner})"


def _regex_literal(values: Iterable[str]) -> str:
    """A PromQL string holding the regular expression matching exactly these values."""
    # Values are plain (_PLAIN): "." is the only regex syntax in them; in a PromQL string
    # the backslash escaping it is written twice.
    return '"' + "|".join(_escaped(v) for v in dict.fromkeys(values)) + '"'


def _escaped(value: str) -> str:
    return value.replace(".", "\\\\.")


def _batched_queries(
    template: Batchable, label: str, scope: str | None, values: Sequence[str]
) -> tuple[Query, ...]:
    selector = template.selector.replace(
        f'{label}="{_SENTINEL}"', f"{label}=~{_regex_literal(values)}"
    )
    batched = template.model_copy(update={"selector": selector})
    by = f"{label}, {scope}" if scope else label
    if isinstance(batched, ProbeCheck):
        return (Query("value", _probe_expr(batched, by)),)
    # error_rate and latency group their aggregations by ``by`` as written.
    return tuple(batched.queries(by))


def _encoded_length(queries: Iterable[Query]) -> int:
    return max(len(quote_plus(q.expr)) for q in queries)


def plan(services: Iterable[Service], *, max_query_bytes: int | None = None) -> Plan:
    """Group the checks of ``services`` into batches; the rest run alone. A batch's query
    stays within ``max_query_bytes`` (default :data:`MAX_QUERY_BYTES`) once URL-encoded."""
    limit = MAX_QUERY_BYTES if max_query_bytes is None else max_query_bytes
    ordered = [(service, check) for service in services for check in service.rules.check]
    templates: _Templates = {}
    candidates = {
        (service.name, check.name): _candidates(service, check, templates)
        for service, check in ordered
    }
    # A check with several equality matchers joins the shape most checks share.
    popularity: dict[tuple[object, ...], int] = defaultdict(int)
    for found in candidates.values():
        for candidate in found:
            popularity[candidate.shape] += 1
    groups: dict[tuple[object, ...], list[tuple[Service, CheckSpec, _Candidate]]] = defaultdict(
        list
    )
    result = Plan()
    for service, check in ordered:
        found = candidates[(service.name, check.name)]
        if not found:
            result.singles.append((service, check))
            continue
        best = max(found, key=lambda c: (popularity[c.shape], c.label))
        groups[best.shape].append((service, check, best))
    for shape, members in groups.items():
        if len(members) < 2:
            result.singles.extend((s, c) for s, c, _ in members)
            continue
        label = members[0][2].label
        template = templates[shape][1]
        scope = members[0][0].rules.version_scope
        for chunk in _chunks(members, template, label, scope, limit):
            if len(chunk) < 2:
                result.singles.extend((s, c) for s, c, _ in chunk)
                continue
            queries = _batched_queries(template, label, scope, [m[2].value for m in chunk])
            digest = hashlib.sha256(
                repr((shape, [(s.name, c.name, m.value) for s, c, m in chunk])).encode()
            ).hexdigest()[:16]
            batch = Batch(
                id=f"batch:{label}:{digest}",
                label=label,
                interval=chunk[0][1].interval,
                queries=queries,
                members=tuple(
                    Member(
                        s,
                        c,
                        m.value,
                        {q.role: q.expr for q in c.queries(s.rules.version_scope)},
                    )
                    for s, c, m in chunk
                ),
            )
            result.batches[batch.id] = batch
            for member in batch.members:
                result.batch_of[member.key] = batch.id
    return result


def _chunks(
    members: list[tuple[Service, CheckSpec, _Candidate]],
    template: Batchable,
    label: str,
    scope: str | None,
    max_query_bytes: int,
) -> Iterable[list[tuple[Service, CheckSpec, _Candidate]]]:
    """Split a group so that each batch's query stays within ``max_query_bytes`` (but
    holds one value at least)."""
    empty = _encoded_length(_batched_queries(template, label, scope, []))
    one = _encoded_length(_batched_queries(template, label, scope, ["x"])) - empty
    # Each value adds its own encoded length and a separator wherever the selector appears.
    appearances = max(one, 1)
    chunk: list[tuple[Service, CheckSpec, _Candidate]] = []
    values: set[str] = set()
    size = empty
    # Members on the same value (one service's checks of one shape) cost nothing more.
    for member in sorted(members, key=lambda m: m[2].value):
        value = member[2].value
        cost = 0 if value in values else appearances * (len(quote_plus(_escaped(value))) + 3)
        if chunk and cost and size + cost > max_query_bytes:
            yield chunk
            chunk, values, size = [], set(), empty
            cost = appearances * (len(quote_plus(_escaped(value))) + 3)
        chunk.append(member)
        values.add(value)
        size += cost
    if chunk:
        yield chunk
