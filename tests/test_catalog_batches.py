"""Concurrent adds share one transaction: each item is still accepted or refused on its own.

Adds started together (one asyncio.gather) are queued before the first batch commits, so they
land in the same batch. Run against every catalog engine: SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import errno
import os
import threading
import time
import uuid
from typing import Any
from urllib.parse import urlsplit

import pytest
import sqlalchemy

from metalake.server.catalog import DataRecord, DuplicateRequestError, SqlCatalog
from metalake.server.catalog import items as catalog_items
from metalake.server.errors import LimitReached, NotFound, Unavailable
from metalake.server.schema_versions import engine_url
from tests.tcpproxy import TcpProxy
from tests.test_catalog import ORG, record


async def _outcomes(catalog: SqlCatalog, *items: DataRecord) -> list[BaseException | None]:
    return list(
        await asyncio.gather(*(catalog.add(item) for item in items), return_exceptions=True)
    )


async def test_an_item_that_breaks_a_constraint_fails_alone(catalog: SqlCatalog) -> None:
    stored = record()
    await catalog.add(stored)
    before, after = record(tags=("a",)), record(request_id="r-after")
    clash = record(id=stored.id, filename="clash.jpg")  # the primary key is taken
    outcomes = await _outcomes(catalog, before, clash, after)
    assert outcomes[0] is None
    assert outcomes[2] is None
    assert isinstance(outcomes[1], sqlalchemy.exc.IntegrityError)
    assert await catalog.get(ORG, before.id) == before
    assert await catalog.get(ORG, after.id) == after
    assert await catalog.get(ORG, stored.id) == stored
    # Only the stored items were counted, and only their events recorded.
    assert (await catalog.organization(ORG)).used_bytes == 3 * stored.size
    events = await catalog.events_after(ORG, 0, filter="", limit=10)
    assert [e.record.id for e in events] == [stored.id, before.id, after.id]


async def test_an_item_whose_step_before_commit_fails_is_refused_alone(
    catalog: SqlCatalog,
) -> None:
    """`before_commit` (a blob made durable) runs before its item commits; when it raises, that
    item is refused with its error and nothing of it is stored; the batch's others commit."""
    steps: list[str] = []
    ok, failing, plain = record(), record(), record()

    def durable(item: DataRecord) -> None:
        # Not committed yet: the step runs before the row exists.
        with pytest.raises(NotFound):
            catalog._get(ORG, item.id)
        steps.append(item.id)

    def full_disk() -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    outcomes = await asyncio.gather(
        catalog.add(ok, before_commit=lambda: durable(ok)),
        catalog.add(failing, before_commit=full_disk),
        catalog.add(plain),
        return_exceptions=True,
    )
    assert outcomes[0] is None
    assert outcomes[2] is None
    # As a full disk is answered anywhere: RESOURCE_EXHAUSTED, the OSError its cause.
    assert isinstance(outcomes[1], LimitReached)
    assert isinstance(outcomes[1].__cause__, OSError)
    assert steps == [ok.id]
    assert await catalog.get(ORG, ok.id) == ok
    assert await catalog.get(ORG, plain.id) == plain
    page = await catalog.list_page(ORG, filter="", order_by="", page_size=10, page_token="")
    assert failing.id not in [r.id for r in page.records]
    assert (await catalog.organization(ORG)).used_bytes == 2 * ok.size


async def test_an_add_cancelled_before_its_batch_commits_nothing(catalog: SqlCatalog) -> None:
    """A client that went away before its item was taken into a batch: nothing of it commits."""
    entered, release = threading.Event(), threading.Event()
    first, cancelled = record(), record(request_id="r-cancelled")

    def held() -> None:
        entered.set()
        release.wait(10)

    # The first add's batch holds the flusher, so the second waits, untaken, until cancelled.
    holding = asyncio.create_task(catalog.add(first, before_commit=held))
    assert await asyncio.to_thread(entered.wait, 10)
    waiting = asyncio.create_task(catalog.add(cancelled))
    await asyncio.sleep(0.05)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    release.set()
    await holding
    assert await catalog.find_request(ORG, "r-cancelled") is None
    assert (await catalog.organization(ORG)).used_bytes == first.size


