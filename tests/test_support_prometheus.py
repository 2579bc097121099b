"""The test support itself: a real Prometheus scrapes the fake service and sees it change."""

from __future__ import annotations

import httpx
import pytest

from support.fake_service import FakeService
from support.prometheus import (
    PrometheusFactory,
    QueryError,
    Result,
    ScrapeTarget,
    by_label,
    sample_value,
)

pytestmark = pytest.mark.prometheus


def versions(result: Result) -> set[str]:
    return {sample["metric"]["version"] for sample in result}


def test_scrapes_the_fake_service_and_sees_a_new_version(
    prometheus_factory: PrometheusFactory, fake_service: FakeService
) -> None:
    prometheus = prometheus_factory(
        targets=[ScrapeTarget(fake_service.address, job="checkout", labels={"env": "test"})]
    )
    build = 'app_build_info{service="checkout", job="checkout", env="test"}'
    first = prometheus.wait_for(build, lambda r: versions(r) == {"1.0.0"})
    assert sample_value(first[0]) == 1

    fake_service.update(version="2.0.0", error_ratio=0.5)
    # The old version's app_build_info goes stale at the next scrape.
    prometheus.wait_for(build, lambda r: versions(r) == {"2.0.0"})
    # 2.0.0's error counter grows: its series appear and then increase.
    errors = 'http_requests_total{service="checkout", version="2.0.0", code="500"}'
    prometheus.wait_for(errors, lambda r: bool(r) and sample_value(r[0]) > 0)
    # 1.0.0 served no errors; its counters stay exposed.
    old = by_label(prometheus.vector('http_requests_total{version="1.0.0"}'), "code")
    assert old["500"] == 0
    assert old["200"] > 0


def test_reload_adds_a_target_and_restart_keeps_the_data(
    prometheus_factory: PrometheusFactory, fake_service: FakeService
) -> None:
    prometheus = prometheus_factory()
    assert prometheus.vector("app_build_info") == []

    prometheus.targets.append(ScrapeTarget(fake_service.address, job="checkout"))
    prometheus.reload()
    seen = prometheus.wait_for('app_build_info{job="checkout"}')
    scraped_at = float(seen[0]["value"][0])
    url = prometheus.url

    prometheus.restart()
    assert prometheus.url == url
    again = prometheus.vector('app_build_info{job="checkout"}', time=scraped_at)
    assert versions(again) == {"1.0.0"}

    prometheus.kill()
    assert not prometheus.running
    prometheus.start()
    prometheus.wait_ready()
    assert versions(prometheus.vector("app_build_info", time=scraped_at)) == {"1.0.0"}


def test_query_errors_carry_prometheus_message(prometheus_factory: PrometheusFactory) -> None:
    prometheus = prometheus_factory()
    with pytest.raises(QueryError, match="parse error"):
        prometheus.query("sum(")


def test_fake_service_control_endpoint(fake_service: FakeService) -> None:
    with httpx.Client(base_url=fake_service.url) as client:
        state = client.post("/control", json={"version": "3.1.0", "latency_seconds": 0.7})
        assert state.status_code == 200
        assert state.json()["version"] == "3.1.0"
        assert fake_service.latency_seconds == 0.7
        assert client.get("/control").json()["version"] == "3.1.0"
        assert client.post("/control", json={"error_ratio": 2}).status_code == 400
        assert client.post("/control", json={"colour": "red"}).status_code == 400
        metrics = client.get("/metrics").text
    assert 'app_build_info{service="checkout",version="3.1.0"} 1' in metrics
    assert 'http_request_duration_seconds_bucket{service="checkout",version="3.1.0",le="0.5"}' in (
        metrics
    )
