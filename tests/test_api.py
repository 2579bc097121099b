"""The HTTP API in-process, on real SQLite and real executor processes: the token on every
/api route, the body limit, validation that names the field, the routes of SPEC §5, and
the Alertmanager receiver (storage before the answer, deduplication, matching, retries)."""

from __future__ import annotations

import json
import time
import typing
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from rollbackd.api.gate import PUBLIC_PATHS
from rollbackd.api.models import HistoryQuery
from rollbackd.core.model import RollbackState
from rollbackd.runtime.pipeline import Submission
from support.daemon_process import TOKEN, InProcessDaemon, alert_service, executions

API_ROUTES = [
    ("GET", "/api/v1/status"),
    ("GET", "/api/v1/rollbacks"),
    ("POST", "/api/v1/rollbacks"),
    ("GET", "/api/v1/rollbacks/{rollback_id}"),
    ("POST", "/api/v1/rollbacks/{rollback_id}/approve"),
    ("POST", "/api/v1/rollbacks/{rollback_id}/reject"),
    ("POST", "/api/v1/services/{name}/pause"),
    ("POST", "/api/v1/services/{name}/resume"),
    ("POST", "/api/v1/releases"),
    ("GET", "/api/v1/alerts"),
    ("POST", "/api/v1/alertmanager"),
]
"""Every route but the public ones; test_the_route_list_is_complete keeps it honest."""

AM_TIME = "2030-01-02T03:04:05.123456789Z"
ZERO_TIME = "0001-01-01T00:00:00Z"


def rules(log: Path) -> dict[str, str]:
    return {
        "api": alert_service(
            "api", log, alertname="ApiDown", matchers=['severity="critical"', 'team=~"pay.*"']
        ),
        "web": alert_service(
            "web",
            log,
            alertname="WebDown",
            header="version_query = 'max by (version) (build_info{job=\"web\"})'",
        ),
    }


@pytest.fixture
def log(tmp_path: Path) -> Path:
    return tmp_path / "runs.jsonl"


@pytest.fixture
def daemon(tmp_path: Path, log: Path) -> Iterator[InProcessDaemon]:
    made = InProcessDaemon(tmp_path / "d", rules(log), max_body=8192)
    yield made
    made.close()


@pytest.fixture
async def client(daemon: InProcessDaemon) -> AsyncIterator[httpx.AsyncClient]:
    async with daemon.client() as c:
        yield c


def alert(
    alertname: str = "ApiDown",
    *,
    status: str = "firing",
    fingerprint: str = "0123456789abcdef",
    starts_at: str | None = None,
    ends_at: str = ZERO_TIME,
    **labels: str,
) -> dict[str, Any]:
    if starts_at is None:
        starts_at = time.strftime("%Y-%m-%dT%H:%M:%S.123456789Z", time.gmtime())
    return {
        "status": status,
        "labels": {"alertname": alertname, **labels},
        "annotations": {"summary": f"{alertname} is firing"},
        "startsAt": starts_at,
        "endsAt": ends_at,
        "generatorURL": "",
        "fingerprint": fingerprint,
    }


def webhook(*alerts: dict[str, Any], **extra: Any) -> dict[str, Any]:
    status = "firing" if any(a["status"] == "firing" for a in alerts) else "resolved"
    return {
        "version": "4",
        "receiver": "rollbackd",
        "status": status,
        "alerts": list(alerts),
        "groupLabels": {},
        "commonLabels": {},
        "commonAnnotations": {},
        "externalURL": "http://alertmanager.test",
        "groupKey": '{}:{alertname="ApiDown"}',
        "truncatedAlerts": 0,
        **extra,
    }


CRITICAL = {"severity": "critical", "team": "payments"}


def concrete(path: str) -> str:
    return path.replace("{rollback_id}", "1").replace("{name}", "api")


# -- the token ------------------------------------------------------------------------------


def test_the_route_list_is_complete(daemon: InProcessDaemon) -> None:
    routes = {
        (method, route.path)
        for route in daemon.app.routes
        for method in getattr(route, "methods", ()) or ()
        if route.path not in PUBLIC_PATHS and method != "HEAD"
    }
    assert routes == set(API_ROUTES)