async def test_an_add_cancelled_while_its_blob_is_made_durable_commits_nothing(
    catalog: SqlCatalog,
) -> None:
    """Cancelled while its batch runs its step: the item does not commit, and the cancelled
    call returns only once the batch is done with it, so that its caller, deleting the item's
    blob unless an item uses it, never races an item still committing."""
    entered, release, finished = threading.Event(), threading.Event(), threading.Event()
    item = record(request_id="r-mid-commit")

    def step() -> None:
        entered.set()
        release.wait(10)
        finished.set()

    adding = asyncio.create_task(catalog.add(item, before_commit=step))
    assert await asyncio.to_thread(entered.wait, 10)
    adding.cancel()
    await asyncio.sleep(0.05)
    assert not adding.done()  # waits for the batch's outcome
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await adding
    assert finished.is_set()
    assert await catalog.find_request(ORG, "r-mid-commit") is None
    assert (await catalog.organization(ORG)).used_bytes == 0


async def test_retries_in_one_batch_store_once(catalog: SqlCatalog) -> None:
    earlier = record(request_id="r-earlier")
    await catalog.add(earlier)
    first, retry = record(request_id="r-new"), record(request_id="r-new")
    again = record(request_id="r-earlier")
    other_org = record(org="other", request_id="r-new")  # another organization's request
    outcomes = await _outcomes(catalog, first, retry, again, other_org)
    assert outcomes[0] is None
    assert outcomes[3] is None
    assert isinstance(outcomes[1], DuplicateRequestError)
    assert outcomes[1].existing == first
    assert isinstance(outcomes[2], DuplicateRequestError)
    assert outcomes[2].existing == earlier
    assert await catalog.find_request(ORG, "r-new") == first
    assert await catalog.find_request("other", "r-new") == other_org
    page = await catalog.list_page(ORG, filter="", order_by="", page_size=10, page_token="")
    assert [r.id for r in page.records] == [earlier.id, first.id]
    assert (await catalog.organization(ORG)).used_bytes == 2 * first.size


async def test_a_batch_over_the_quota_stores_what_fits_in_order(catalog: SqlCatalog) -> None:
    await catalog.set_organization_limits(ORG, max_file_size=None, storage_quota=10)
    items = [record(size=4) for _ in range(3)] + [record(size=2)]
    outcomes = await _outcomes(catalog, *items)
    assert [o is None for o in outcomes] == [True, True, False, True]
    assert isinstance(outcomes[2], LimitReached)
    assert (await catalog.organization(ORG)).used_bytes == 10
    # The server's default quota applies to an organization without one of its own.
    defaulted = [record(org="small", size=4) for _ in range(2)]
    added = await asyncio.gather(
        *(catalog.add(item, default_quota=5) for item in defaulted), return_exceptions=True
    )
    assert added[0] is None
    assert isinstance(added[1], LimitReached)
    assert (await catalog.organization("small")).used_bytes == 4


async def test_a_batch_records_events_in_order_with_their_tags(catalog: SqlCatalog) -> None:
    items = [record(tags=tuple(f"t{j}" for j in range(i % 3))) for i in range(7)]
    assert await _outcomes(catalog, *items) == [None] * 7
    events = await catalog.events_after(ORG, 0, filter="", limit=10)
    assert [e.record for e in events] == items
    assert [e.seq for e in events] == sorted(e.seq for e in events)
    tagged = await catalog.events_after(ORG, 0, filter="tags:t1", limit=10)
    assert [e.record.id for e in tagged] == [i.id for i in items if "t1" in i.tags]


async def test_a_batch_stores_labels_with_items_and_events(catalog: SqlCatalog) -> None:
    items = [
        record(
            labels={"rig": f"R{i}", "site": "x"} if i % 2 else {},
            tags=("t",) if i % 3 == 0 else (),
        )
        for i in range(6)
    ]
    assert await _outcomes(catalog, *items) == [None] * 6
    # A batch the database rejects is retried item by item: labels go that way too.
    late = [record(labels={"rig": "L"}), record(), record(labels={"site": "x"})]
    clash = record(id=items[0].id, labels={"rig": "clash"})  # the primary key is taken
    outcomes = await _outcomes(catalog, late[0], clash, late[1], late[2])
    assert isinstance(outcomes[1], sqlalchemy.exc.IntegrityError)
    assert [outcomes[0], outcomes[2], outcomes[3]] == [None] * 3
    stored = items + late
    for item in stored:
        assert (await catalog.get(ORG, item.id)).labels == item.labels
    events = await catalog.events_after(ORG, 0, filter="", limit=20)
    assert [e.record for e in events] == stored
    rig = await catalog.events_after(ORG, 0, filter='labels.rig = "R3"', limit=20)
    assert [e.record.id for e in rig] == [items[3].id]
    page = await catalog.list_page(
        ORG, filter='labels.site = "x"', order_by="", page_size=10, page_token=""
    )
    assert [r.id for r in page.records] == [items[1].id, items[3].id, items[5].id, late[2].id]


