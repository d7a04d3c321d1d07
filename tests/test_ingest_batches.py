"""Small uploads arriving together commit together: while a small upload's bytes are still
arriving, a catalog batch about to commit waits a little for it (Ingest.upload announces its
add from the start), and a file that turns out large stops being waited for."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from metalake.server.app import build_datalake
from metalake.server.catalog import SqlCatalog
from metalake.server.catalog import items as catalog_items
from metalake.server.config import Settings
from metalake.server.datalake import DatalakeCore
from metalake.server.ingest import SMALL_FILE, UploadHeader
from tests.test_catalog_batches import _batch_sizes

ORG = "org"


@pytest.fixture
async def lake(tmp_path: Path) -> AsyncIterator[DatalakeCore]:
    datalake = build_datalake(Settings(data_dir=tmp_path / "data"))
    try:
        yield datalake
    finally:
        await datalake.catalog.close()


async def _chunks(parts: list[bytes], gate: asyncio.Event | None = None) -> AsyncIterator[bytes]:
    """`parts`, with a wait for `gate` after the first (bytes still on their way)."""
    for index, part in enumerate(parts):
        if index == 1 and gate is not None:
            await gate.wait()
        yield part


def _never_waiting_for_long(monkeypatch: pytest.MonkeyPatch, lake: DatalakeCore) -> None:
    """However long commits take and the machine stalls, a batch waits for every add on its
    way: an hour each."""
    monkeypatch.setattr(catalog_items, "_MAX_LINGER", 3600.0)
    monkeypatch.setattr(lake.catalog, "_commit_seconds", 3600.0)


async def test_a_small_upload_still_arriving_joins_the_batch_of_one_that_arrived(
    lake: DatalakeCore, monkeypatch: pytest.MonkeyPatch
) -> None:
    ingest = lake.ingest
    await ingest.upload(ORG, UploadHeader(filename="first.bin"), _chunks([b"first"]))
    _never_waiting_for_long(monkeypatch, lake)
    assert isinstance(lake.catalog, SqlCatalog)
    sizes = _batch_sizes(lake.catalog, monkeypatch)
    gate = asyncio.Event()
    slow = asyncio.create_task(
        ingest.upload(ORG, UploadHeader(filename="slow.bin"), _chunks([b"sl", b"ow"], gate))
    )
    await asyncio.sleep(0.01)  # slow's first chunk is in
    quick = asyncio.create_task(
        ingest.upload(ORG, UploadHeader(filename="quick.bin"), _chunks([os.urandom(64)]))
    )
    for _ in range(20):
        await asyncio.sleep(0)
    assert sizes == []  # quick's batch waits for slow's add
    assert not quick.done()
    gate.set()
    async with asyncio.timeout(60):  # a hang detector, not a timing
        stored = await asyncio.gather(slow, quick)
    assert sizes == [2]
    for record in stored:
        assert await lake.catalog.get(ORG, record.id) == record


async def test_a_large_upload_or_a_failed_one_is_not_waited_for(
    lake: DatalakeCore, monkeypatch: pytest.MonkeyPatch
) -> None:
    ingest = lake.ingest
    await ingest.upload(ORG, UploadHeader(filename="first.bin"), _chunks([b"first"]))
    _never_waiting_for_long(monkeypatch, lake)
    gate = asyncio.Event()
    # Past the small-file threshold, then waiting for more: its add is far off.
    large = asyncio.create_task(
        ingest.upload(
            ORG,
            UploadHeader(filename="large.bin"),
            _chunks([os.urandom(SMALL_FILE + 1), b"rest"], gate),
        )
    )

    async def broken() -> AsyncIterator[bytes]:
        yield b"part"
        raise ConnectionResetError("the client went away")

    await asyncio.sleep(0.01)
    with pytest.raises(ConnectionResetError):
        await ingest.upload(ORG, UploadHeader(filename="broken.bin"), broken())
    async with asyncio.timeout(60):  # waiting for either would mean an hour here
        quick = await ingest.upload(ORG, UploadHeader(filename="quick.bin"), _chunks([b"q"]))
    assert await lake.catalog.get(ORG, quick.id) == quick
    assert not large.done()
    gate.set()
    async with asyncio.timeout(60):
        await large


async def test_an_upload_tells_the_catalog_its_add_was_on_its_way_since_it_began(
    lake: DatalakeCore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The catalog may hold a batch open for a share of the time an add was on its way: for an
    upload, that time runs from its start, not from when its bytes were all in."""
    announced: list[float | None] = []
    add = lake.catalog.add

    async def telling(record: Any, **options: Any) -> None:
        announced.append(options.get("on_its_way_since"))
        await add(record, **options)

    monkeypatch.setattr(lake.catalog, "add", telling)
    gate = asyncio.Event()
    began = time.monotonic()
    upload = asyncio.create_task(
        lake.ingest.upload(ORG, UploadHeader(filename="slow.bin"), _chunks([b"sl", b"ow"], gate))
    )
    await asyncio.sleep(0.05)  # its first chunk is in, the rest on its way
    released = time.monotonic()
    gate.set()
    async with asyncio.timeout(60):  # a hang detector, not a timing
        await upload
    [since] = announced
    assert since is not None
    assert began <= since < released
