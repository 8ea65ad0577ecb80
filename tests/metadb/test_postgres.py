"""What only a shared MetaDB has to get right: many processes writing at once, and PostgreSQL
going away and coming back. Each "gateway" here is its own PostgresMetaDB with its own pool."""

from __future__ import annotations

import asyncio
import time

import pytest

from hutch.errors import AlreadyExists, InvalidArgument, QuotaExceeded, Unavailable
from hutch.metadb import open_metadb
from hutch.metadb.postgres import MIGRATIONS, PostgresMetaDB
from hutch.metadb.records import Tenant
from hutch.tenants import DEFAULT_TENANT, TenantService
from tests.metadb.test_metadb import session
from tests.postgres import PostgresServer, create_database, postgres_bindir


@pytest.fixture
def database(postgres_server):
    return asyncio.run(create_database(postgres_server))


async def _gateways(url: str, count: int) -> list[PostgresMetaDB]:
    dbs = [PostgresMetaDB(url) for _ in range(count)]
    await asyncio.gather(*(db.open() for db in dbs))  # migrating together: once, under the lock
    return dbs


def test_processes_starting_together_migrate_once(database):
    async def main():
        dbs = await _gateways(database, 6)
        versions = [await db.schema_version() for db in dbs]
        await asyncio.gather(*(db.close() for db in dbs))
        return versions

    assert asyncio.run(main()) == [len(MIGRATIONS)] * 6


def test_processes_starting_together_on_a_fresh_metadb_make_one_default_tenant_and_key(database):
    async def main():
        dbs = await _gateways(database, 4)
        services = [TenantService(db) for db in dbs]
        printed = await asyncio.gather(*(service.bootstrap("the-operators-key") for service in services))
        tenants = await dbs[0].list_tenants()
        found = await services[1].authenticate("the-operators-key")
        await asyncio.gather(*(db.close() for db in dbs))
        return printed, tenants, found

    printed, tenants, found = asyncio.run(main())
    assert printed == [None] * 4  # the key was given: nothing to print
    assert [t.tenant_id for t in tenants] == [DEFAULT_TENANT] and found.tenant_id == DEFAULT_TENANT


def test_gateways_racing_on_the_first_request_of_a_key_end_with_one_session(database):
    async def main():
        dbs = await _gateways(database, 4)
        await dbs[0].create_tenant(Tenant("t1", "one", time.time()))
        outcomes = []
        for round_ in range(10):
            key = f"key-{round_}"
            results = await asyncio.gather(
                *(db.insert_session(session(internal=key)) for db in dbs for _ in range(3)), return_exceptions=True
            )
            winners = [r for r in results if r is None]
            assert all(isinstance(r, AlreadyExists) for r in results if r is not None), results
            active = await dbs[1].active_session(key)
            outcomes.append((len(winners), active is not None))
        await asyncio.gather(*(db.close() for db in dbs))
        return outcomes

    assert asyncio.run(main()) == [(1, True)] * 10


def test_racing_gateways_cannot_both_take_the_last_quota_slot(database):
    async def main():
        dbs = await _gateways(database, 4)
        await dbs[0].create_tenant(Tenant("t1", "one", time.time()))
        results = await asyncio.gather(
            *(db.insert_session(session(), max_active=5) for db in dbs for _ in range(5)), return_exceptions=True
        )
        count = await dbs[0].count_active("t1")
        await asyncio.gather(*(db.close() for db in dbs))
        return results, count

    results, count = asyncio.run(main())
    assert count == 5
    assert sum(r is None for r in results) == 5
    assert all(isinstance(r, QuotaExceeded) for r in results if r is not None)


def test_the_url_selects_the_backend_and_bad_urls_are_clear_errors(database, tmp_path):
    assert isinstance(open_metadb(database, tmp_path), PostgresMetaDB)
    with pytest.raises(InvalidArgument, match="unsupported MetaDB URL"):
        open_metadb("mysql://x/y", tmp_path)
    with pytest.raises(Unavailable, match=r"cannot reach the MetaDB at postgresql://u:\*\*\*@127.0.0.1:1/x"):
        asyncio.run(PostgresMetaDB("postgresql://u:secret@127.0.0.1:1/x").open())
    missing = database.rsplit("/", 1)[0] + "/no_such_database"
    with pytest.raises(InvalidArgument, match="does not exist"):
        asyncio.run(PostgresMetaDB(missing).open())


async def _until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


@pytest.mark.skipif(postgres_bindir() is None, reason="PostgreSQL is not installed")
def test_a_postgres_restart_is_unavailable_in_between_and_then_works_again():
    server = PostgresServer()
    server.init()
    server.start()

    async def main():
        db = PostgresMetaDB(await create_database(server.url), min_connections=2)
        await db.open()
        await db.create_tenant(Tenant("t1", "one", time.time()))
        notices: list = []
        await db.watch(notices.append)
        server.stop()
        with pytest.raises(Unavailable, match="MetaDB is unreachable"):
            await db.get_tenant("t1")
        with pytest.raises(Unavailable):
            await db.insert_session(session())
        server.start()
        # The pool replaces the connections that died with the old server.
        for _ in range(3):
            assert (await db.get_tenant("t1")).name == "one"
        await db.insert_session(session(internal="after"))
        assert (await db.active_session("after")) is not None
        # The notice listener came back by itself and said that it may have missed some.
        await _until(lambda: None in notices)
        await db.announce("after")
        await _until(lambda: "after" in notices)
        await db.close()

    try:
        asyncio.run(main())
    finally:
        server.remove()