async def test_many_uploads_hold_blobs_while_they_commit(catalog: SqlCatalog) -> None:
    """More holders than the connection pool has connections, each adding its item while it
    holds its blob: none may wait for a connection another holder keeps."""

    async def store(item: DataRecord) -> None:
        async with catalog.hold_blob(item.blob_key):
            await catalog.add(item)

    items = [record(blob_key=uuid.uuid4().hex * 2) for _ in range(40)]
    await asyncio.wait_for(asyncio.gather(*(store(item) for item in items)), 60)
    for item in items:
        assert await catalog.blob_in_use(item.blob_key)


async def test_holders_of_one_blob_take_turns(postgres_url: str) -> None:
    """On PostgreSQL the hold is the cross-server lock: one holder at a time, in this process
    too (the session lock itself would let a second holder of the same session in)."""
    catalogs = [SqlCatalog.open(postgres_url, migrate=True) for _ in range(2)]
    inside: list[int] = []
    overlaps = 0

    async def hold(catalog: SqlCatalog, n: int) -> None:
        nonlocal overlaps
        async with catalog.hold_blob("ef" * 32):
            inside.append(n)
            overlaps = max(overlaps, len(inside))
            await asyncio.sleep(0.02)
            inside.remove(n)

    try:
        await asyncio.gather(*(hold(catalogs[n % 2], n) for n in range(6)))
    finally:
        for catalog in catalogs:
            await catalog.close()
    assert overlaps == 1


