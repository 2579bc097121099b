"""Which service an alert may roll back: [[alert]] alertname and matchers, read as
Alertmanager reads them (=, !=, =~, !~; regexes anchored; a missing label reads as "")."""

from __future__ import annotations

from pathlib import Path

import pytest

from rollbackd.core.alert_text import alert_reason, one_line
from rollbackd.core.matchers import MatcherError, parse_matchers
from rollbackd.runtime.alert_intake import AlertRoute
from support.daemon_process import InProcessDaemon, alert_service


def matches(text: str, **labels: str) -> bool:
    return all(m.matches(labels) for m in parse_matchers(text))


@pytest.mark.parametrize(
    ("matchers", "labels", "expected"),
    [
        ('severity="critical"', {"severity": "critical"}, True),
        ('severity="critical"', {"severity": "Critical"}, False),
        ('severity="critical"', {}, False),
        ('severity=""', {}, True),
        ('severity!="info"', {"severity": "critical"}, True),
        ('severity!="info"', {"severity": "info"}, False),
        ('severity!="info"', {}, True),
        ('team=~"pay.*"', {"team": "payments"}, True),
        ('team=~"pay.*"', {"team": "xpayments"}, False),  # anchored at the start
        ('team=~"pay"', {"team": "payments"}, False),  # and at the end
        ('team=~"pay|ops"', {"team": "ops"}, True),
        ('team=~".*"', {}, True),
        ('team!~"pay.*"', {"team": "ops"}, True),
        ('team!~"pay.*"', {"team": "payments"}, False),
        ('code=~"5\\\\d\\\\d"', {"code": "503"}, True),
        ('code=~"5\\d\\d"', {"code": "503"}, True),  # an unknown escape keeps its backslash
        ('msg="say \\"hi\\""', {"msg": 'say "hi"'}, True),
        ('a="1", b!="2",c=~"3.*" ,', {"a": "1", "b": "x", "c": "33"}, True),
        ('a="1", b!="2"', {"a": "1", "b": "2"}, False),
        ("", {"anything": "x"}, True),
    ],
)
def test_matchers(matchers: str, labels: dict[str, str], expected: bool) -> None:
    assert matches(matchers, **labels) is expected


@pytest.mark.parametrize(
    "text", ['severity="critical', "severity=critical", 'team=~"("', '1a="x"', 'a=="x"']
)
def test_unusable_matchers_are_errors(text: str) -> None:
    with pytest.raises(MatcherError):
        parse_matchers(text)


def test_a_route_needs_the_alertname_too() -> None:
    route = AlertRoute("api", "ApiDown", parse_matchers('severity="critical"'))
    assert route.matches({"alertname": "ApiDown", "severity": "critical"})
    assert not route.matches({"alertname": "ApiDownNow", "severity": "critical"})
    assert not route.matches({"severity": "critical"})
    assert str(route) == 'ApiDown{severity="critical"}'


async def test_an_alert_matching_two_services_rolls_back_neither(tmp_path: Path) -> None:
    log = tmp_path / "runs.jsonl"
    daemon = InProcessDaemon(
        tmp_path / "d",
        {
            "api": alert_service("api", log, alertname="Down", target=False),
            "web": alert_service(
                "web", log, alertname="Down", matchers=['team="web"'], target=False
            ),
        },
    )
    try:
        alert = {
            "status": "firing",
            "labels": {"alertname": "Down", "team": "web"},
            "startsAt": "2030-01-01T00:00:00Z",
            "fingerprint": "ab",
        }
        payload = {
            "version": "4",
            "receiver": "r",
            "status": "firing",
            "alerts": [alert],
            "groupKey": "{}",
        }
        async with daemon.client() as client:
            answer = (await client.post("/api/v1/alertmanager", json=payload)).json()
        [result] = answer["alerts"]
        assert result["service"] is None
        assert result["outcome"] == (
            "ambiguous: matches the [[alert]] of services api, web; recorded, nothing done"
        )
        assert daemon.store.rollbacks() == []
    finally:
        daemon.close()


def test_the_reason_is_one_short_line() -> None:
    assert alert_reason("A", {"alertname": "A", "x": "1"}, {}) == 'alert A: {x="1"}'
    assert alert_reason("A", {}, {"description": "d"}) == "alert A: d"
    hostile = alert_reason("A", {}, {"summary": "line\nbreak\x00\t" + "y" * 1000})
    assert "\n" not in hostile and "\x00" not in hostile
    assert len(hostile) == 300 and hostile.endswith("...")
    assert one_line("  a \r\n b  ") == "a b"
    # C1 controls, line and paragraph separators, zero-width and bidirectional characters
    # would break a line or disguise what a terminal shows.
    invisible = "a\x85b\x9bc\u2028d\u2029e\u200bf\u202eg\u2066h\ufeffi"
    assert one_line(invisible) == "a b c d e f g h i"
    assert one_line("café ünïcode 日本") == "café ünïcode 日本"
