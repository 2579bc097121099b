"""Alert-only services (``[[alert]]`` mappings, no rollback checks) bake from the absence of
their mapped alerts, read from a real Alertmanager's API (``[alertmanager] url``), over polls
in which Alertmanager answered. A mapped alert firing -- active in Alertmanager, or delivered
to the webhook and not resolved -- restarts the bake clock, so a bad release whose alert
fires never becomes the last known good. Without Alertmanager to read, such a service never
bakes by itself, status says so, and CI can vouch for a release (``known_good=true``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from rollbackd.alertmanager import (
    ALERTS_PARAMS,
    ALERTS_PATH,
    AlertmanagerReader,
    AlertsRead,
    reading_for,
)
from rollbackd.api.app import create_app
from rollbackd.config.loader import load
from rollbackd.config.settings import AlertmanagerSection, Config
from rollbackd.core.samples import Verdict
from rollbackd.prometheus import PrometheusClient
from rollbackd.runtime.control import Control
from rollbackd.runtime.engine import Engine
from rollbackd.runtime.pipeline import Pipeline
from rollbackd.runtime.runner import Runner
from rollbackd.store.sqlite import Store
from support.alertmanager import AlertmanagerServer, alertmanager_available
from support.configs import write_config
from support.daemon_process import alert_service, set_mode
from support.hostile_http import HungServer, RecordingServer, Reply, always, closed_port, json_reply
from support.prometheus import free_port, poll

TOKEN = "alert-only-token-0123456789"
BAKE = 60
MAPPED = {"alertname": "ShopDown", "service": "shop"}


def shop_rules(log: Path) -> str:
    return alert_service(
        "shop",
        log,
        alertname="ShopDown",
        matchers=['service="shop"'],
        header=f'bake_time = "{BAKE}s"',
    )


class Shop:
    """An engine, its pipeline and its API for the alert-only service ``shop``."""

    def __init__(self, directory: Path, *, alertmanager_url: str | None, mode: str = "auto"):
        directory.mkdir(parents=True, exist_ok=True)
        extra = f'[alertmanager]\nurl = "{alertmanager_url}"\ntimeout = "2s"\n'
        config = write_config(
            directory,
            "http://127.0.0.1:9",  # no check: Prometheus is never asked
            {"shop": shop_rules(directory / "rollbacks.jsonl")},
            extra=extra if alertmanager_url else "",
        )
        set_mode(config, mode)
        self.loaded = load(config)
        self.service = self.loaded.services["shop"]
        self.store = Store(directory / "state.db")
        self.engine = Engine(
            self.loaded, PrometheusClient(self.loaded.config.prometheus), self.store
        )
        self.pipeline = Pipeline(self.engine)
        self.runner = Runner(self.engine, self.pipeline.on_fire)
        self.now = time.time()
        self.app = create_app(
            control=Control(self.pipeline),
            registry=CollectorRegistry(),
            token=TOKEN,
            max_body=65536,
            clock=lambda: self.now,
        )

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app),
            base_url="http://rollbackd.test",
            headers={"Authorization": f"Bearer {TOKEN}"},
        )

    async def release(self, version: str, **meta: str) -> dict[str, Any]:
        async with self.client() as client:
            answer = await client.post(
                "/api/v1/releases", json={"service": "shop", "version": version, "meta": meta}
            )
        assert answer.status_code == 200, answer.text
        found: dict[str, Any] = answer.json()
        return found

    async def webhook(self, status: str, starts_at: str) -> None:
        payload = {
            "version": "4",
            "receiver": "rollbackd",
            "status": status,
            "alerts": [
                {
                    "status": status,
                    "labels": MAPPED,
                    "annotations": {"summary": "the shop is down"},
                    "startsAt": starts_at,
                    "endsAt": starts_at if status == "resolved" else "0001-01-01T00:00:00Z",
                    "generatorURL": "",
                    "fingerprint": "5b0e6cb6f0a1c2d3",
                }
            ],
            "groupLabels": {},
            "commonLabels": {},
            "commonAnnotations": {},
            "externalURL": "http://alertmanager.test",
            "groupKey": '{}:{alertname="ShopDown"}',
            "truncatedAlerts": 0,
        }
        async with self.client() as client:
            answer = await client.post("/api/v1/alertmanager", json=payload)
        assert answer.status_code == 200, answer.text

    async def bake_at(self, *offsets: float) -> list[str | None]:
        """A service poll at each of ``now + offset``; ``now`` moves to the last."""
        start = self.now
        baked = []
        for offset in offsets:
            self.now = start + offset
            baked.append(await self.engine.bake(self.service, self.now))
        return baked

    async def bake_status(self) -> dict[str, str]:
        async with self.client() as client:
            answer = await client.get("/api/v1/status")
        assert answer.status_code == 200, answer.text
        [shop] = answer.json()["services"]
        bake: dict[str, str] = shop["bake"]
        return bake

    def baked_at(self, version: str) -> float | None:
        record = self.store.version("shop", version)
        assert record is not None
        return record.baked_at

    def close(self) -> None:
        self.store.close()
        self.engine.client.close()


@pytest.fixture
def shops() -> Iterator[list[Shop]]:
    made: list[Shop] = []
    yield made
    for shop in made:
        shop.close()


@pytest.fixture
def alertmanager(tmp_path: Path) -> Iterator[AlertmanagerServer]:
    if not alertmanager_available():
        pytest.skip("the 'prometheus-alertmanager' binary is not on PATH (Debian package)")
    credentials = tmp_path / "am-token"
    credentials.write_text(TOKEN)
    with AlertmanagerServer(
        tmp_path / "alertmanager",
        webhook_url=f"http://127.0.0.1:{free_port()}/api/v1/alertmanager",
        credentials_file=credentials,
    ) as server:
        yield server


def active(alertmanager: AlertmanagerServer) -> list[dict[str, str]]:
    answer = httpx.get(f"{alertmanager.url}{ALERTS_PATH}", params=ALERTS_PARAMS, timeout=5)
    answer.raise_for_status()
    return [a["labels"] for a in answer.json()]


def fire(alertmanager: AlertmanagerServer, labels: dict[str, str]) -> None:
    alertmanager.post_alerts([{"labels": labels, "annotations": {"summary": "down"}}])
    poll(lambda: labels in active(alertmanager), timeout=10, what=f"{labels} to be active")


def resolve(alertmanager: AlertmanagerServer, labels: dict[str, str]) -> None:
    past = datetime.fromtimestamp(time.time() - 1, tz=UTC).isoformat()
    alertmanager.post_alerts([{"labels": labels, "endsAt": past}])
    poll(lambda: labels not in active(alertmanager), timeout=10, what=f"{labels} to resolve")


async def test_a_healthy_version_bakes_while_no_mapped_alert_is_active(
    tmp_path: Path, alertmanager: AlertmanagerServer, shops: list[Shop]
) -> None:
    # An alert of another service with the same name is not the shop's.
    fire(alertmanager, {"alertname": "ShopDown", "service": "warehouse"})
    shop = Shop(tmp_path / "shop", alertmanager_url=alertmanager.url)
    shops.append(shop)
    await shop.release("1.0.0")
    assert await shop.bake_at(0, 20, 40) == [None, None, None]
    assert await shop.bake_status() == {
        "state": "baking",
        "summary": "baking: 40s of 1m, evidence ok",
    }
    assert await shop.bake_at(21) == ["1.0.0"]
    assert shop.baked_at("1.0.0") == shop.now
    await shop.release("1.1.0")
    assert shop.engine.versions.last_known_good("shop") == "1.0.0"


async def test_a_bad_release_whose_alert_fires_never_becomes_the_last_known_good(
    tmp_path: Path, alertmanager: AlertmanagerServer, shops: list[Shop]
) -> None:
    shop = Shop(tmp_path / "shop", alertmanager_url=alertmanager.url, mode="dry-run")
    shops.append(shop)
    await shop.release("1.0.0", known_good="true")
    await shop.release("2.0.0")
    fire(alertmanager, MAPPED)
    assert await shop.bake_at(*range(0, 181, 15)) == [None] * 13
    assert shop.baked_at("2.0.0") is None
    state = shop.store.service_state("shop")
    assert state is not None and state.healthy_since is None  # the clock never runs
    assert await shop.bake_status() == {
        "state": "not_baking",
        "summary": "not baking: alert ShopDown active in Alertmanager",
    }
    await shop.release("3.0.0")
    assert shop.engine.versions.last_known_good("shop") == "1.0.0"

    # Once the alert is over, the clock runs again, from then.
    await shop.release("2.0.0")
    assert await shop.bake_at(15) == [None]
    resolve(alertmanager, MAPPED)
    assert await shop.bake_at(15, 30, 75) == [None, None, "2.0.0"]


async def test_a_version_does_not_bake_while_alertmanager_is_unreachable(
    tmp_path: Path, shops: list[Shop]
) -> None:
    with closed_port() as url:
        shop = Shop(tmp_path / "shop", alertmanager_url=url)
        shops.append(shop)
        await shop.release("1.0.0")
        assert await shop.bake_at(0, 20, 40, 60) == [None] * 4
    assert shop.baked_at("1.0.0") is None
    bake = await shop.bake_status()
    assert bake["state"] == "not_baking"
    assert bake["summary"].startswith(
        "not baking: alerts clear in 0 of 4 Alertmanager reads (4 unreadable: "
    )


async def test_a_webhook_alert_still_firing_restarts_the_clock(
    tmp_path: Path, alertmanager: AlertmanagerServer, shops: list[Shop]
) -> None:
    """Delivered to the webhook and not resolved: firing, whatever Alertmanager's API says
    now (here: nothing active)."""
    shop = Shop(tmp_path / "shop", alertmanager_url=alertmanager.url, mode="dry-run")
    shops.append(shop)
    await shop.release("1.0.0")
    assert await shop.bake_at(0, 30) == [None, None]
    starts = datetime.fromtimestamp(shop.now, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    await shop.webhook("firing", starts)
    assert await shop.bake_at(31, 90, 120) == [None, None, None]
    assert await shop.bake_status() == {
        "state": "not_baking",
        "summary": "not baking: alert ShopDown firing",
    }
    await shop.webhook("resolved", starts)
    assert await shop.bake_at(15, 30, 60) == [None, None, None]
    assert await shop.bake_at(16) == ["1.0.0"]


async def test_without_alertmanager_it_never_bakes_but_ci_can_vouch_for_a_release(
    tmp_path: Path, shops: list[Shop]
) -> None:
    shop = Shop(tmp_path / "shop", alertmanager_url=None)
    shops.append(shop)
    await shop.release("1.0.0")
    assert await shop.bake_at(*range(0, 3601, 600)) == [None] * 7
    assert shop.baked_at("1.0.0") is None
    bake = await shop.bake_status()
    assert bake["state"] == "no_evidence"
    assert bake["summary"].startswith("no evidence: alert-only service and no [alertmanager] url")
    await shop.release("1.1.0")
    assert shop.engine.versions.last_known_good("shop") is None

    answer = await shop.release("1.2.0", known_good="true", commit="abc123")
    assert answer["changed"] is True
    assert shop.baked_at("1.2.0") == shop.now
    assert (await shop.bake_status())["state"] == "baked"
    [event] = shop.store.events(service="shop", types=["version.baked"])
    assert event.data == {"version": "1.2.0", "source": "api", "known_good": True}
    await shop.release("1.3.0")
    assert shop.engine.versions.last_known_good("shop") == "1.2.0"


# -- the reader, against servers that misbehave --------------------------------------------


def reader(url: str, **keys: Any) -> AlertmanagerReader:
    return AlertmanagerReader(AlertmanagerSection(url=url, **keys))


async def test_a_read_asks_for_every_unresolved_alert_with_the_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AM_TEST_TOKEN", "s3cret-token")
    answer = json_reply(200, [{"labels": MAPPED, "status": {"state": "suppressed"}}])
    with RecordingServer(always(answer)) as server:
        read = await reader(server.url + "/", bearer_token_env="AM_TEST_TOKEN").read(100.0)
        [request] = server.requests
    assert read == AlertsRead(100.0, (MAPPED,))
    assert request.path == "/api/v2/alerts"
    assert {k: v[-1] for k, v in request.query.items()} == ALERTS_PARAMS
    assert request.headers["authorization"] == "Bearer s3cret-token"


async def test_reads_of_one_poll_round_share_one_request() -> None:
    with RecordingServer(always(json_reply(200, []))) as server:
        shared = reader(server.url)
        await asyncio.gather(*(shared.read(100.0) for _ in range(5)))
        await shared.read(100.5)
        assert server.count == 1
        await shared.read(115.0)
        assert server.count == 2


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (json_reply(200, {"status": "success"}), "unexpected answer: expected a list of alerts"),
        (json_reply(200, [{"labels": {"alertname": 3}}]), "unexpected answer: alert 0 has no"),
        (Reply(200, b"<html>", "text/html"), "unexpected answer: "),
        (Reply(503, b"overloaded", "text/plain"), "HTTP 503: overloaded"),
        (None, "RemoteProtocolError: "),
    ],
)
async def test_a_bad_answer_is_a_gap_never_a_clear_read(reply: Reply | None, error: str) -> None:
    with RecordingServer(always(reply)) as server:
        read = await reader(server.url).read(100.0)
    assert read.alerts == ()
    assert read.error is not None and read.error.startswith(error)
    assert reading_for(read, ()).verdict is Verdict.ERROR


async def test_a_hung_alertmanager_is_given_up_on_in_time() -> None:
    with HungServer() as hung:
        read = await reader(hung.url, timeout="200ms").read(100.0)
    assert read.error == "no answer within 0.2s"


def test_the_alertmanager_section() -> None:
    assert Config.from_toml_data({}).alertmanager.url is None
    section = Config.from_toml_data({"alertmanager": {"url": "http://am:9093/"}}).alertmanager
    assert (section.url, section.timeout.total_seconds()) == ("http://am:9093", 10.0)
    for bad in (
        {"url": "am:9093"},
        {"url": "http://am", "bearer_token_file": "/t", "bearer_token_env": "T"},
        {"url": "http://am", "bearer_token": "inline"},
    ):
        with pytest.raises(ValidationError):
            Config.from_toml_data({"alertmanager": bad})