async def test_concurrent_holds_share_a_statement(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On PostgreSQL, the holds asked together are taken by one statement (one round trip and
    one worker thread hop), and released together too; each holder still holds its own."""
    catalog = SqlCatalog.open(postgres_url, migrate=True)
    locks = catalog._blob_locks
    assert locks is not None
    statements: list[tuple[list[int], list[int]]] = []
    real = locks._run

    ran = asyncio.Event()
    loop = asyncio.get_running_loop()

    def counted(unlocks: list[int], takes: list[int]) -> list[bool]:
        statements.append((unlocks, takes))
        loop.call_soon_threadsafe(ran.set)
        return real(unlocks, takes)

    monkeypatch.setattr(locks, "_run", counted)
    held = asyncio.Event()
    keys = [uuid.uuid4().hex * 2 for _ in range(16)]

    async def hold(key: str) -> None:
        async with catalog.hold_blob(key):
            await held.wait()

    try:
        holders = [asyncio.create_task(hold(key)) for key in keys]
        await asyncio.wait_for(ran.wait(), 10)
        await asyncio.sleep(0.1)
        assert statements == [([], [int(key[:15], 16) for key in keys])]
        assert await _advisory_locks_held(postgres_url, keys) == 16
        held.set()
        await asyncio.gather(*holders)
        assert len(statements) == 2
        assert sorted(statements[1][0]) == sorted(statements[0][1])
        assert await _advisory_locks_held(postgres_url, keys) == 0
    finally:
        await catalog.close()


async def test_a_holder_cancelled_while_its_lock_is_taken_leaves_it_free(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    catalogs = [SqlCatalog.open(postgres_url, migrate=True) for _ in range(2)]
    locks = catalogs[0]._blob_locks
    assert locks is not None
    real, asked = locks._run, asyncio.Event()
    loop = asyncio.get_running_loop()

    def slow(unlocks: list[int], takes: list[int]) -> list[bool]:
        if takes:
            loop.call_soon_threadsafe(asked.set)
            time.sleep(0.2)
        return real(unlocks, takes)

    monkeypatch.setattr(locks, "_run", slow)
    try:
        holder = asyncio.create_task(_hold_forever(catalogs[0], "ab" * 32))
        await asyncio.wait_for(asked.wait(), 10)
        holder.cancel()
        with pytest.raises(asyncio.CancelledError):
            await holder
        # The lock the statement took for nobody is released: another server gets it.
        async with asyncio.timeout(10), catalogs[1].hold_blob("ab" * 32):
            pass
    finally:
        for catalog in catalogs:
            await catalog.close()


async def _hold_forever(catalog: SqlCatalog, key: str) -> None:
    async with catalog.hold_blob(key):
        await asyncio.Event().wait()


async def _advisory_locks_held(postgres_url: str, keys: list[str]) -> int:
    """How many of the blob keys' advisory locks some session holds (other tests' aside)."""
    query = sqlalchemy.text(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
        "AND objsubid = 1 AND ((classid::bigint << 32) | objid::bigint) = ANY(:ids)"
    )

    def count() -> int:
        engine = sqlalchemy.create_engine(engine_url(postgres_url))
        try:
            with engine.connect() as connection:
                ids = [int(key[:15], 16) for key in keys]
                return int(connection.execute(query, {"ids": ids}).scalar_one())
        finally:
            engine.dispose()

    return await asyncio.to_thread(count)


@pytest.mark.parametrize("size", [1, 300])
async def test_batches_of_any_size_commit_everything(catalog: SqlCatalog, size: int) -> None:
    items = [record(request_id=f"r-{i}", tags=("x",) if i % 2 else ()) for i in range(size)]
    assert await _outcomes(catalog, *items) == [None] * size
    for item in items[:: max(1, size // 10)]:
        assert await catalog.get(ORG, item.id) == item
    assert (await catalog.organization(ORG)).used_bytes == sum(i.size for i in items)


async def test_a_batch_the_catalog_drops_fails_each_item_unavailable(postgres_url: str) -> None:
    """A batch cut off from PostgreSQL mid-way: every add in it fails as the backend fault it is
    (UNAVAILABLE with a retry delay, each its own error), nothing of it is kept, and the same
    adds retried once the catalog is back store each item once."""
    parts = urlsplit(postgres_url)
    assert parts.hostname is not None
    with TcpProxy(parts.hostname, parts.port or 5432) as proxy:
        url = postgres_url.replace(parts.netloc, f"{parts.username}@{proxy.address}", 1)
        catalog = SqlCatalog.open(url, migrate=True)
        try:
            kept = record(request_id="r-kept")
            await catalog.add(kept)
            items = [record(request_id=f"r-{i}", tags=("t",)) for i in range(5)]
            proxy.cut()
            outcomes = await _outcomes(catalog, *items)
            faults = [outcome for outcome in outcomes if isinstance(outcome, Unavailable)]
            assert len(faults) == len(items), outcomes
            assert len({id(fault) for fault in faults}) == len(items)
            assert all(fault.retry_after for fault in faults)
            proxy.restore()
            # Each retried twice in one batch: the first try stores it, the second gets it back.
            retried = await _outcomes(catalog, *items, *items)
            assert retried[: len(items)] == [None] * len(items)
            duplicates = retried[len(items) :]
            assert all(isinstance(d, DuplicateRequestError) for d in duplicates), duplicates
            assert [d.existing for d in duplicates if isinstance(d, DuplicateRequestError)] == items
            for item in items:
                assert await catalog.find_request(ORG, item.request_id) == item
            used = (await catalog.organization(ORG)).used_bytes
            assert used == kept.size + sum(item.size for item in items)
        finally:
            await catalog.close()


def _batch_sizes(catalog: SqlCatalog, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    sizes: list[int] = []
    add_batch = catalog._add_batch

    def counted(items: list[Any]) -> list[Exception | None]:
        sizes.append(len(items))
        return add_batch(items)

    monkeypatch.setattr(catalog, "_add_batch", counted)
    return sizes


async def test_an_add_on_its_way_joins_the_batch_that_would_commit_without_it(
    catalog: SqlCatalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    await catalog.add(record())  # a first commit: the catalog knows how long one takes
    # However long commits take and the machine stalls, the batch waits for the add.
    monkeypatch.setattr(catalog_items, "_MAX_LINGER", 3600.0)
    monkeypatch.setattr(catalog, "_commit_seconds", 3600.0)
    sizes = _batch_sizes(catalog, monkeypatch)
    early, late = record(), record()
    with catalog.add_coming():  # an upload storing its blob
        first = asyncio.create_task(catalog.add(early))
        for _ in range(3):
            await asyncio.sleep(0)  # the flusher is waiting now
        assert sizes == []
    await catalog.add(late)
    await first
    assert sizes == [2]
    assert await catalog.get(ORG, early.id) == early
    assert await catalog.get(ORG, late.id) == late


async def test_an_add_waits_for_none_when_no_other_is_on_its_way(
    catalog: SqlCatalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    await catalog.add(record())
    monkeypatch.setattr(catalog_items, "_MAX_LINGER", 3600.0)
    monkeypatch.setattr(catalog, "_commit_seconds", 3600.0)
    alone = record()
    # A hang detector, not a timing: waiting at all would mean an hour here.
    await asyncio.wait_for(catalog.add(alone), 60)
    # One whose blob failed (it never adds) stops the wait as soon as it gives up.
    waiting = record()
    with catalog.add_coming():
        add = asyncio.create_task(catalog.add(waiting))
        await asyncio.sleep(0)
    await asyncio.wait_for(add, 60)
    assert await catalog.get(ORG, waiting.id) == waiting


async def test_concurrent_request_lookups_share_a_query_and_each_gets_its_own_answer(
    catalog: SqlCatalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lookups asked together are answered by one query per organization, each with the item
    stored under its own (organization, request id), or None."""
    mine, theirs = record(request_id="r-1"), record(org="other", request_id="r-1")
    await _outcomes(catalog, mine, theirs)
    hops: list[int] = []
    find_requests = catalog._find_requests

    def counted(wanted: Any) -> Any:
        hops.append(len(wanted))
        return find_requests(wanted)

    monkeypatch.setattr(catalog, "_find_requests", counted)
    asked = [(ORG, "r-1"), ("other", "r-1"), (ORG, "r-2"), ("nobody", "r-1"), (ORG, "r-1")]
    found = await asyncio.gather(*(catalog.find_request(org, rid) for org, rid in asked))
    assert found == [mine, theirs, None, None, mine]
    assert hops == [len(asked)]
    assert await catalog.find_request(ORG, "r-2") is None  # alone: answered at once, alone
    assert hops == [len(asked), 1]