@pytest.mark.parametrize(("method", "path"), API_ROUTES, ids=[f"{m} {p}" for m, p in API_ROUTES])
@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer wrong-token", f"Basic {TOKEN}", f"Bearer {TOKEN}x", f"bearer{TOKEN}", "Bearer"],
    ids=["missing", "wrong", "basic", "longer", "no-space", "empty"],
)
@pytest.mark.faults
async def test_every_api_route_refuses_a_missing_or_wrong_token(
    daemon: InProcessDaemon, method: str, path: str, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    body = {"service": "api", "reason": "x", "version": "9.9.9"}
    async with daemon.client(token=None) as c:
        response = await c.request(method, concrete(path), json=body, headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert "token" in response.json()["detail"]
    assert daemon.store.rollbacks() == []
    assert daemon.store.paused() == set()


@pytest.mark.faults
async def test_the_token_is_checked_before_the_body_is_read(daemon: InProcessDaemon) -> None:
    async with daemon.client(token=None) as c:
        oversized = await c.post("/api/v1/rollbacks", content=b"x" * 100_000)
        malformed = await c.post(
            "/api/v1/alertmanager", content=b"{", headers={"content-type": "application/json"}
        )
    assert oversized.status_code == malformed.status_code == 401


async def test_unknown_paths_need_the_token_too(daemon: InProcessDaemon) -> None:
    async with daemon.client(token=None) as anonymous:
        assert (await anonymous.get("/api/v2/anything")).status_code == 401
    async with daemon.client() as c:
        assert (await c.get("/api/v2/anything")).status_code == 404


@pytest.mark.parametrize("path", sorted(PUBLIC_PATHS))
async def test_probes_metrics_and_the_openapi_document_need_no_token(
    daemon: InProcessDaemon, path: str
) -> None:
    async with daemon.client(token=None) as c:
        response = await c.get(path)
    # /readyz answers 503: this daemon's Prometheus is unreachable.
    assert response.status_code == (503 if path == "/readyz" else 200)


async def test_with_the_token_the_routes_answer(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/v1/status")
    assert response.status_code == 200
    assert [s["name"] for s in response.json()["services"]] == ["api", "web"]


# -- the body limit, validation, malformed input ----------------------------------------------


@pytest.mark.faults
async def test_a_declared_body_over_the_limit_is_413(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/api/v1/alertmanager",
        content=b"{" + b" " * 9000 + b"}",
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 413
    assert "8192 bytes" in response.json()["detail"]


@pytest.mark.faults
async def test_a_streamed_body_over_the_limit_is_413(client: httpx.AsyncClient) -> None:
    sent = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal sent
        for _ in range(100):
            sent += 1024
            yield b" " * 1024

    # No Content-Length: the body arrives in chunks and is counted as it comes.
    response = await client.post(
        "/api/v1/alertmanager", content=chunks(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413


async def test_a_body_at_the_limit_is_read(client: httpx.AsyncClient) -> None:
    document = json.dumps(webhook(alert(**CRITICAL))).encode()
    padded = document[:-1] + b" " * (8192 - len(document)) + b"}"
    assert len(padded) == 8192
    response = await client.post(
        "/api/v1/alertmanager", content=padded, headers={"content-type": "application/json"}
    )
    assert response.status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "body", "loc"),
    [
        ("POST", "/api/v1/rollbacks", {"service": "api"}, ["body", "reason"]),
        (
            "POST",
            "/api/v1/rollbacks",
            {"service": "api", "reason": "x", "to_version": "1.0; rm -rf /"},
            ["body", "to_version"],
        ),
        (
            "POST",
            "/api/v1/rollbacks",
            {"service": "api", "reason": "x", "force": True},
            ["body", "force"],
        ),
        ("POST", "/api/v1/rollbacks", {"service": "api", "reason": "  "}, ["body", "reason"]),
        (
            "POST",
            "/api/v1/rollbacks",
            {"service": "api", "reason": "line\nbreak"},
            ["body", "reason"],
        ),
        ("POST", "/api/v1/releases", {"service": "api", "version": "../x"}, ["body", "version"]),
        (
            "POST",
            "/api/v1/releases",
            {"service": "api", "version": "1", "meta": {"a b": "c"}},
            ["body", "meta", "a b", "[key]"],
        ),
        ("GET", "/api/v1/rollbacks?limit=0", None, ["query", "limit"]),
        ("GET", "/api/v1/rollbacks/abc", None, ["path", "rollback_id"]),
        ("GET", f"/api/v1/rollbacks/{2**64}", None, ["path", "rollback_id"]),
        ("POST", "/api/v1/services/a%20b/pause", None, ["path", "name"]),
        ("POST", "/api/v1/alertmanager", {**webhook(), "version": "3"}, ["body", "version"]),
        (
            "POST",
            "/api/v1/alertmanager",
            webhook({**alert(), "startsAt": "yesterday"}),
            ["body", "alerts", 0, "startsAt"],
        ),
        (
            "POST",
            "/api/v1/alertmanager",
            webhook({**alert(), "fingerprint": "not hex"}),
            ["body", "alerts", 0, "fingerprint"],
        ),
        (
            "POST",
            "/api/v1/alertmanager",
            webhook({**alert(), "labels": {"alertname": "\ud800"}}),
            ["body", "alerts", 0, "labels", "alertname"],
        ),
    ],
    ids=lambda value: None,
)
async def test_invalid_requests_get_422_naming_the_field(
    client: httpx.AsyncClient,
    daemon: InProcessDaemon,
    method: str,
    path: str,
    body: Any,
    loc: list[Any],
) -> None:
    if body is None:
        response = await client.request(method, path)
    else:
        # json.dumps keeps a lone surrogate as an escape, as a hostile client would send it.
        response = await client.request(
            method, path, content=json.dumps(body), headers={"content-type": "application/json"}
        )
    assert response.status_code == 422, response.text
    errors = response.json()["detail"]
    assert loc in [e["loc"] for e in errors], errors
    assert all(set(e) == {"loc", "msg", "type"} for e in errors)
    assert daemon.store.rollbacks() == []
    assert daemon.store.alerts() == []


@pytest.mark.parametrize(
    "content",
    [b"{", b"not json", b'{"version": "4",', b"\xff\xfe", b"[]", b"null", b'"4"'],
)
@pytest.mark.faults
async def test_malformed_json_is_a_4xx_and_the_daemon_stays_up(
    client: httpx.AsyncClient, content: bytes
) -> None:
    for path in ("/api/v1/alertmanager", "/api/v1/rollbacks", "/api/v1/releases"):
        response = await client.post(
            path, content=content, headers={"content-type": "application/json"}
        )
        assert 400 <= response.status_code < 500, (path, response.text)
        assert "detail" in response.json()
    assert (await client.get("/healthz")).status_code == 200


# -- manual rollbacks, approval, automation, releases -----------------------------------------


async def test_a_manual_rollback_goes_through_the_pipeline(
    client: httpx.AsyncClient, daemon: InProcessDaemon, log: Path
) -> None:
    now = time.time()
    daemon.release("api", "1.0.0", at=now - 100)
    daemon.release("api", "2.0.0", at=now - 10, bake=False)
    response = await client.post(
        "/api/v1/rollbacks",
        json={"service": "api", "reason": "p99 doubled", "requested_by": "alice"},
    )
    assert response.status_code == 202
    answer = response.json()
    assert answer["outcome"] == "executing"
    assert answer["rollback"]["from_version"] == "2.0.0"
    assert answer["rollback"]["to_version"] == "1.0.0"
    assert {g["guard"] for g in answer["guards"]} >= {"paused", "target", "mode"}
    await daemon.pipeline.wait_idle()
    [run] = executions(log)
    assert run["argv"] == ["1.0.0"]
    history = (await client.get("/api/v1/rollbacks", params={"service": "api"})).json()
    [rollback] = history["rollbacks"]
    assert rollback["state"] == "succeeded"
    assert rollback["source"] == "manual"
    assert rollback["trigger"]["requested_by"] == "alice"
    assert [s["kind"] for s in rollback["steps"]] == ["rollback", "verify"]
    one = (await client.get(f"/api/v1/rollbacks/{rollback['id']}")).json()
    assert one["id"] == rollback["id"]


async def test_a_manual_rollback_to_a_named_version(
    client: httpx.AsyncClient, daemon: InProcessDaemon, log: Path
) -> None:
    daemon.release("api", "2.0.0", at=time.time() - 10, bake=False)
    response = await client.post(
        "/api/v1/rollbacks", json={"service": "api", "to_version": "1.9.3", "reason": "bad"}
    )
    assert response.json()["rollback"]["to_version"] == "1.9.3"
    await daemon.pipeline.wait_idle()
    assert [r["argv"] for r in executions(log)] == [["1.9.3"]]


async def test_a_refused_manual_rollback_says_which_guard(client: httpx.AsyncClient) -> None:
    response = await client.post("/api/v1/rollbacks", json={"service": "api", "reason": "x"})
    assert response.status_code == 202
    answer = response.json()
    assert answer["outcome"] == "refused"
    assert answer["rollback_id"] is None
    assert [g["guard"] for g in answer["guards"] if not g["passed"]] == ["target"]


async def test_unknown_services_and_rollbacks_are_404(client: httpx.AsyncClient) -> None:
    rollback = await client.post("/api/v1/rollbacks", json={"service": "nope", "reason": "x"})
    assert rollback.status_code == 404
    assert rollback.json()["detail"] == "unknown service 'nope'; services: api, web"
    assert (await client.post("/api/v1/services/nope/pause")).status_code == 404
    assert (
        await client.post("/api/v1/releases", json={"service": "nope", "version": "1"})
    ).status_code == 404
    for path in ("/api/v1/rollbacks/42", "/api/v1/rollbacks/42/approve"):
        response = await client.request("GET" if path.endswith("42") else "POST", path)
        assert response.status_code == 404
        assert response.json()["detail"] == "no rollback 42"


async def test_approve_and_reject(tmp_path: Path, log: Path) -> None:
    daemon = InProcessDaemon(
        tmp_path / "approve",
        {
            "api": alert_service("api", log, alertname="ApiDown", target=False),
            "web": alert_service("web", log, alertname="WebDown", target=False),
        },
        mode="approve",
    )
    try:
        async with daemon.client() as c:
            delivered = await c.post(
                "/api/v1/alertmanager",
                json=webhook(alert("ApiDown"), alert("WebDown", fingerprint="fedcba9876543210")),
            )
            assert delivered.status_code == 200
            outcomes = [a["outcome"] for a in delivered.json()["alerts"]]
            assert all(o.startswith("pending_approval") for o in outcomes), outcomes
            api_id, web_id = (a["rollback_id"] for a in delivered.json()["alerts"])
            status = (await c.get("/api/v1/status")).json()
            assert {r["id"] for r in status["in_flight"]} == {api_id, web_id}

            approved = await c.post(f"/api/v1/rollbacks/{api_id}/approve", json={"by": "alice"})
            assert approved.status_code == 200
            assert approved.json()["state"] == "running"
            assert approved.json()["decided_by"] == "alice"
            again = await c.post(f"/api/v1/rollbacks/{api_id}/approve")
            assert again.status_code == 409
            assert "not pending" in again.json()["detail"]

            rejected = await c.post(
                f"/api/v1/rollbacks/{web_id}/reject", json={"by": "bob", "reason": "a blip"}
            )
            assert rejected.status_code == 200
            assert rejected.json()["state"] == "rejected"
            assert rejected.json()["outcome"] == "rejected by bob: a blip"
            await daemon.pipeline.wait_idle()
            assert daemon.store.rollback(api_id).state is RollbackState.SUCCEEDED  # type: ignore[union-attr]
            assert len(executions(log)) == 1
    finally:
        daemon.close()


async def test_pause_and_resume(client: httpx.AsyncClient, daemon: InProcessDaemon) -> None:
    now = time.time()
    daemon.release("api", "1.0.0", at=now - 100)
    daemon.release("api", "2.0.0", at=now - 10, bake=False)
    paused = await client.post("/api/v1/services/api/pause", json={"by": "alice"})
    assert paused.status_code == 200
    assert paused.json() == {
        "scope": "api",
        "paused": True,
        "thawed": False,
        "paused_scopes": ["api"],
    }
    delivered = await client.post("/api/v1/alertmanager", json=webhook(alert(**CRITICAL)))
    assert delivered.json()["alerts"][0]["outcome"].startswith(
        "refused: automatic rollbacks are paused"
    )
    status = (await client.get("/api/v1/status")).json()
    assert [s["paused"] for s in status["services"]] == [True, False]

    everything = await client.post("/api/v1/services/*/pause")
    assert everything.json()["paused_scopes"] == ["*", "api"]
    assert (await client.get("/api/v1/status")).json()["paused_all"] is True
    resumed = await client.post("/api/v1/services/api/resume")
    assert resumed.json()["paused"] is True  # still paused by "*"
    resumed_all = await client.post("/api/v1/services/*/resume")
    assert resumed_all.json() == {
        "scope": "*",
        "paused": False,
        "thawed": False,
        "paused_scopes": [],
    }
    kinds = [e.type for e in daemon.store.events(types=["service.paused", "service.resumed"])]
    assert sorted(kinds) == ["service.paused"] * 2 + ["service.resumed"] * 2


async def test_resume_thaws_a_frozen_service(
    client: httpx.AsyncClient, daemon: InProcessDaemon
) -> None:
    daemon.store.set_frozen("api", True, "rollback 3 did not verify")
    assert (await client.get("/api/v1/status")).json()["services"][0]["frozen"] is True
    answer = (await client.post("/api/v1/services/api/resume")).json()
    assert answer["thawed"] is True
    state = daemon.store.service_state("api")
    assert state is not None and not state.frozen


async def test_releases(client: httpx.AsyncClient, daemon: InProcessDaemon) -> None:
    first = await client.post(
        "/api/v1/releases", json={"service": "api", "version": "1.0.0", "meta": {"commit": "abc"}}
    )
    assert first.json() == {
        "service": "api",
        "version": "1.0.0",
        "changed": True,
        "previous": None,
        "bad": False,
    }
    second = await client.post("/api/v1/releases", json={"service": "api", "version": "1.1.0"})
    assert second.json()["previous"] == "1.0.0"
    same = await client.post("/api/v1/releases", json={"service": "api", "version": "1.1.0"})
    assert same.json()["changed"] is False
    record = daemon.store.version("api", "1.0.0")
    assert record is not None and record.meta == {"commit": "abc"}
    assert daemon.engine.versions.current("api") == "1.1.0"
    # A service that reads its version from metrics would flap against a recorded one.
    discovered = await client.post("/api/v1/releases", json={"service": "web", "version": "1"})
    assert discovered.status_code == 409
    assert "version_query" in discovered.json()["detail"]


# -- the Alertmanager receiver ------------------------------------------------------------------


async def test_a_firing_alert_rolls_back_once_and_its_resends_only_count(
    client: httpx.AsyncClient, daemon: InProcessDaemon, log: Path
) -> None:
    now = time.time()
    daemon.release("api", "1.0.0", at=now - 100)
    daemon.release("api", "2.0.0", at=now - 10, bake=False)
    payload = webhook(alert(**CRITICAL, newLabel="x"), futureField={"a": 1})
    first = await client.post("/api/v1/alertmanager", json=payload)
    assert first.status_code == 200
    [result] = first.json()["alerts"]
    assert result["new"] is True and result["service"] == "api"
    assert result["outcome"].startswith("executing")
    await daemon.pipeline.wait_idle()
    for deliveries in (2, 3):
        again = (await client.post("/api/v1/alertmanager", json=payload)).json()["alerts"][0]
        assert again["new"] is False
        assert again["deliveries"] == deliveries
        assert again["rollback_id"] == result["rollback_id"]
    await daemon.pipeline.wait_idle()
    assert len(executions(log)) == 1
    [rollback] = daemon.store.rollbacks()
    assert rollback.source == "alert"
    assert rollback.state is RollbackState.SUCCEEDED
    assert rollback.reason == "alert ApiDown: ApiDown is firing"
    assert rollback.trigger["fingerprint"] == "0123456789abcdef"
    [stored] = daemon.store.alerts()
    assert stored.deliveries == 3 and stored.rollback_id == rollback.id
    # Nine fractional digits parse; the zero endsAt of a firing alert means "no end".
    assert stored.ends_at is None
    assert stored.starts_at == pytest.approx(now, abs=5)


async def test_alerts_that_match_no_mapping_are_recorded_and_ignored(
    client: httpx.AsyncClient, daemon: InProcessDaemon, log: Path
) -> None:
    now = time.time()
    daemon.release("api", "1.0.0", at=now - 100)
    daemon.release("api", "2.0.0", at=now - 10, bake=False)
    unmatched = [
        alert("SomethingElse", fingerprint="1", **CRITICAL),
        alert("ApiDown", fingerprint="2", severity="warning", team="payments"),  # = fails
        alert("ApiDown", fingerprint="3", severity="critical", team="xpayments"),  # anchored
        alert("ApiDown", fingerprint="4", severity="critical"),  # a missing label reads ""
        # Labels never name the service: an alert called like a service is just unmatched.
        alert("api", fingerprint="5", service="api", **CRITICAL),
    ]
    response = await client.post("/api/v1/alertmanager", json=webhook(*unmatched))
    assert response.status_code == 200
    results = response.json()["alerts"]
    assert [r["service"] for r in results] == [None] * 5
    assert all(r["outcome"] == "matches no [[alert]]: recorded and ignored" for r in results)
    assert len(daemon.store.alerts()) == 5
    assert daemon.store.rollbacks() == []
    assert executions(log) == []


@pytest.mark.faults
async def test_labels_never_choose_the_service_or_the_version(
    client: httpx.AsyncClient, daemon: InProcessDaemon, log: Path
) -> None:
    now = time.time()
    daemon.release("api", "1.0.0", at=now - 100)
    daemon.release("api", "2.0.0", at=now - 10, bake=False)
    hostile = alert(
        **CRITICAL, service="web", to_version="6.6.6", version="$(reboot)", executor="rm"
    )
    await client.post("/api/v1/alertmanager", json=webhook(hostile))
    await daemon.pipeline.wait_idle()
    [rollback] = daemon.store.rollbacks()
    assert (rollback.service, rollback.to_version) == ("api", "1.0.0")
    assert [r["argv"] for r in executions(log)] == [["1.0.0"]]


async def test_resolved_alerts_are_recorded_and_never_proof_of_health(
    client: httpx.AsyncClient, daemon: InProcessDaemon
) -> None:
    now = time.time()
    daemon.release("api", "1.0.0", at=now - 100)
    daemon.release("api", "2.0.0", at=now - 10, bake=False)
    daemon.store.set_frozen("api", True, "rollback did not verify")
    starts = time.strftime("%Y-%m-%dT%H:%M:%S.5Z", time.gmtime(now - 60))
    resolved = alert(
        **CRITICAL, status="resolved", starts_at=starts, ends_at="2030-01-01T00:00:00Z"
    )
    response = await client.post("/api/v1/alertmanager", json=webhook(resolved))
    [result] = response.json()["alerts"]
    assert result["service"] == "api"
    assert result["outcome"] == "resolved: recorded; never taken as proof of health"
    assert daemon.store.rollbacks() == []
    state = daemon.store.service_state("api")
    assert state is not None and state.frozen  # nothing thawed, nothing baked
    [stored] = daemon.store.alerts()
    assert stored.status == "resolved" and stored.ends_at is not None


async def test_a_firing_alert_and_its_resolution_are_two_records(
    client: httpx.AsyncClient, daemon: InProcessDaemon
) -> None:
    starts = "2030-01-02T03:04:05.123456789Z"
    await client.post("/api/v1/alertmanager", json=webhook(alert(starts_at=starts)))
    resolved = alert(starts_at=starts, status="resolved", ends_at="2030-01-02T03:05:00Z")
    await client.post("/api/v1/alertmanager", json=webhook(resolved))
    assert sorted(a.status for a in daemon.store.alerts()) == ["firing", "resolved"]


async def test_an_alert_that_fired_before_the_release_does_not_roll_it_back(
    client: httpx.AsyncClient, daemon: InProcessDaemon, log: Path
) -> None:
    now = time.time()
    daemon.release("api", "1.0.0", at=now - 1000)
    daemon.release("api", "2.0.0", at=now - 10, bake=False)
    old = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 600))
    response = await client.post(
        "/api/v1/alertmanager", json=webhook(alert(starts_at=old, **CRITICAL))
    )
    assert "this release did not cause it" in response.json()["alerts"][0]["outcome"]
    assert daemon.store.rollbacks() == []


@pytest.mark.faults
async def test_a_store_failure_is_503_so_alertmanager_retries(
    client: httpx.AsyncClient, daemon: InProcessDaemon
) -> None:
    daemon.store.close()
    response = await client.post("/api/v1/alertmanager", json=webhook(alert(**CRITICAL)))
    assert response.status_code == 503
    assert "retry" in response.json()["detail"]
    assert (await client.get("/api/v1/status")).status_code == 503
    assert (await client.get("/healthz")).status_code == 200


@pytest.mark.faults
async def test_an_alert_the_pipeline_could_not_record_is_handed_over_again(
    client: httpx.AsyncClient,
    daemon: InProcessDaemon,
    log: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = time.time()
    daemon.release("api", "1.0.0", at=now - 100)
    daemon.release("api", "2.0.0", at=now - 10, bake=False)
    real = daemon.pipeline.submit

    async def unrecorded(trigger: Any) -> Submission:
        return Submission("unrecorded", None, None, "state store failed: disk full")

    monkeypatch.setattr(daemon.pipeline, "submit", unrecorded)
    payload = webhook(alert(**CRITICAL))
    failed = await client.post("/api/v1/alertmanager", json=payload)
    assert failed.status_code == 503
    [stored] = daemon.store.alerts()
    assert stored.handled_at is None  # recorded, not yet handed over

    monkeypatch.setattr(daemon.pipeline, "submit", real)
    retried = await client.post("/api/v1/alertmanager", json=payload)
    assert retried.status_code == 200
    assert retried.json()["alerts"][0]["outcome"].startswith("executing")
    await daemon.pipeline.wait_idle()
    assert len(executions(log)) == 1


async def test_the_alert_history_route(client: httpx.AsyncClient) -> None:
    await client.post(
        "/api/v1/alertmanager",
        json=webhook(alert(**CRITICAL), alert("Other", fingerprint="aa")),
    )
    every = (await client.get("/api/v1/alerts")).json()["alerts"]
    assert [a["alertname"] for a in every] == ["Other", "ApiDown"]
    mapped = (await client.get("/api/v1/alerts", params={"service": "api"})).json()["alerts"]
    assert [a["fingerprint"] for a in mapped] == ["0123456789abcdef"]


# -- /metrics and /readyz -------------------------------------------------------------------


async def test_metrics_count_requests_by_route_template_and_alerts(
    client: httpx.AsyncClient,
) -> None:
    payload = webhook(alert(**CRITICAL), alert("Unmapped", fingerprint="ab"))
    await client.post("/api/v1/alertmanager", json=payload)
    await client.post("/api/v1/alertmanager", json=payload)
    await client.get("/api/v1/rollbacks/77")
    async with httpx.AsyncClient(
        transport=client._transport, base_url="http://rollbackd.test"
    ) as anonymous:
        await anonymous.get("/api/v1/status")
    text = (await client.get("/metrics")).text
    samples = {line.rsplit(" ", 1)[0]: line.rsplit(" ", 1)[1] for line in text.splitlines()}
    requests = "rollbackd_http_requests_total"
    alerts = "rollbackd_alerts_received_total"
    assert samples[f'{requests}{{code="200",method="POST",route="/api/v1/alertmanager"}}'] == "2.0"
    by_id = 'route="/api/v1/rollbacks/{rollback_id}"'
    assert samples[f'{requests}{{code="404",method="GET",{by_id}}}'] == "1.0"
    assert samples[f'{requests}{{code="401",method="GET",route="/api/v1/status"}}'] == "1.0"
    assert samples[f'{alerts}{{duplicate="false",matched="true",status="firing"}}'] == "1.0"
    assert samples[f'{alerts}{{duplicate="true",matched="false",status="firing"}}'] == "1.0"
    assert "rollbackd_http_request_duration_seconds_bucket" in text


async def test_readyz_names_the_failing_parts(
    client: httpx.AsyncClient, daemon: InProcessDaemon
) -> None:
    response = await client.get("/readyz")
    assert response.status_code == 503
    checks = response.json()["checks"]
    assert checks["config"]["ok"] and checks["store"]["ok"]
    assert not checks["prometheus"]["ok"]
    daemon.store.close()
    closed = (await client.get("/readyz")).json()["checks"]
    assert not closed["store"]["ok"]


def test_the_history_filter_knows_every_rollback_state() -> None:
    state = HistoryQuery.model_fields["state"].annotation
    [literal, _none] = typing.get_args(state)
    assert set(typing.get_args(literal)) == {s.value for s in RollbackState}
