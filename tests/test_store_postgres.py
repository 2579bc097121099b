"""PostgreSQL as the state store, beyond the shared contract (test_store_contract.py runs
that on both backends): the test server itself, the ``[store]`` config section as
``rollbackd check`` reports it, ``daemon.open_store``'s choice, and ``rollbackd run`` keeping
its state in a real PostgreSQL, and saying so on /readyz when that PostgreSQL stops."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from rollbackd.config.loader import Problem, load, validate
from rollbackd.core.model import VersionSource
from rollbackd.daemon import open_store
from rollbackd.store.errors import StoreError
from rollbackd.store.postgres import PostgresStore
from rollbackd.store.sqlite import Store
from support.configs import write_config
from support.daemon_process import DaemonProcess, alert_service, run_cli
from support.postgres import ROLE, Database, PostgresServer
from support.prometheus import PrometheusFactory, poll

SECRET = "s3cret-in-the-url"


def store_section(database: Database, *, password_file: Path | None = None) -> str:
    return (
        f'\n[store]\nurl = "{database.url}"\n'
        f'password_file = "{password_file or database.password_file}"\n'
    )


def config_with(directory: Path, extra: str, prometheus_url: str = "http://127.0.0.1:9") -> Path:
    rules = {"api": alert_service("api", directory / "runs.jsonl", alertname="ApiDown")}
    return write_config(directory, prometheus_url, rules, extra=extra)


def problems_of(config: Path) -> dict[str, str]:
    loaded, problems = validate(config)
    assert loaded is None
    return {str(p.field): p.message for p in problems}


# --- the test server -------------------------------------------------------------------


def test_the_test_server_takes_the_role_only_with_its_password(
    postgres_database: Database,
) -> None:
    assert postgres_database.password_file.read_text().strip() == postgres_database.password
    with psycopg.connect(postgres_database.url, password=postgres_database.password) as conn:
        row = conn.execute(
            "SELECT current_user, pg_get_userbyid(datdba) FROM pg_database "
            "WHERE datname = current_database()"
        ).fetchone()
    assert row == (ROLE, ROLE)  # connected as the role, which owns the database
    with pytest.raises(psycopg.OperationalError, match="no password supplied"):
        psycopg.connect(postgres_database.url, connect_timeout=5)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(postgres_database.url, password="wrong", connect_timeout=5)


# --- [store] in the config -------------------------------------------------------------


def test_without_a_store_section_the_state_is_sqlite_under_state_dir(tmp_path: Path) -> None:
    loaded = load(config_with(tmp_path, ""))
    assert loaded.config.store is None
    store = open_store(loaded)
    try:
        assert isinstance(store, Store)
        assert store.location == str(tmp_path / "state" / "state.db")
    finally:
        store.close()


def test_a_store_url_must_be_postgresql(tmp_path: Path) -> None:
    config = config_with(tmp_path, '\n[store]\nurl = "mysql://rollbackd@db/rollbackd"\n')
    assert problems_of(config) == {"store.url": "must be a postgresql:// (or postgres://) URL"}


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://rollbackd:{SECRET}@db.internal/rollbackd",
        f"postgres://rollbackd@db.internal/rollbackd?sslmode=require&password={SECRET}",
    ],
)
def test_a_password_in_the_url_is_refused_without_repeating_it(tmp_path: Path, url: str) -> None:
    loaded, problems = validate(config_with(tmp_path, f'\n[store]\nurl = "{url}"\n'))
    assert loaded is None
    [problem] = problems
    assert problem.field == "store.url"
    assert "password_file" in problem.message
    assert SECRET not in str(problem)


def test_a_password_key_is_refused_with_where_the_password_goes(tmp_path: Path) -> None:
    config = config_with(
        tmp_path, '\n[store]\nurl = "postgresql://rollbackd@db/rollbackd"\npassword = "x"\n'
    )
    assert problems_of(config) == {
        "store.password": "the password is a secret: set 'password_file' or 'password_env'"
    }


def test_two_password_sources_are_refused(tmp_path: Path) -> None:
    config = config_with(
        tmp_path,
        '\n[store]\nurl = "postgresql://rollbackd@db/rollbackd"\n'
        'password_file = "/etc/rollbackd/store-password"\npassword_env = "PGPASS"\n',
    )
    assert problems_of(config) == {"store": "set at most one of 'password_file' or 'password_env'"}


def test_rollbackd_check_reports_a_bad_store_with_its_field_path(tmp_path: Path) -> None:
    config = config_with(tmp_path, '\n[store]\nurl = "sqlite:///var/lib/rollbackd/state.db"\n')
    result = run_cli("check", "-c", str(config))
    assert result.returncode == 1
    expected = Problem(
        str(config), "must be a postgresql:// (or postgres://) URL", field="store.url"
    )
    assert str(expected) in result.stderr.splitlines()


def test_the_environment_can_set_the_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROLLBACKD_STORE__URL", "postgresql://rollbackd@db/rollbackd")
    monkeypatch.setenv("ROLLBACKD_STORE__PASSWORD_ENV", "ROLLBACKD_DB_PASSWORD")
    store = load(config_with(tmp_path, "")).config.store
    assert store is not None
    assert (store.url, store.password_env) == (
        "postgresql://rollbackd@db/rollbackd",
        "ROLLBACKD_DB_PASSWORD",
    )


# --- open_store ------------------------------------------------------------------------


def test_open_store_opens_postgres_with_the_password_file(
    postgres_database: Database, tmp_path: Path
) -> None:
    store = open_store(load(config_with(tmp_path, store_section(postgres_database))))
    try:
        assert isinstance(store, PostgresStore)
        assert store.location == postgres_database.url
        assert store.writable()
    finally:
        store.close()
    assert not (tmp_path / "state" / "state.db").exists()


def test_open_store_with_an_unreadable_password_file_is_a_store_error(
    postgres_database: Database, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-password"
    loaded = load(config_with(tmp_path, store_section(postgres_database, password_file=missing)))
    with pytest.raises(StoreError, match="no-such-password"):
        open_store(loaded)


def test_the_daemon_refuses_to_start_when_postgres_refuses_the_password(
    postgres_database: Database, tmp_path: Path
) -> None:
    wrong = tmp_path / "wrong-password"
    wrong.write_text("not-the-password\n")
    config = config_with(tmp_path, store_section(postgres_database, password_file=wrong))
    result = run_cli("run", "-c", str(config), timeout=60)
    assert result.returncode == 1
    assert "cannot open the state store" in result.stderr
    assert "not-the-password" not in result.stderr + result.stdout


# --- rollbackd run on PostgreSQL -------------------------------------------------------


def readyz(daemon: DaemonProcess) -> tuple[int, dict[str, Any]]:
    response = httpx.get(f"{daemon.url}/readyz", timeout=10)
    body: dict[str, Any] = response.json()
    return response.status_code, body


def await_ready(daemon: DaemonProcess, ready: bool, what: str) -> dict[str, Any]:
    """Poll /readyz until its ``ready`` is ``ready``; returns that answer."""
    answer: dict[str, Any] = {}

    def reached() -> bool:
        nonlocal answer
        daemon.assert_alive()
        status, answer = readyz(daemon)
        assert status == (200 if answer["ready"] else 503)
        return answer["ready"] is ready

    poll(reached, timeout=30, interval=0.1, what=what)
    return answer


def test_the_daemon_keeps_its_state_in_postgres(
    postgres_database: Database, prometheus_factory: PrometheusFactory, tmp_path: Path
) -> None:
    prometheus = prometheus_factory()
    config = config_with(tmp_path, store_section(postgres_database), prometheus.url)
    with DaemonProcess(config) as daemon:
        answer = await_ready(daemon, True, "/readyz to say ready")
        assert answer["checks"]["store"] == {
            "ok": True,
            "detail": f"{postgres_database.url} is writable",
        }
        with daemon.http() as http:
            response = http.post(
                "/api/v1/releases",
                json={"service": "api", "version": "2.0", "meta": {"commit": "abc123"}},
            )
        assert response.status_code == 200, response.text
        assert response.json()["changed"] is True
    assert not daemon.db.exists()  # no SQLite file beside the PostgreSQL state
    store = PostgresStore(postgres_database.url, password=postgres_database.password)
    try:
        record = store.version("api", "2.0")
        assert record is not None
        assert record.meta == {"commit": "abc123"}
        assert [c.to_version for c in store.version_changes("api")] == ["2.0"]
    finally:
        store.close()


def test_readyz_names_the_store_while_postgres_is_stopped(
    prometheus_factory: PrometheusFactory, tmp_path: Path
) -> None:
    prometheus = prometheus_factory()
    with PostgresServer() as server:
        database = server.create_database("rollbackd")
        config = config_with(tmp_path, store_section(database), prometheus.url)
        with DaemonProcess(config) as daemon:
            await_ready(daemon, True, "/readyz to say ready")
            server.stop()
            answer = await_ready(daemon, False, "/readyz to notice PostgreSQL stopped")
            store = answer["checks"]["store"]
            assert store["ok"] is False
            assert store["detail"].startswith(f"cannot write {database.url}")
            assert database.password not in json.dumps(answer)
            assert answer["checks"]["prometheus"]["ok"] is True  # only the store is down
            assert httpx.get(f"{daemon.url}/healthz", timeout=5).status_code == 200
            server.start()
            await_ready(daemon, True, "/readyz to say ready once PostgreSQL is back")


def test_reads_fail_at_once_while_postgres_is_down_and_work_again_once_it_is_back() -> None:
    """A read that cannot reach the server fails with a StoreError naming the database; the
    reads after it fail the same way without trying (the event loop makes reads, and must
    not wait on each), and once the server is back reads succeed again."""
    with PostgresServer() as server:
        database = server.create_database("rollbackd")
        store = PostgresStore(database.url, password=database.password)
        try:
            store.record_version_change("api", None, "1.0", 100.0, VersionSource.API)
            server.stop()
            with pytest.raises(StoreError) as first:
                store.versions("api")
            assert str(first.value).startswith(f"state database {database.url}")
            with pytest.raises(StoreError) as second:
                store.versions("api")
            assert str(second.value) == str(first.value)  # the same failure, not a new try
            server.start()

            def reads() -> bool:
                try:
                    return [v.version for v in store.versions("api")] == ["1.0"]
                except StoreError:
                    return False

            poll(reads, timeout=60, interval=0.2, what="reads to work once PostgreSQL is back")
        finally:
            store.close()