async def test_request_lookups_the_catalog_fails_fail_each_alone(
    catalog: SqlCatalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(wanted: Any) -> Any:
        raise sqlalchemy.exc.OperationalError("SELECT", {}, Exception("the catalog is away"))

    monkeypatch.setattr(catalog, "_find_requests", broken)
    outcomes = await asyncio.gather(
        *(catalog.find_request(ORG, f"r-{i}") for i in range(3)), return_exceptions=True
    )
    assert all(isinstance(outcome, Unavailable) for outcome in outcomes), outcomes
    assert len({id(outcome) for outcome in outcomes}) == 3
    monkeypatch.undo()
    assert await catalog.find_request(ORG, "r-0") is None  # and the next lookups work


@pytest.mark.parametrize("on_its_way", [None, 3600.0])
async def test_an_add_long_on_its_way_holds_its_batch_open_for_a_share_of_that_time(
    catalog: SqlCatalog, monkeypatch: pytest.MonkeyPatch, on_its_way: float | None
) -> None:
    """Commits quick (none took any time), the batch of an add that had been on its way for an
    hour (an upload whose PUT to object storage took that long) waits for the next add on its
    way; the batch of one just announced does not."""
    await catalog.add(record())
    monkeypatch.setattr(catalog, "_commit_seconds", 0.0)
    monkeypatch.setattr(catalog_items, "_MAX_SLOW_LINGER", 3600.0)
    sizes = _batch_sizes(catalog, monkeypatch)
    early, late = record(), record()
    since = None if on_its_way is None else time.monotonic() - on_its_way
    with catalog.add_coming():  # the next upload, its blob still on its way
        first = asyncio.create_task(catalog.add(early, on_its_way_since=since))
        for _ in range(20):
            await asyncio.sleep(0)  # the flusher has taken its batch, or is waiting
    async with asyncio.timeout(60):  # a hang detector, not a timing
        await catalog.add(late)
        await first
    assert sizes == ([1, 1] if on_its_way is None else [2])
    assert await catalog.get(ORG, early.id) == early
    assert await catalog.get(ORG, late.id) == late


async def test_a_batch_held_open_for_an_add_long_on_its_way_still_ends(
    catalog: SqlCatalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The share is bounded (_MAX_SLOW_LINGER): an add on its way for an hour does not make its
    batch wait a quarter of an hour for one that does not come."""
    await catalog.add(record())
    monkeypatch.setattr(catalog, "_commit_seconds", 0.0)
    monkeypatch.setattr(catalog_items, "_MAX_SLOW_LINGER", 0.01)
    alone = record()
    with catalog.add_coming():  # never arrives while the add waits
        async with asyncio.timeout(60):  # a hang detector, not a timing
            await catalog.add(alone, on_its_way_since=time.monotonic() - 3600)
    assert await catalog.get(ORG, alone.id) == alone
