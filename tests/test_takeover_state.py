"""A daemon that takes a service over judges on from what its previous holder recorded:
the check states it saved (pending or firing, since when) and the current version, not
what the new holder remembered of the service from its own start. Two engines on one real
PostgreSQL play the two daemons; the state is saved through the engine's own keeper.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from rollbackd.core.check_state import CheckState, Phase, SeriesState
from rollbackd.core.model import VersionSource
from rollbackd.prometheus import PrometheusClient
from rollbackd.runtime.engine import Engine
from rollbackd.store.check_state_codec import encode
from rollbackd.store.postgres import PostgresStore
from rollbackd.store.writer import writer_for
from support.configs import load_config, service
from support.postgres import Database

CHECK = '[[check]]\nname = "errors"\ntype = "query"\nquery = "vector(1)"\nabove = 0.5\n'
SINCE = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)


def firing() -> CheckState:
    series = SeriesState(
        phase=Phase.FIRING,
        pending_since=SINCE,
        firing_since=SINCE,
        breach_count=4,
        last_verdict=None,
        last_evaluated=SINCE,
        errors_held=0,
    )
    return CheckState(series={(("pod", "a"),): series})


async def test_a_service_taken_over_is_judged_from_its_previous_holders_state(
    postgres_database: Database, tmp_path: Path
) -> None:
    loaded = load_config(tmp_path, "http://127.0.0.1:9", {"api": service("api", CHECK)})
    client = PrometheusClient(loaded.config.prometheus)
    stores = [
        PostgresStore(postgres_database.url, password=postgres_database.password) for _ in range(2)
    ]
    old, new = (Engine(loaded, client, store) for store in stores)
    try:
        new.versions.keep_current_in_memory()
        assert new.check_state("api", "errors").phase is Phase.OK
        assert new.versions.current("api") is None  # read now, and kept in memory

        # Meanwhile the old holder saw a release and a breach, and saved both.
        await writer_for(stores[0]).record_version_change(
            "api", None, "2.0", 1000.0, VersionSource.API
        )
        check = loaded.services["api"].rules.check[0]
        await old.keeper.save(("api", "errors"), firing(), check.policy(), 1000.0)
        assert new.check_state("api", "errors").phase is Phase.OK  # not seen yet
        assert new.versions.current("api") is None

        new.take_over(["api"])
        taken = new.check_state("api", "errors")
        assert taken.phase is Phase.FIRING
        assert taken.series[(("pod", "a"),)].firing_since == SINCE
        assert new.versions.current("api") == "2.0"
    finally:
        for store in stores:
            writer_for(store).close()
            store.close()


@pytest.mark.parametrize("saved", [True, False])
async def test_a_service_taken_over_forgets_what_this_daemon_remembered_of_it(
    postgres_database: Database, tmp_path: Path, saved: bool
) -> None:
    """What the new holder had in memory from long ago (firing, say) is replaced by what
    the previous holder saved — or by a blank state when it saved none (the check was OK)."""
    loaded = load_config(tmp_path, "http://127.0.0.1:9", {"api": service("api", CHECK)})
    store = PostgresStore(postgres_database.url, password=postgres_database.password)
    engine = Engine(loaded, PrometheusClient(loaded.config.prometheus), store)
    try:
        engine.states[("api", "errors")] = firing()  # stale: from when it held api before
        if saved:
            blank_but_erring = encode(CheckState(series={}, error_count=2))
            store.save_check_state("api", "errors", blank_but_erring, 1.0)
        engine.take_over(["api"])
        state = engine.check_state("api", "errors")
        assert state.phase is Phase.OK
        assert state.error_count == (2 if saved else 0)
    finally:
        writer_for(store).close()
        store.close()
